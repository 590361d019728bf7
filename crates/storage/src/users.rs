//! Staff accounts (policy S3): create, change, move, disable, delete, and the report of
//! accounts left unused. Disabling or deleting an account ends its sessions in the same
//! transaction.

use crate::audit::{append, bind_all, Arg, AuditEvent};
use crate::{
    conflict_on_unique, get_i64, get_opt_i64, get_opt_str, get_str, like_escape, Result,
    StorageError, Store,
};
use domain::policy::UserScope;
use domain::Role;
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Disabled,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Disabled => "disabled",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            UserStatus::Active => "有効",
            UserStatus::Disabled => "無効",
        }
    }
    pub fn parse(s: &str) -> Option<UserStatus> {
        match s {
            "active" => Some(UserStatus::Active),
            "disabled" => Some(UserStatus::Disabled),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub tenant_id: String,
    pub login_id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub department_id: String,
    pub department_path: String,
    pub role: Role,
    pub status: UserStatus,
    pub password_hash: String,
    pub password_temporary: bool,
    pub password_expires_at: Option<i64>,
    pub password_changed_at: i64,
    pub last_login_at: Option<i64>,
    pub locked_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl User {
    pub fn target(&self) -> domain::policy::UserTarget<'_> {
        domain::policy::UserTarget {
            tenant_id: &self.tenant_id,
            user_id: &self.id,
            role: self.role,
            department_path: &self.department_path,
        }
    }
}

/// A new account; the password hash is made by the caller (off the async threads).
#[derive(Clone, Debug)]
pub struct NewUser {
    pub tenant_id: String,
    pub login_id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub department_id: String,
    pub role: Role,
    pub password_hash: String,
    /// When set, the password is temporary and expires then.
    pub temporary_until: Option<i64>,
    pub now: i64,
}

/// Changes to an account; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct UserUpdate {
    pub display_name: Option<String>,
    pub email: Option<Option<String>>,
    pub department_id: Option<String>,
    pub role: Option<Role>,
}

#[derive(Clone, Debug, Default)]
pub struct UserFilter {
    /// Matches login id, name or e-mail, case-insensitively.
    pub query: Option<String>,
    /// Only this department and the ones below it.
    pub department_path: Option<String>,
    pub role: Option<Role>,
    pub status: Option<UserStatus>,
    /// Only accounts not signed in to since this time (never signed in: since creation).
    pub unused_since: Option<i64>,
}

pub(crate) const SELECT: &str = "SELECT u.id, u.tenant_id, u.login_id, u.display_name, u.email, u.department_id, \
    d.path AS department_path, u.role, u.status, u.password_hash, u.password_temporary, u.password_expires_at, \
    u.password_changed_at, u.last_login_at, u.locked_until, u.created_at, u.updated_at \
    FROM users u JOIN departments d ON d.id = u.department_id";

pub(crate) fn user_from(row: &AnyRow) -> Result<User> {
    let role_s = get_str(row, "role")?;
    let status_s = get_str(row, "status")?;
    Ok(User {
        id: get_str(row, "id")?,
        tenant_id: get_str(row, "tenant_id")?,
        login_id: get_str(row, "login_id")?,
        display_name: get_str(row, "display_name")?,
        email: get_opt_str(row, "email")?,
        department_id: get_str(row, "department_id")?,
        department_path: get_str(row, "department_path")?,
        role: Role::parse(&role_s)
            .ok_or_else(|| StorageError::Corrupt(format!("role {role_s}")))?,
        status: UserStatus::parse(&status_s)
            .ok_or_else(|| StorageError::Corrupt(format!("status {status_s}")))?,
        password_hash: get_str(row, "password_hash")?,
        password_temporary: get_i64(row, "password_temporary")? != 0,
        password_expires_at: get_opt_i64(row, "password_expires_at")?,
        password_changed_at: get_i64(row, "password_changed_at")?,
        last_login_at: get_opt_i64(row, "last_login_at")?,
        locked_until: get_opt_i64(row, "locked_until")?,
        created_at: get_i64(row, "created_at")?,
        updated_at: get_i64(row, "updated_at")?,
    })
}

const DUPLICATE_LOGIN: &str = "このログインIDは既に使われています。";

pub(crate) async fn insert_user(conn: &mut AnyConnection, u: &NewUser) -> Result<String> {
    let id = domain::ids::new_id();
    sqlx::query(
        "INSERT INTO users (id, tenant_id, login_id, display_name, email, department_id, role, status, password_hash, \
         password_temporary, password_expires_at, password_changed_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11, $12, $13)",
    )
    .bind(&id)
    .bind(&u.tenant_id)
    .bind(&u.login_id)
    .bind(&u.display_name)
    .bind(&u.email)
    .bind(&u.department_id)
    .bind(u.role.as_str())
    .bind(&u.password_hash)
    .bind(i64::from(u.temporary_until.is_some()))
    .bind(u.temporary_until)
    .bind(u.now)
    .bind(u.now)
    .bind(u.now)
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict_on_unique(e, DUPLICATE_LOGIN))?;
    Ok(id)
}

async fn active_admins_other_than(
    conn: &mut AnyConnection,
    tenant_id: &str,
    user_id: &str,
) -> Result<i64> {
    let r = sqlx::query("SELECT COUNT(*) AS n FROM users WHERE tenant_id = $1 AND role = 'tenant_admin' AND status = 'active' AND id <> $2")
        .bind(tenant_id)
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
    get_i64(&r, "n")
}

const LAST_ADMIN: &str = "有効な情報管理者がいなくなるため、この操作はできません。先に別の情報管理者を用意してください。";

impl Store {
    pub async fn create_user(&self, u: &NewUser, audit: AuditEvent) -> Result<User> {
        let dept = self
            .department_by_id(&u.tenant_id, &u.department_id)
            .await?;
        let mut tx = self.write_tx().await?;
        let id = insert_user(&mut tx, u).await?;
        let ev = audit.with(
            "user.create",
            format!("user:{id}"),
            serde_json::json!({"login_id": u.login_id, "display_name": u.display_name, "department": dept.path, "role": u.role}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.user_by_id(&u.tenant_id, &id).await
    }

    pub async fn user_by_id(&self, tenant_id: &str, id: &str) -> Result<User> {
        let row = sqlx::query(&format!("{SELECT} WHERE u.tenant_id = $1 AND u.id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        user_from(&row)
    }

    pub async fn user_by_login(&self, tenant_id: &str, login_id: &str) -> Result<User> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE u.tenant_id = $1 AND u.login_id = $2"
        ))
        .bind(tenant_id)
        .bind(login_id.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        user_from(&row)
    }

    /// All login ids of a tenant (for checking an import).
    pub async fn login_ids(&self, tenant_id: &str) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT login_id FROM users WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| get_str(r, "login_id")).collect()
    }

    /// A page of accounts within `scope`, ordered by login id, with the total count.
    pub async fn list_users(
        &self,
        tenant_id: &str,
        scope: &UserScope,
        f: &UserFilter,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<User>, i64)> {
        let mut wh = String::from("u.tenant_id = $1");
        let mut args = vec![Arg::S(tenant_id.to_string())];
        let subtree = |root: &str, wh: &mut String, args: &mut Vec<Arg>| {
            args.push(Arg::S(root.to_string()));
            args.push(Arg::S(format!("{}/%", like_escape(root))));
            wh.push_str(&format!(
                " AND (d.path = ${} OR d.path LIKE ${} ESCAPE '\\')",
                args.len() - 1,
                args.len()
            ));
        };
        if let UserScope::Subtree(root) = scope {
            subtree(root, &mut wh, &mut args);
        }
        if let Some(p) = f.department_path.as_deref().filter(|s| !s.is_empty()) {
            subtree(p, &mut wh, &mut args);
        }
        if let Some(q) = f.query.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            args.push(Arg::S(format!("%{}%", like_escape(&q.to_lowercase()))));
            let n = args.len();
            wh.push_str(&format!(
                " AND (lower(u.login_id) LIKE ${n} ESCAPE '\\' OR lower(u.display_name) LIKE ${n} ESCAPE '\\' OR lower(COALESCE(u.email, '')) LIKE ${n} ESCAPE '\\')"
            ));
        }
        if let Some(r) = f.role {
            args.push(Arg::S(r.as_str().to_string()));
            wh.push_str(&format!(" AND u.role = ${}", args.len()));
        }
        if let Some(s) = f.status {
            args.push(Arg::S(s.as_str().to_string()));
            wh.push_str(&format!(" AND u.status = ${}", args.len()));
        }
        if let Some(t) = f.unused_since {
            args.push(Arg::I(t));
            wh.push_str(&format!(
                " AND COALESCE(u.last_login_at, u.created_at) < ${}",
                args.len()
            ));
        }
        let count_sql = format!("SELECT COUNT(*) AS n FROM users u JOIN departments d ON d.id = u.department_id WHERE {wh}");
        let total = get_i64(
            &bind_all(sqlx::query(&count_sql), &args)
                .fetch_one(&self.pool)
                .await?,
            "n",
        )?;
        let n = args.len();
        let order = if f.unused_since.is_some() {
            "COALESCE(u.last_login_at, u.created_at), u.login_id"
        } else {
            "u.login_id"
        };
        let sql = format!(
            "{SELECT} WHERE {wh} ORDER BY {order} LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let rows = bind_all(sqlx::query(&sql), &args)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let users = rows.iter().map(user_from).collect::<Result<Vec<_>>>()?;
        Ok((users, total))
    }

    /// Changes name, e-mail, department or role. Taking the last active tenant admin's role
    /// away is refused.
    pub async fn update_user(
        &self,
        tenant_id: &str,
        id: &str,
        up: &UserUpdate,
        now: i64,
        audit: AuditEvent,
    ) -> Result<User> {
        let before = self.user_by_id(tenant_id, id).await?;
        let mut tx = self.write_tx().await?;
        if before.role == Role::TenantAdmin
            && up.role.is_some_and(|r| r != Role::TenantAdmin)
            && before.status == UserStatus::Active
            && active_admins_other_than(&mut tx, tenant_id, id).await? == 0
        {
            return Err(StorageError::Conflict(LAST_ADMIN.into()));
        }
        let mut changes = serde_json::Map::new();
        if let Some(v) = &up.display_name {
            if *v != before.display_name {
                changes.insert(
                    "display_name".into(),
                    serde_json::json!([before.display_name, v]),
                );
            }
        }
        if let Some(v) = &up.email {
            if *v != before.email {
                changes.insert("email".into(), serde_json::json!([before.email, v]));
            }
        }
        if let Some(v) = &up.department_id {
            if *v != before.department_id {
                let d =
                    sqlx::query("SELECT path FROM departments WHERE tenant_id = $1 AND id = $2")
                        .bind(tenant_id)
                        .bind(v)
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or(StorageError::NotFound)?;
                let p = get_str(&d, "path")?;
                changes.insert(
                    "department".into(),
                    serde_json::json!([before.department_path, p]),
                );
            }
        }
        if let Some(v) = up.role {
            if v != before.role {
                changes.insert("role".into(), serde_json::json!([before.role, v]));
            }
        }
        if changes.is_empty() {
            return Ok(before);
        }
        sqlx::query(
            "UPDATE users SET display_name = $1, email = $2, department_id = $3, role = $4, updated_at = $5 WHERE tenant_id = $6 AND id = $7",
        )
        .bind(up.display_name.as_ref().unwrap_or(&before.display_name))
        .bind(up.email.clone().unwrap_or(before.email.clone()))
        .bind(up.department_id.as_ref().unwrap_or(&before.department_id))
        .bind(up.role.unwrap_or(before.role).as_str())
        .bind(now)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let ev = audit.with(
            "user.update",
            format!("user:{id}"),
            serde_json::json!({"login_id": before.login_id, "changes": changes}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.user_by_id(tenant_id, id).await
    }

    /// Enables or disables an account; disabling ends its sessions at once.
    pub async fn set_user_status(
        &self,
        tenant_id: &str,
        id: &str,
        status: UserStatus,
        now: i64,
        audit: AuditEvent,
    ) -> Result<User> {
        let before = self.user_by_id(tenant_id, id).await?;
        if before.status == status {
            return Ok(before);
        }
        let mut tx = self.write_tx().await?;
        if status == UserStatus::Disabled
            && before.role == Role::TenantAdmin
            && active_admins_other_than(&mut tx, tenant_id, id).await? == 0
        {
            return Err(StorageError::Conflict(LAST_ADMIN.into()));
        }
        sqlx::query("UPDATE users SET status = $1, updated_at = $2, locked_until = NULL WHERE tenant_id = $3 AND id = $4")
            .bind(status.as_str())
            .bind(now)
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let ended = sqlx::query("DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let action = if status == UserStatus::Disabled {
            "user.disable"
        } else {
            "user.enable"
        };
        let ev = audit.with(
            action,
            format!("user:{id}"),
            serde_json::json!({"login_id": before.login_id, "sessions_ended": ended}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.user_by_id(tenant_id, id).await
    }

    /// Deletes an account and its sessions and sign-in history.
    pub async fn delete_user(&self, tenant_id: &str, id: &str, audit: AuditEvent) -> Result<()> {
        let before = self.user_by_id(tenant_id, id).await?;
        let mut tx = self.write_tx().await?;
        if before.role == Role::TenantAdmin
            && before.status == UserStatus::Active
            && active_admins_other_than(&mut tx, tenant_id, id).await? == 0
        {
            return Err(StorageError::Conflict(LAST_ADMIN.into()));
        }
        // Deleting an account removes its conversations with it; a hold must stop that.
        if crate::disposal::held(&mut tx, tenant_id, id).await? {
            return Err(StorageError::Conflict(
                "この職員の記録は保全（リーガルホールド）中のため削除できません。保全を解除するか、無効化してください。".into(),
            ));
        }
        let ended = sqlx::query("DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM login_attempts WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let ev = audit.with(
            "user.delete",
            format!("user:{id}"),
            serde_json::json!({"login_id": before.login_id, "display_name": before.display_name, "department": before.department_path, "sessions_ended": ended}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a new password hash. A temporary one (`temporary_until`) is what an admin
    /// issues; it ends every session of the account. A permanent one set by the user keeps
    /// `keep_session` and ends the others.
    #[allow(clippy::too_many_arguments)] // one transaction's worth of inputs
    pub async fn set_password(
        &self,
        tenant_id: &str,
        id: &str,
        hash: &str,
        temporary_until: Option<i64>,
        keep_session: Option<&str>,
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        let before = self.user_by_id(tenant_id, id).await?;
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "UPDATE users SET password_hash = $1, password_temporary = $2, password_expires_at = $3, password_changed_at = $4, \
             locked_until = NULL, updated_at = $4 WHERE tenant_id = $5 AND id = $6",
        )
        .bind(hash)
        .bind(i64::from(temporary_until.is_some()))
        .bind(temporary_until)
        .bind(now)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let ended =
            sqlx::query("DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2 AND id <> $3")
                .bind(tenant_id)
                .bind(id)
                .bind(keep_session.unwrap_or(""))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        let action = if temporary_until.is_some() {
            "user.password_reset"
        } else {
            "auth.password_change"
        };
        let ev = audit.with(
            action,
            format!("user:{id}"),
            serde_json::json!({"login_id": before.login_id, "sessions_ended": ended}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(())
    }
}
