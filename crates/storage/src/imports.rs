//! Bulk import of accounts: a checked plan is kept until an admin confirms it, then applied
//! in one transaction — every department and account, or none.

use crate::audit::{append, AuditEvent};
use crate::departments::ensure_path;
use crate::users::{insert_user, NewUser};
use crate::{get_i64, get_str, Result, StorageError, Store};
use domain::import::ImportPlan;

#[derive(Clone, Debug)]
pub struct PendingImport {
    pub id: String,
    pub tenant_id: String,
    pub created_by: String,
    pub created_at: i64,
    pub create_departments: bool,
    /// The file as uploaded, base64-encoded.
    pub content: String,
}

#[derive(Clone, Debug)]
pub struct ImportOutcome {
    pub departments_created: usize,
    /// Accounts made, each with a temporary password the caller generated.
    pub users_created: usize,
}

impl Store {
    pub async fn save_pending_import(&self, p: &PendingImport) -> Result<()> {
        // Only the newest pending import of an admin is kept.
        sqlx::query("DELETE FROM pending_imports WHERE tenant_id = $1 AND (created_by = $2 OR created_at < $3)")
            .bind(&p.tenant_id)
            .bind(&p.created_by)
            .bind(p.created_at - domain::clock::DAY_MS)
            .execute(&self.writer)
            .await?;
        sqlx::query("INSERT INTO pending_imports (id, tenant_id, created_by, created_at, create_departments, content) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&p.id)
            .bind(&p.tenant_id)
            .bind(&p.created_by)
            .bind(p.created_at)
            .bind(i64::from(p.create_departments))
            .bind(&p.content)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Forgets previews nobody confirmed.
    pub async fn purge_pending_imports(&self, created_before: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM pending_imports WHERE created_at < $1")
                .bind(created_before)
                .execute(&self.writer)
                .await?
                .rows_affected(),
        )
    }

    /// The pending import `id` of this admin.
    pub async fn pending_import(
        &self,
        tenant_id: &str,
        created_by: &str,
        id: &str,
    ) -> Result<PendingImport> {
        let r = sqlx::query("SELECT id, tenant_id, created_by, created_at, create_departments, content FROM pending_imports WHERE tenant_id = $1 AND created_by = $2 AND id = $3")
            .bind(tenant_id)
            .bind(created_by)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        Ok(PendingImport {
            id: get_str(&r, "id")?,
            tenant_id: get_str(&r, "tenant_id")?,
            created_by: get_str(&r, "created_by")?,
            created_at: get_i64(&r, "created_at")?,
            create_departments: get_i64(&r, "create_departments")? != 0,
            content: get_str(&r, "content")?,
        })
    }

    /// Applies a plan: `password_hashes[i]` belongs to `plan.users[i]`. A login id taken in
    /// the meantime aborts the whole import.
    #[allow(clippy::too_many_arguments)] // one transaction's worth of inputs
    pub async fn apply_import(
        &self,
        tenant_id: &str,
        plan: &ImportPlan,
        password_hashes: &[String],
        temporary_until: i64,
        pending_id: Option<&str>,
        now: i64,
        audit: AuditEvent,
    ) -> Result<ImportOutcome> {
        if password_hashes.len() != plan.users.len() {
            return Err(StorageError::Conflict("internal: hash count".into()));
        }
        let mut tx = self.write_tx().await?;
        let mut dept_ids = std::collections::HashMap::new();
        for path in &plan.departments_to_create {
            let id = ensure_path(&mut tx, tenant_id, path, now, &audit).await?;
            dept_ids.insert(path.clone(), id);
        }
        for (row, hash) in plan.users.iter().zip(password_hashes) {
            let dept_id = match dept_ids.get(&row.department_path) {
                Some(id) => id.clone(),
                None => {
                    let r = sqlx::query(
                        "SELECT id FROM departments WHERE tenant_id = $1 AND path = $2",
                    )
                    .bind(tenant_id)
                    .bind(&row.department_path)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| {
                        StorageError::Conflict(format!(
                            "{}行目: 所属「{}」が見つかりません。",
                            row.line, row.department_path
                        ))
                    })?;
                    let id = get_str(&r, "id")?;
                    dept_ids.insert(row.department_path.clone(), id.clone());
                    id
                }
            };
            let nu = NewUser {
                tenant_id: tenant_id.to_string(),
                login_id: row.login_id.clone(),
                display_name: row.display_name.clone(),
                email: row.email.clone(),
                department_id: dept_id,
                role: row.role,
                password_hash: hash.clone(),
                temporary_until: Some(temporary_until),
                now,
            };
            let id = insert_user(&mut tx, &nu).await.map_err(|e| match e {
                StorageError::Conflict(_) => StorageError::Conflict(format!(
                    "{}行目: ログインID「{}」は既に登録されています。",
                    row.line, row.login_id
                )),
                other => other,
            })?;
            let ev = audit.clone().with(
                "user.create",
                format!("user:{id}"),
                serde_json::json!({"login_id": row.login_id, "display_name": row.display_name, "department": row.department_path, "role": row.role, "via": "csv_import"}),
            );
            append(&mut tx, &ev).await?;
        }
        let ev = audit.with(
            "user.import",
            format!("tenant:{tenant_id}"),
            serde_json::json!({"users": plan.users.len(), "departments": plan.departments_to_create.len(), "encoding": plan.encoding}),
        );
        append(&mut tx, &ev).await?;
        if let Some(pid) = pending_id {
            sqlx::query("DELETE FROM pending_imports WHERE tenant_id = $1 AND id = $2")
                .bind(tenant_id)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ImportOutcome {
            departments_created: plan.departments_to_create.len(),
            users_created: plan.users.len(),
        })
    }
}
