//! Sign-in attempts, lockout and sessions (policies S4, S6). The database keeps only the
//! SHA-256 of a session token, so a copy of the database cannot be used to sign in.

use crate::audit::{append, AuditEvent};
use crate::users::{user_from, User, SELECT as USER_SELECT};
use crate::{get_i64, get_opt_i64, get_str, Result, Store};
use domain::settings::LockoutPolicy;
use sqlx::any::AnyRow;

#[derive(Clone, Debug)]
pub struct Session {
    /// SHA-256 of the token in the cookie.
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub csrf: String,
    pub created_at: i64,
    pub last_seen_at: i64,
    /// The sign-in before this one, shown to the user after sign-in.
    pub prev_login_at: Option<i64>,
    /// Failed attempts on this account between the previous sign-in and this one.
    pub failures_since: i64,
    pub ip: String,
    pub user_agent: String,
}

/// One sign-in attempt, as the admin view lists it.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub at: i64,
    pub success: bool,
    pub ip: String,
}

/// What a sign-in attempt is recorded with.
#[derive(Clone, Debug)]
pub struct LoginAttempt<'a> {
    pub tenant_id: &'a str,
    pub typed_login: &'a str,
    pub ip: &'a str,
    pub now: i64,
}

fn session_from(row: &AnyRow) -> Result<Session> {
    Ok(Session {
        id: get_str(row, "s_id")?,
        tenant_id: get_str(row, "s_tenant_id")?,
        user_id: get_str(row, "s_user_id")?,
        csrf: get_str(row, "s_csrf")?,
        created_at: get_i64(row, "s_created_at")?,
        last_seen_at: get_i64(row, "s_last_seen_at")?,
        prev_login_at: get_opt_i64(row, "s_prev_login_at")?,
        failures_since: get_i64(row, "s_failures_since")?,
        ip: get_str(row, "s_ip")?,
        user_agent: get_str(row, "s_user_agent")?,
    })
}

impl Store {
    /// Records a failed attempt. For a known account, counts the failures inside the
    /// policy's window (since the last success or the end of the last lock) and locks the
    /// account when they reach the limit. Returns the lock's end if this attempt locked it.
    pub async fn record_login_failure(
        &self,
        a: &LoginAttempt<'_>,
        user: Option<&User>,
        policy: LockoutPolicy,
        reason: &str,
        audit: AuditEvent,
    ) -> Result<Option<i64>> {
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO login_attempts (id, tenant_id, user_id, login_id, at, success, ip) VALUES ($1, $2, $3, $4, $5, 0, $6)")
            .bind(domain::ids::new_id())
            .bind(a.tenant_id)
            .bind(user.map(|u| u.id.clone()))
            .bind(a.typed_login.chars().take(100).collect::<String>())
            .bind(a.now)
            .bind(a.ip)
            .execute(&mut *tx)
            .await?;
        let target = user.map(|u| format!("user:{}", u.id)).unwrap_or_default();
        let ev = audit.clone().result("failure").with(
            "auth.login",
            target.clone(),
            serde_json::json!({"reason": reason}),
        );
        append(&mut tx, &ev).await?;
        let mut locked = None;
        if let Some(u) = user {
            let window_start = a.now - i64::from(policy.window_minutes) * domain::clock::MINUTE_MS;
            let since = [Some(window_start), u.last_login_at, u.locked_until]
                .into_iter()
                .flatten()
                .filter(|t| *t <= a.now)
                .max()
                .unwrap_or(window_start);
            let r = sqlx::query("SELECT COUNT(*) AS n FROM login_attempts WHERE tenant_id = $1 AND user_id = $2 AND success = 0 AND at > $3")
                .bind(a.tenant_id)
                .bind(&u.id)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
            let failures = get_i64(&r, "n")?;
            let already_locked = u.locked_until.is_some_and(|t| t > a.now);
            if failures >= i64::from(policy.max_failures) && !already_locked {
                let until = a.now + i64::from(policy.lock_minutes) * domain::clock::MINUTE_MS;
                sqlx::query("UPDATE users SET locked_until = $1 WHERE tenant_id = $2 AND id = $3")
                    .bind(until)
                    .bind(a.tenant_id)
                    .bind(&u.id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2")
                    .bind(a.tenant_id)
                    .bind(&u.id)
                    .execute(&mut *tx)
                    .await?;
                let ev = audit.result("success").with(
                    "auth.lockout",
                    target,
                    serde_json::json!({"failures": failures, "locked_until": domain::time::format_utc(until)}),
                );
                append(&mut tx, &ev).await?;
                locked = Some(until);
            }
        }
        tx.commit().await?;
        Ok(locked)
    }

    /// Records a successful sign-in and opens a session whose token digest is `session_id`.
    /// The session remembers the previous sign-in and the failures since, for the notice
    /// shown after sign-in.
    pub async fn record_login_success(
        &self,
        a: &LoginAttempt<'_>,
        user: &User,
        session_id: &str,
        csrf: &str,
        user_agent: &str,
        audit: AuditEvent,
    ) -> Result<Session> {
        let mut tx = self.write_tx().await?;
        let since = user.last_login_at.unwrap_or(i64::MIN);
        let r = sqlx::query("SELECT COUNT(*) AS n FROM login_attempts WHERE tenant_id = $1 AND user_id = $2 AND success = 0 AND at > $3")
            .bind(a.tenant_id)
            .bind(&user.id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
        let failures_since = get_i64(&r, "n")?;
        sqlx::query("INSERT INTO login_attempts (id, tenant_id, user_id, login_id, at, success, ip) VALUES ($1, $2, $3, $4, $5, 1, $6)")
            .bind(domain::ids::new_id())
            .bind(a.tenant_id)
            .bind(&user.id)
            .bind(&user.login_id)
            .bind(a.now)
            .bind(a.ip)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE users SET last_login_at = $1, locked_until = NULL WHERE tenant_id = $2 AND id = $3")
            .bind(a.now)
            .bind(a.tenant_id)
            .bind(&user.id)
            .execute(&mut *tx)
            .await?;
        let s = Session {
            id: session_id.to_string(),
            tenant_id: a.tenant_id.to_string(),
            user_id: user.id.clone(),
            csrf: csrf.to_string(),
            created_at: a.now,
            last_seen_at: a.now,
            prev_login_at: user.last_login_at,
            failures_since,
            ip: a.ip.to_string(),
            user_agent: user_agent.chars().take(400).collect(),
        };
        sqlx::query(
            "INSERT INTO sessions (id, tenant_id, user_id, csrf, created_at, last_seen_at, prev_login_at, failures_since, ip, user_agent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&s.id)
        .bind(&s.tenant_id)
        .bind(&s.user_id)
        .bind(&s.csrf)
        .bind(s.created_at)
        .bind(s.last_seen_at)
        .bind(s.prev_login_at)
        .bind(s.failures_since)
        .bind(&s.ip)
        .bind(&s.user_agent)
        .execute(&mut *tx)
        .await?;
        let ev = audit.with(
            "auth.login",
            format!("user:{}", user.id),
            serde_json::json!({"temporary_password": user.password_temporary}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// The session with this token digest and its account as it is now (role, status and
    /// department are read fresh on every request, so a change takes effect at once).
    pub async fn session_with_user(&self, session_id: &str) -> Result<Option<(Session, User)>> {
        let sql = format!(
            "SELECT s.id AS s_id, s.tenant_id AS s_tenant_id, s.user_id AS s_user_id, s.csrf AS s_csrf, \
             s.created_at AS s_created_at, s.last_seen_at AS s_last_seen_at, s.prev_login_at AS s_prev_login_at, \
             s.failures_since AS s_failures_since, s.ip AS s_ip, s.user_agent AS s_user_agent, x.* \
             FROM sessions s JOIN ({USER_SELECT}) x ON x.id = s.user_id AND x.tenant_id = s.tenant_id WHERE s.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some((session_from(&r)?, user_from(&r)?))),
            None => Ok(None),
        }
    }

    pub async fn touch_session(&self, session_id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE sessions SET last_seen_at = $1 WHERE id = $2")
            .bind(now)
            .bind(session_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Ends one session; `audit` records why (sign-out, time-out).
    pub async fn end_session(&self, session_id: &str, audit: Option<AuditEvent>) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if let (Some(ev), 1) = (audit, n) {
            append(&mut tx, &ev).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The newest sign-in attempts on one account (for the admin view).
    pub async fn recent_login_attempts(
        &self,
        tenant_id: &str,
        user_id: &str,
        limit: i64,
    ) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT at, success, ip FROM login_attempts WHERE tenant_id = $1 AND user_id = $2 ORDER BY at DESC LIMIT $3",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRecord {
                    at: get_i64(r, "at")?,
                    success: get_i64(r, "success")? != 0,
                    ip: get_str(r, "ip")?,
                })
            })
            .collect()
    }

    /// Lifts a lock before it runs out; failures so far no longer count towards the next.
    pub async fn unlock_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        now: i64,
        audit: AuditEvent,
    ) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query("UPDATE users SET locked_until = $1 WHERE tenant_id = $2 AND id = $3 AND locked_until > $1")
            .bind(now)
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            append(
                &mut tx,
                &audit.with(
                    "user.unlock",
                    format!("user:{user_id}"),
                    serde_json::json!({}),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Open sessions of one account (for tests and the admin view).
    pub async fn count_sessions(&self, tenant_id: &str, user_id: &str) -> Result<i64> {
        let r =
            sqlx::query("SELECT COUNT(*) AS n FROM sessions WHERE tenant_id = $1 AND user_id = $2")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?;
        get_i64(&r, "n")
    }

    /// Removes sessions idle since before `idle_before` or opened before `created_before`
    /// (housekeeping; requests check time-outs themselves).
    pub async fn purge_sessions(&self, idle_before: i64, created_before: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM sessions WHERE last_seen_at < $1 OR created_at < $2")
                .bind(idle_before)
                .bind(created_before)
                .execute(&self.writer)
                .await?
                .rows_affected(),
        )
    }
}
