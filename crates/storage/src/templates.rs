//! Prompt templates a city writes (tenant-wide, for a department and the ones below it, or
//! personal), favourites, and how often each template is used. Built-in templates live in
//! `domain`; here they appear only as `builtin:<key>` in favourites and use counts.
//!
//! Who may see a template is decided inside the query ([`Viewer`]), never by dropping rows
//! afterwards.

use crate::audit::{append, AuditEvent};
use crate::{get_i64, get_opt_str, get_str, Result, StorageError, Store};
use sqlx::any::AnyRow;
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug)]
pub struct PromptTemplate {
    pub id: String,
    pub tenant_id: String,
    /// `tenant`, `department` or `personal`.
    pub scope: String,
    pub department_id: Option<String>,
    pub department_path: Option<String>,
    pub owner_id: Option<String>,
    pub category: String,
    pub title: String,
    pub purpose: String,
    pub guidance: String,
    pub body: String,
    pub model_id: Option<String>,
    /// Knowledge to ask over: `None` none, `Some([])` all the user may read.
    pub knowledge: Option<Vec<String>>,
    pub source_key: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, Default)]
pub struct TemplateInput {
    pub scope: String,
    pub department_id: Option<String>,
    pub owner_id: Option<String>,
    pub category: String,
    pub title: String,
    pub purpose: String,
    pub guidance: String,
    pub body: String,
    pub model_id: Option<String>,
    /// Knowledge to ask over: `None` none, `Some([])` all the user may read.
    pub knowledge: Option<Vec<String>>,
    pub source_key: Option<String>,
}

/// Whose eyes a query serves: everyone sees tenant-wide templates, their own personal ones
/// and those of their department and the departments above it; a department admin also
/// those of the departments below theirs; a tenant admin every department's.
#[derive(Clone, Debug, Default)]
pub struct Viewer {
    pub user_id: String,
    pub department_path: String,
    pub all_departments: bool,
    /// A department admin's own department: the templates of its subtree are theirs to see.
    pub admin_subtree: Option<String>,
}

const SELECT: &str = "SELECT t.id, t.tenant_id, t.scope, t.department_id, d.path AS department_path, t.owner_id, \
    t.category, t.title, t.purpose, t.guidance, t.body, t.model_id, t.knowledge, t.source_key, t.created_by, t.created_at, t.updated_at \
    FROM prompt_templates t LEFT JOIN departments d ON d.id = t.department_id";

/// The visibility rule, with $2 user id, $3 department path, $4 all departments (0/1),
/// $5 admin subtree root ('' for none).
const VISIBLE: &str = "(t.scope = 'tenant' \
    OR (t.scope = 'personal' AND t.owner_id = $2) \
    OR (t.scope = 'department' AND ($4 = 1 \
        OR d.path = $3 OR substr($3, 1, length(d.path) + 1) = d.path || '/' \
        OR ($5 <> '' AND (d.path = $5 OR substr(d.path, 1, length($5) + 1) = $5 || '/')))))";

fn from_row(r: &AnyRow) -> Result<PromptTemplate> {
    Ok(PromptTemplate {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        scope: get_str(r, "scope")?,
        department_id: get_opt_str(r, "department_id")?,
        department_path: get_opt_str(r, "department_path")?,
        owner_id: get_opt_str(r, "owner_id")?,
        category: get_str(r, "category")?,
        title: get_str(r, "title")?,
        purpose: get_str(r, "purpose")?,
        guidance: get_str(r, "guidance")?,
        body: get_str(r, "body")?,
        model_id: get_opt_str(r, "model_id")?,
        knowledge: get_opt_str(r, "knowledge")?.and_then(|k| serde_json::from_str(&k).ok()),
        source_key: get_opt_str(r, "source_key")?,
        created_by: get_str(r, "created_by")?,
        created_at: get_i64(r, "created_at")?,
        updated_at: get_i64(r, "updated_at")?,
    })
}

impl Store {
    /// The templates this viewer may see, by category and title.
    pub async fn list_templates(&self, tenant_id: &str, v: &Viewer) -> Result<Vec<PromptTemplate>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE t.tenant_id = $1 AND {VISIBLE} ORDER BY t.category, t.title, t.id"
        ))
        .bind(tenant_id)
        .bind(&v.user_id)
        .bind(&v.department_path)
        .bind(i64::from(v.all_departments))
        .bind(v.admin_subtree.clone().unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// One template the viewer may see; any other is "not found".
    pub async fn template(&self, tenant_id: &str, v: &Viewer, id: &str) -> Result<PromptTemplate> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE t.tenant_id = $1 AND {VISIBLE} AND t.id = $6"
        ))
        .bind(tenant_id)
        .bind(&v.user_id)
        .bind(&v.department_path)
        .bind(i64::from(v.all_departments))
        .bind(v.admin_subtree.clone().unwrap_or_default())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(from_row)
            .transpose()?
            .ok_or(StorageError::NotFound)
    }

    /// Creates several templates at once (an import is all or nothing).
    pub async fn create_templates(
        &self,
        tenant_id: &str,
        inputs: &[TemplateInput],
        created_by: &str,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Vec<String>> {
        let mut tx = self.write_tx().await?;
        let mut ids = Vec::new();
        for t in inputs {
            let id = domain::ids::new_id();
            sqlx::query(
                "INSERT INTO prompt_templates (id, tenant_id, scope, department_id, owner_id, category, title, purpose, guidance, body, \
                 model_id, source_key, created_by, created_at, updated_at, knowledge) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15)",
            )
            .bind(&id)
            .bind(tenant_id)
            .bind(&t.scope)
            .bind(&t.department_id)
            .bind(&t.owner_id)
            .bind(&t.category)
            .bind(&t.title)
            .bind(&t.purpose)
            .bind(&t.guidance)
            .bind(&t.body)
            .bind(&t.model_id)
            .bind(&t.source_key)
            .bind(created_by)
            .bind(now)
            .bind(t.knowledge.as_ref().map(|k| serde_json::json!(k).to_string()))
            .execute(&mut *tx)
            .await?;
            append(
                &mut tx,
                &audit.clone().with(
                    "template.create",
                    format!("template:{id}"),
                    serde_json::json!({"title": t.title, "scope": t.scope, "department_id": t.department_id, "source": t.source_key}),
                ),
            )
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    pub async fn update_template(
        &self,
        tenant_id: &str,
        id: &str,
        t: &TemplateInput,
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query(
            "UPDATE prompt_templates SET scope = $1, department_id = $2, owner_id = $3, category = $4, title = $5, purpose = $6, \
             guidance = $7, body = $8, model_id = $9, updated_at = $10, knowledge = $13 WHERE tenant_id = $11 AND id = $12",
        )
        .bind(&t.scope)
        .bind(&t.department_id)
        .bind(&t.owner_id)
        .bind(&t.category)
        .bind(&t.title)
        .bind(&t.purpose)
        .bind(&t.guidance)
        .bind(&t.body)
        .bind(&t.model_id)
        .bind(now)
        .bind(tenant_id)
        .bind(id)
        .bind(t.knowledge.as_ref().map(|k| serde_json::json!(k).to_string()))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "template.update",
                format!("template:{id}"),
                serde_json::json!({"title": t.title, "scope": t.scope, "department_id": t.department_id}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_template(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query("DELETE FROM prompt_templates WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        sqlx::query("DELETE FROM template_favourites WHERE tenant_id = $1 AND template_ref = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        append(
            &mut tx,
            &audit.with(
                "template.delete",
                format!("template:{id}"),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn template_favourites(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<HashSet<String>> {
        let rows = sqlx::query(
            "SELECT template_ref FROM template_favourites WHERE tenant_id = $1 AND user_id = $2",
        )
        .bind(tenant_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| get_str(r, "template_ref")).collect()
    }

    pub async fn set_template_favourite(
        &self,
        tenant_id: &str,
        user_id: &str,
        template_ref: &str,
        on: bool,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM template_favourites WHERE user_id = $1 AND template_ref = $2")
            .bind(user_id)
            .bind(template_ref)
            .execute(&mut *tx)
            .await?;
        if on {
            sqlx::query("INSERT INTO template_favourites (tenant_id, user_id, template_ref, created_at) VALUES ($1, $2, $3, $4)")
                .bind(tenant_id)
                .bind(user_id)
                .bind(template_ref)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// How often each template has been used in this tenant.
    pub async fn template_uses(&self, tenant_id: &str) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query("SELECT template_ref, uses FROM template_uses WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((get_str(r, "template_ref")?, get_i64(r, "uses")?)))
            .collect()
    }

    pub async fn record_template_use(
        &self,
        tenant_id: &str,
        template_ref: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO template_uses (tenant_id, template_ref, uses, last_used_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (tenant_id, template_ref) DO UPDATE SET uses = template_uses.uses + 1, last_used_at = excluded.last_used_at",
        )
        .bind(tenant_id)
        .bind(template_ref)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
