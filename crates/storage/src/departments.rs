//! Departments as a tree (部 → 課 → 係). Each keeps its full path (`総務部/情報政策課`), so
//! subtree questions are one indexed prefix match instead of a recursive walk.

use crate::audit::{append, AuditEvent};
use crate::{
    conflict_on_unique, get_i64, get_opt_str, get_str, like_escape, Result, StorageError, Store,
};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Department {
    pub id: String,
    pub tenant_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub path: String,
    pub created_at: i64,
    /// Accounts directly in this department.
    pub user_count: i64,
}

impl Department {
    pub fn depth(&self) -> usize {
        self.path.matches('/').count()
    }
}

fn dept_from(row: &AnyRow) -> Result<Department> {
    Ok(Department {
        id: get_str(row, "id")?,
        tenant_id: get_str(row, "tenant_id")?,
        parent_id: get_opt_str(row, "parent_id")?,
        name: get_str(row, "name")?,
        path: get_str(row, "path")?,
        created_at: get_i64(row, "created_at")?,
        user_count: get_i64(row, "user_count")?,
    })
}

const SELECT: &str = "SELECT d.id, d.tenant_id, d.parent_id, d.name, d.path, d.created_at, \
    (SELECT COUNT(*) FROM users u WHERE u.tenant_id = d.tenant_id AND u.department_id = d.id) AS user_count FROM departments d";

const DUPLICATE: &str = "同じ名前の部署が同じ階層に既にあります。";

/// Creates `path` and any missing ancestors on `conn`; returns the id of the last one.
pub(crate) async fn ensure_path(
    conn: &mut AnyConnection,
    tenant_id: &str,
    path: &str,
    now: i64,
    ev: &AuditEvent,
) -> Result<String> {
    let mut parent: Option<String> = None;
    let mut so_far = String::new();
    for name in path.split('/') {
        if !so_far.is_empty() {
            so_far.push('/');
        }
        so_far.push_str(name);
        let existing = sqlx::query("SELECT id FROM departments WHERE tenant_id = $1 AND path = $2")
            .bind(tenant_id)
            .bind(&so_far)
            .fetch_optional(&mut *conn)
            .await?;
        let id = match existing {
            Some(r) => get_str(&r, "id")?,
            None => {
                let id = domain::ids::new_id();
                sqlx::query("INSERT INTO departments (id, tenant_id, parent_id, name, path, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(&id)
                    .bind(tenant_id)
                    .bind(&parent)
                    .bind(name)
                    .bind(&so_far)
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| conflict_on_unique(e, DUPLICATE))?;
                let rec = ev.clone().with(
                    "department.create",
                    format!("department:{id}"),
                    serde_json::json!({"path": so_far}),
                );
                append(conn, &rec).await?;
                id
            }
        };
        parent = Some(id);
    }
    parent.ok_or_else(|| StorageError::Conflict("部署のパスが空です。".into()))
}

impl Store {
    /// The whole tree of a tenant, ordered so that each department follows its parent.
    pub async fn list_departments(&self, tenant_id: &str) -> Result<Vec<Department>> {
        let rows = sqlx::query(&format!("{SELECT} WHERE d.tenant_id = $1 ORDER BY d.path"))
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        let mut list = rows.iter().map(dept_from).collect::<Result<Vec<_>>>()?;
        // Order by path segments, so `総務部/x` comes right after `総務部` even when another
        // name sorts between them character by character.
        list.sort_by(|a, b| a.path.split('/').cmp(b.path.split('/')));
        Ok(list)
    }

    /// id → path of every department of a tenant (no member counts: cheap).
    pub async fn department_paths(
        &self,
        tenant_id: &str,
    ) -> Result<std::collections::HashMap<String, String>> {
        let rows = sqlx::query("SELECT id, path FROM departments WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((get_str(r, "id")?, get_str(r, "path")?)))
            .collect()
    }

    pub async fn department_by_id(&self, tenant_id: &str, id: &str) -> Result<Department> {
        let row = sqlx::query(&format!("{SELECT} WHERE d.tenant_id = $1 AND d.id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        dept_from(&row)
    }

    pub async fn department_by_path(&self, tenant_id: &str, path: &str) -> Result<Department> {
        let row = sqlx::query(&format!("{SELECT} WHERE d.tenant_id = $1 AND d.path = $2"))
            .bind(tenant_id)
            .bind(path)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        dept_from(&row)
    }

    /// Creates one department under `parent_id` (or at the top).
    pub async fn create_department(
        &self,
        tenant_id: &str,
        parent_id: Option<&str>,
        name: &str,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Department> {
        let path = match parent_id {
            Some(p) => {
                let parent = self.department_by_id(tenant_id, p).await?;
                if parent.depth() + 1 >= domain::validate::DEPARTMENT_DEPTH_MAX {
                    return Err(StorageError::Conflict(format!(
                        "部署の階層は{}段までです。",
                        domain::validate::DEPARTMENT_DEPTH_MAX
                    )));
                }
                format!("{}/{}", parent.path, name)
            }
            None => name.to_string(),
        };
        let id = domain::ids::new_id();
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO departments (id, tenant_id, parent_id, name, path, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&id)
            .bind(tenant_id)
            .bind(parent_id)
            .bind(name)
            .bind(&path)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_on_unique(e, DUPLICATE))?;
        let ev = audit.with(
            "department.create",
            format!("department:{id}"),
            serde_json::json!({"path": path}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.department_by_id(tenant_id, &id).await
    }

    /// Creates a path and its missing ancestors (used by the CLI).
    pub async fn ensure_department_path(
        &self,
        tenant_id: &str,
        path: &str,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Department> {
        let mut tx = self.write_tx().await?;
        let id = ensure_path(&mut tx, tenant_id, path, now, &audit).await?;
        tx.commit().await?;
        self.department_by_id(tenant_id, &id).await
    }

    /// Renames a department; the paths of everything below it follow.
    pub async fn rename_department(
        &self,
        tenant_id: &str,
        id: &str,
        new_name: &str,
        audit: AuditEvent,
    ) -> Result<Department> {
        let d = self.department_by_id(tenant_id, id).await?;
        let new_path = match d.path.rfind('/') {
            Some(i) => format!("{}/{}", &d.path[..i], new_name),
            None => new_name.to_string(),
        };
        if new_path == d.path {
            return Ok(d);
        }
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE departments SET name = $1, path = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(new_name)
            .bind(&new_path)
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_on_unique(e, DUPLICATE))?;
        let below = sqlx::query(
            "SELECT id, path FROM departments WHERE tenant_id = $1 AND path LIKE $2 ESCAPE '\\'",
        )
        .bind(tenant_id)
        .bind(format!("{}/%", like_escape(&d.path)))
        .fetch_all(&mut *tx)
        .await?;
        for r in &below {
            let child_id = get_str(r, "id")?;
            let child_path = get_str(r, "path")?;
            let moved = format!("{new_path}{}", &child_path[d.path.len()..]);
            sqlx::query("UPDATE departments SET path = $1 WHERE id = $2")
                .bind(&moved)
                .bind(&child_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_on_unique(e, DUPLICATE))?;
        }
        let ev = audit.with(
            "department.rename",
            format!("department:{id}"),
            serde_json::json!({"before": d.path, "after": new_path, "descendants": below.len()}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.department_by_id(tenant_id, id).await
    }

    /// Deletes an empty department: one with neither accounts nor sub-departments.
    pub async fn delete_department(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        let d = self.department_by_id(tenant_id, id).await?;
        if d.user_count > 0 {
            return Err(StorageError::Conflict(format!(
                "部署「{}」には{}人の職員が所属しているため削除できません。先に職員を異動してください。",
                d.path, d.user_count
            )));
        }
        let mut tx = self.write_tx().await?;
        let children = sqlx::query(
            "SELECT COUNT(*) AS n FROM departments WHERE tenant_id = $1 AND parent_id = $2",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if get_i64(&children, "n")? > 0 {
            return Err(StorageError::Conflict(format!(
                "部署「{}」には下位の部署があるため削除できません。",
                d.path
            )));
        }
        let done = sqlx::query("DELETE FROM departments WHERE tenant_id = $1 AND id = $2 AND NOT EXISTS (SELECT 1 FROM users WHERE department_id = $2)")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StorageError::Conflict(
                "部署に職員が追加されたため削除できませんでした。".into(),
            ));
        }
        let ev = audit.with(
            "department.delete",
            format!("department:{id}"),
            serde_json::json!({"path": d.path}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(())
    }
}
