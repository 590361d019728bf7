//! Alerts (S8): what the periodic analysis of the audit log needs to read (new events,
//! the ones just before them, what is known of each account), where it keeps its place,
//! and the alerts it raised, which tenant admins acknowledge.

use crate::audit::{append, record_from, AuditEvent};
use crate::{get_i64, get_opt_i64, get_opt_str, get_str, Result, StorageError, Store};
use domain::alerts::{Alert, Event, Rule};
use domain::audit::AuditRecord;
use std::collections::HashSet;

#[derive(Clone, Debug, serde::Serialize)]
pub struct AlertRecord {
    pub id: String,
    pub rule: String,
    pub subject: String,
    pub summary: String,
    pub event_seqs: Vec<i64>,
    pub at: i64,
    pub created_at: i64,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<i64>,
    pub mailed_at: Option<i64>,
}

impl AlertRecord {
    pub fn rule_label(&self) -> &'static str {
        Rule::parse(&self.rule).map(Rule::label).unwrap_or("その他")
    }
}

fn event_from(r: &sqlx::any::AnyRow) -> Result<Event> {
    let detail: serde_json::Value =
        serde_json::from_str(&get_str(r, "detail")?).unwrap_or_default();
    Ok(Event {
        seq: get_i64(r, "seq")?,
        at_ms: get_i64(r, "at")?,
        actor_id: get_opt_str(r, "actor_id")?,
        actor_login: get_str(r, "actor_login")?,
        ip: get_str(r, "ip")?,
        action: get_str(r, "action")?,
        result: get_str(r, "result")?,
        input_chars: detail
            .get("input_chars")
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
    })
}

const EVENT_COLS: &str = "seq, at, actor_id, actor_login, ip, action, result, detail";

fn alert_from(r: &sqlx::any::AnyRow) -> Result<AlertRecord> {
    Ok(AlertRecord {
        id: get_str(r, "id")?,
        rule: get_str(r, "rule")?,
        subject: get_str(r, "subject")?,
        summary: get_str(r, "summary")?,
        event_seqs: serde_json::from_str(&get_str(r, "event_seqs")?)
            .map_err(|e| StorageError::Corrupt(format!("alert events: {e}")))?,
        at: get_i64(r, "at")?,
        created_at: get_i64(r, "created_at")?,
        acknowledged_by: get_opt_str(r, "acknowledged_by")?,
        acknowledged_at: get_opt_i64(r, "acknowledged_at")?,
        mailed_at: get_opt_i64(r, "mailed_at")?,
    })
}

const ALERT_COLS: &str = "id, rule, subject, summary, event_seqs, at, created_at, acknowledged_by, acknowledged_at, mailed_at";

impl Store {
    /// The last audit sequence number analysed for the tenant (0 before the first run).
    pub async fn alert_cursor(&self, tenant_id: &str) -> Result<i64> {
        let r = sqlx::query("SELECT last_seq FROM alert_cursors WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => get_i64(&r, "last_seq")?,
            None => 0,
        })
    }

    /// Audit events after `after_seq`, oldest first, at most `limit`.
    pub async fn audit_events_after(
        &self,
        tenant_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        sqlx::query(&format!(
            "SELECT {EVENT_COLS} FROM audit_log WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(event_from)
        .collect()
    }

    /// Sign-ins and chat requests already analysed but recent enough to count in the
    /// windows of the new ones (from `since_ms`, up to `upto_seq`).
    pub async fn audit_lookback(
        &self,
        tenant_id: &str,
        upto_seq: i64,
        since_ms: i64,
    ) -> Result<Vec<Event>> {
        sqlx::query(&format!(
            "SELECT {EVENT_COLS} FROM audit_log WHERE tenant_id = $1 AND at >= $2 AND seq <= $3 \
             AND action IN ('auth.login', 'chat.send') ORDER BY seq"
        ))
        .bind(tenant_id)
        .bind(since_ms)
        .bind(upto_seq)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(event_from)
        .collect()
    }

    /// Addresses the account signed in from before `before_ms`.
    pub async fn known_addresses(
        &self,
        tenant_id: &str,
        user_id: &str,
        before_ms: i64,
    ) -> Result<HashSet<String>> {
        sqlx::query(
            "SELECT DISTINCT ip FROM login_attempts WHERE tenant_id = $1 AND user_id = $2 AND success = 1 AND at < $3",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| get_str(r, "ip"))
        .collect()
    }

    /// (time, characters sent) of a user's requests in `[from_ms, to_ms)`.
    pub async fn input_chars_between(
        &self,
        tenant_id: &str,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, u64)>> {
        sqlx::query(
            "SELECT at, input_chars FROM usage_events WHERE tenant_id = $1 AND user_id = $2 AND at >= $3 AND at < $4",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((get_i64(r, "at")?, get_i64(r, "input_chars")?.max(0) as u64)))
        .collect()
    }

    /// Stores the alerts not raised before (by rule, subject and window) and moves the
    /// cursor, in one transaction. Returns the new ones.
    pub async fn raise_alerts(
        &self,
        tenant_id: &str,
        alerts: &[Alert],
        cursor: i64,
        now: i64,
    ) -> Result<Vec<AlertRecord>> {
        let mut tx = self.write_tx().await?;
        let mut ids = Vec::new();
        for a in alerts {
            let id = domain::ids::new_id();
            let seqs =
                serde_json::to_string(&a.seqs).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            let n = sqlx::query(
                "INSERT INTO alerts (id, tenant_id, rule, subject, window_key, summary, event_seqs, at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant_id, rule, subject, window_key) DO NOTHING",
            )
            .bind(&id)
            .bind(tenant_id)
            .bind(a.rule.code())
            .bind(&a.subject)
            .bind(&a.window_key)
            .bind(&a.summary)
            .bind(seqs)
            .bind(a.at_ms)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                ids.push(id);
            }
        }
        sqlx::query(
            "INSERT INTO alert_cursors (tenant_id, last_seq) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET last_seq = excluded.last_seq",
        )
        .bind(tenant_id)
        .bind(cursor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut out = Vec::new();
        for id in ids {
            out.push(self.alert(tenant_id, &id).await?);
        }
        Ok(out)
    }

    /// Newest first; only those not yet acknowledged when `open_only`.
    pub async fn alerts(
        &self,
        tenant_id: &str,
        open_only: bool,
        limit: i64,
    ) -> Result<Vec<AlertRecord>> {
        let open = if open_only {
            " AND acknowledged_at IS NULL"
        } else {
            ""
        };
        sqlx::query(&format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE tenant_id = $1{open} ORDER BY at DESC, id LIMIT $2"
        ))
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(alert_from)
        .collect()
    }

    pub async fn open_alert_count(&self, tenant_id: &str) -> Result<i64> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM alerts WHERE tenant_id = $1 AND acknowledged_at IS NULL",
        )
        .bind(tenant_id)
        .fetch_one(&self.pool)
        .await?;
        get_i64(&r, "n")
    }

    pub async fn alert(&self, tenant_id: &str, id: &str) -> Result<AlertRecord> {
        let r = sqlx::query(&format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        alert_from(&r)
    }

    pub async fn acknowledge_alert(
        &self,
        tenant_id: &str,
        id: &str,
        note: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        let by = audit.actor_login.clone();
        let mut tx = self.write_tx().await?;
        let n = sqlx::query(
            "UPDATE alerts SET acknowledged_by = $1, acknowledged_at = $2 WHERE tenant_id = $3 AND id = $4 AND acknowledged_at IS NULL",
        )
        .bind(&by)
        .bind(audit.at_ms)
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
                "alert.acknowledge",
                format!("alert:{id}"),
                serde_json::json!({"note": note}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn mark_alerts_mailed(
        &self,
        tenant_id: &str,
        ids: &[String],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        for id in ids {
            sqlx::query("UPDATE alerts SET mailed_at = $1 WHERE tenant_id = $2 AND id = $3")
                .bind(now)
                .bind(tenant_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The audit records an alert rests on.
    pub async fn audit_by_seqs(&self, tenant_id: &str, seqs: &[i64]) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        for s in seqs.iter().take(200) {
            if let Some(r) = sqlx::query(
                "SELECT tenant_id, seq, at, actor_id, actor_login, ip, user_agent, action, target, result, detail, prev_hash, hash \
                 FROM audit_log WHERE tenant_id = $1 AND seq = $2",
            )
            .bind(tenant_id)
            .bind(*s)
            .fetch_optional(&self.pool)
            .await?
            {
                out.push(record_from(&r)?);
            }
        }
        Ok(out)
    }

    /// Where alerts go by e-mail: the active tenant admins with an address.
    pub async fn tenant_admin_emails(&self, tenant_id: &str) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT email FROM users WHERE tenant_id = $1 AND role = 'tenant_admin' AND status = 'active' \
             AND email IS NOT NULL AND email <> '' ORDER BY login_id",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| get_str(r, "email"))
        .collect()
    }
}
