//! Retention (M6, S16): chat records older than the tenant's policy are removed, except
//! those under a legal hold (a user, or a department and the ones below it). The removal is
//! one transaction per tenant and leaves an audit record with the counts.

use crate::audit::{append, AuditEvent};
use crate::{get_i64, get_opt_str, get_str, Result, StorageError, Store};

#[derive(Clone, Debug, serde::Serialize)]
pub struct LegalHold {
    pub id: String,
    /// Whose records: 「氏名（ログインID）」 or a department path.
    pub target: String,
    pub user_id: Option<String>,
    pub department_id: Option<String>,
    pub reason: String,
    pub created_by: String,
    pub created_at: i64,
}

/// What a retention run removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    pub messages: u64,
    pub conversations: u64,
    pub failures: u64,
}

/// Users under a hold, directly or through their department (or one above it), with `$1`
/// the tenant. Used inside the deletes, so a held record is never touched.
pub(crate) const HELD_USERS: &str = "(SELECT u.id FROM users u JOIN departments ud ON ud.id = u.department_id \
    WHERE u.tenant_id = $1 AND ( \
    EXISTS (SELECT 1 FROM legal_holds h WHERE h.tenant_id = $1 AND h.user_id = u.id) \
    OR EXISTS (SELECT 1 FROM legal_holds h JOIN departments hd ON hd.id = h.department_id \
        WHERE h.tenant_id = $1 AND (ud.path = hd.path OR substr(ud.path, 1, length(hd.path) + 1) = hd.path || '/'))))";

impl Store {
    pub async fn legal_holds(&self, tenant_id: &str) -> Result<Vec<LegalHold>> {
        let rows = sqlx::query(
            "SELECT h.id, h.user_id, h.department_id, h.reason, h.created_by, h.created_at, \
             u.login_id, u.display_name, d.path FROM legal_holds h \
             LEFT JOIN users u ON u.id = h.user_id LEFT JOIN departments d ON d.id = h.department_id \
             WHERE h.tenant_id = $1 ORDER BY h.created_at DESC, h.id",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let target = match (get_opt_str(r, "display_name")?, get_opt_str(r, "path")?) {
                    (Some(n), _) => {
                        format!("{n}（{}）", get_opt_str(r, "login_id")?.unwrap_or_default())
                    }
                    (None, Some(p)) => format!("部署: {p}（下位を含む）"),
                    _ => "-".into(),
                };
                Ok(LegalHold {
                    id: get_str(r, "id")?,
                    target,
                    user_id: get_opt_str(r, "user_id")?,
                    department_id: get_opt_str(r, "department_id")?,
                    reason: get_str(r, "reason")?,
                    created_by: get_str(r, "created_by")?,
                    created_at: get_i64(r, "created_at")?,
                })
            })
            .collect()
    }

    /// Places a hold on a user or a department (exactly one of them).
    pub async fn add_legal_hold(
        &self,
        tenant_id: &str,
        user_id: Option<&str>,
        department_id: Option<&str>,
        reason: &str,
        audit: AuditEvent,
    ) -> Result<String> {
        let id = domain::ids::new_id();
        // Who and when come from the audit record of the request.
        let (created_by, now) = (audit.actor_login.clone(), audit.at_ms);
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO legal_holds (id, tenant_id, user_id, department_id, reason, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&id)
            .bind(tenant_id)
            .bind(user_id)
            .bind(department_id)
            .bind(reason)
            .bind(&created_by)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        append(
            &mut tx,
            &audit.with(
                "retention.hold",
                format!("legal_hold:{id}"),
                serde_json::json!({"user_id": user_id, "department_id": department_id, "reason": reason}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn remove_legal_hold(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query("DELETE FROM legal_holds WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "retention.release",
                format!("legal_hold:{id}"),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the tenant's messages created before `cutoff`, conversations left empty
    /// that were last active before it, and failure records before it — none of a held
    /// owner. Audited when anything went.
    pub async fn purge_chat_before(
        &self,
        tenant_id: &str,
        cutoff: i64,
        audit: AuditEvent,
    ) -> Result<Purged> {
        let mut tx = self.write_tx().await?;
        let messages = sqlx::query(&format!(
            "DELETE FROM messages WHERE tenant_id = $1 AND created_at < $2 AND conversation_id NOT IN \
             (SELECT c.id FROM conversations c WHERE c.tenant_id = $1 AND c.user_id IN {HELD_USERS})"
        ))
        .bind(tenant_id)
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let conversations = sqlx::query(&format!(
            "DELETE FROM conversations WHERE tenant_id = $1 AND updated_at < $2 \
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id) \
             AND user_id NOT IN {HELD_USERS}"
        ))
        .bind(tenant_id)
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let failures = sqlx::query(&format!(
            "DELETE FROM failures WHERE tenant_id = $1 AND at < $2 AND (user_id IS NULL OR user_id NOT IN {HELD_USERS})"
        ))
        .bind(tenant_id)
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let purged = Purged {
            messages,
            conversations,
            failures,
        };
        if purged != Purged::default() {
            append(
                &mut tx,
                &audit.with(
                    "retention.purge",
                    format!("tenant:{tenant_id}"),
                    serde_json::json!({"before": cutoff, "removed": purged}),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(purged)
    }
}
