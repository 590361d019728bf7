//! The audit trail: appended inside the transaction of the change it records, chained per
//! tenant (see `domain::audit`), listed with filters, and verified end to end.

use crate::{get_i64, get_opt_str, get_str, like_escape, Result, Store};
use domain::audit::{AuditRecord, Broken, ChainVerifier, GENESIS};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

/// What happened, before it is numbered and chained.
#[derive(Clone, Debug, Default)]
pub struct AuditEvent {
    pub tenant_id: String,
    pub at_ms: i64,
    pub actor_id: Option<String>,
    pub actor_login: String,
    pub ip: String,
    pub user_agent: String,
    pub action: String,
    pub target: String,
    pub result: String,
    /// A JSON object; never a password, hash or token.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn with(
        mut self,
        action: &str,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        self.action = action.to_string();
        self.target = target.into();
        self.detail = detail;
        if self.result.is_empty() {
            self.result = "success".into();
        }
        self
    }

    pub fn result(mut self, result: &str) -> Self {
        self.result = result.to_string();
        self
    }
}

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub action_prefix: Option<String>,
    pub actor_login: Option<String>,
    pub result: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// The outcome of verifying one tenant's chain.
#[derive(Clone, Debug)]
pub struct ChainReport {
    pub tenant_id: String,
    pub result: std::result::Result<u64, Broken>,
}

/// Appends `ev` to its tenant's chain on `conn`, which must be inside a transaction.
/// The head row is updated first, which takes the write lock (SQLite) or the row lock
/// (PostgreSQL) before anything is read, so concurrent appends queue instead of forking.
pub(crate) async fn append(conn: &mut AnyConnection, ev: &AuditEvent) -> Result<i64> {
    sqlx::query("INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING")
        .bind(&ev.tenant_id)
        .bind(GENESIS)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE audit_heads SET seq = seq + 1 WHERE tenant_id = $1")
        .bind(&ev.tenant_id)
        .execute(&mut *conn)
        .await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1")
        .bind(&ev.tenant_id)
        .fetch_one(&mut *conn)
        .await?;
    let mut rec = AuditRecord {
        tenant_id: ev.tenant_id.clone(),
        seq: get_i64(&head, "seq")?,
        at_ms: ev.at_ms,
        actor_id: ev.actor_id.clone(),
        actor_login: clean(&ev.actor_login, 200),
        ip: clean(&ev.ip, 100),
        user_agent: clean(&ev.user_agent, 400),
        action: ev.action.clone(),
        target: clean(&ev.target, 400),
        result: if ev.result.is_empty() {
            "success".into()
        } else {
            ev.result.clone()
        },
        detail: ev.detail.to_string(),
        prev_hash: get_str(&head, "hash")?,
        hash: String::new(),
    };
    rec.hash = rec.compute_hash();
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, seq, at, actor_id, actor_login, ip, user_agent, action, target, result, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&rec.tenant_id)
    .bind(rec.seq)
    .bind(rec.at_ms)
    .bind(&rec.actor_id)
    .bind(&rec.actor_login)
    .bind(&rec.ip)
    .bind(&rec.user_agent)
    .bind(&rec.action)
    .bind(&rec.target)
    .bind(&rec.result)
    .bind(&rec.detail)
    .bind(&rec.prev_hash)
    .bind(&rec.hash)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_heads SET hash = $1 WHERE tenant_id = $2")
        .bind(&rec.hash)
        .bind(&rec.tenant_id)
        .execute(&mut *conn)
        .await?;
    Ok(rec.seq)
}

/// Values that reach the audit log come from clients (user agents, typed login ids):
/// control characters (CR/LF, ANSI escapes) are replaced and the length is capped, so a
/// record can neither forge a line in an export nor grow without bound.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

pub(crate) fn record_from(row: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        tenant_id: get_str(row, "tenant_id")?,
        seq: get_i64(row, "seq")?,
        at_ms: get_i64(row, "at")?,
        actor_id: get_opt_str(row, "actor_id")?,
        actor_login: get_str(row, "actor_login")?,
        ip: get_str(row, "ip")?,
        user_agent: get_str(row, "user_agent")?,
        action: get_str(row, "action")?,
        target: get_str(row, "target")?,
        result: get_str(row, "result")?,
        detail: get_str(row, "detail")?,
        prev_hash: get_str(row, "prev_hash")?,
        hash: get_str(row, "hash")?,
    })
}

const COLUMNS: &str = "tenant_id, seq, at, actor_id, actor_login, ip, user_agent, action, target, result, detail, prev_hash, hash";

impl Store {
    /// Records an event that changes nothing else (a failed sign-in, an export).
    pub async fn append_audit(&self, ev: &AuditEvent) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        let seq = append(&mut tx, ev).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Newest first, with the total count for paging.
    pub async fn list_audit(
        &self,
        tenant_id: &str,
        f: &AuditFilter,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<AuditRecord>, i64)> {
        let mut wh = String::from("tenant_id = $1");
        let mut args: Vec<Arg> = vec![Arg::S(tenant_id.to_string())];
        if let Some(a) = f.action_prefix.as_deref().filter(|s| !s.is_empty()) {
            args.push(Arg::S(format!("{}%", like_escape(a))));
            wh.push_str(&format!(" AND action LIKE ${} ESCAPE '\\'", args.len()));
        }
        if let Some(a) = f.actor_login.as_deref().filter(|s| !s.is_empty()) {
            args.push(Arg::S(format!("%{}%", like_escape(&a.to_lowercase()))));
            wh.push_str(&format!(
                " AND lower(actor_login) LIKE ${} ESCAPE '\\'",
                args.len()
            ));
        }
        if let Some(r) = f.result.as_deref().filter(|s| !s.is_empty()) {
            args.push(Arg::S(r.to_string()));
            wh.push_str(&format!(" AND result = ${}", args.len()));
        }
        if let Some(t) = f.from_ms {
            args.push(Arg::I(t));
            wh.push_str(&format!(" AND at >= ${}", args.len()));
        }
        if let Some(t) = f.to_ms {
            args.push(Arg::I(t));
            wh.push_str(&format!(" AND at < ${}", args.len()));
        }
        let count_sql = format!("SELECT COUNT(*) AS n FROM audit_log WHERE {wh}");
        let total = get_i64(
            &bind_all(sqlx::query(&count_sql), &args)
                .fetch_one(&self.pool)
                .await?,
            "n",
        )?;
        let n = args.len();
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_log WHERE {wh} ORDER BY seq DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let rows = bind_all(sqlx::query(&sql), &args)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let recs = rows.iter().map(record_from).collect::<Result<Vec<_>>>()?;
        Ok((recs, total))
    }

    /// Verifies every tenant's chain, reading in batches so a large log fits in memory.
    pub async fn verify_audit(&self) -> Result<Vec<ChainReport>> {
        let heads = sqlx::query("SELECT tenant_id, seq, hash FROM audit_heads ORDER BY tenant_id")
            .fetch_all(&self.pool)
            .await?;
        let mut tenants: Vec<(String, i64, String)> = Vec::new();
        for h in &heads {
            tenants.push((
                get_str(h, "tenant_id")?,
                get_i64(h, "seq")?,
                get_str(h, "hash")?,
            ));
        }
        // Records of a tenant whose head row was deleted are checked too.
        let extra = sqlx::query("SELECT DISTINCT tenant_id FROM audit_log")
            .fetch_all(&self.pool)
            .await?;
        for r in &extra {
            let t = get_str(r, "tenant_id")?;
            if !tenants.iter().any(|(id, _, _)| *id == t) {
                tenants.push((t, -1, String::new()));
            }
        }
        let mut reports = Vec::new();
        for (tenant_id, head_seq, head_hash) in tenants {
            let mut v = ChainVerifier::new(&tenant_id);
            let mut after = 0i64;
            let mut failed = None;
            'pages: loop {
                let rows = sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT 5000"
                ))
                .bind(&tenant_id)
                .bind(after)
                .fetch_all(&self.pool)
                .await?;
                if rows.is_empty() {
                    break;
                }
                for r in &rows {
                    let rec = record_from(r)?;
                    after = rec.seq;
                    if let Err(b) = v.push(&rec) {
                        failed = Some(b);
                        break 'pages;
                    }
                }
            }
            let result = match failed {
                Some(b) => Err(b),
                None => v.finish(Some((head_seq, head_hash.as_str()))),
            };
            reports.push(ChainReport { tenant_id, result });
        }
        Ok(reports)
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Arg {
    S(String),
    I(i64),
}

pub(crate) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::S(s) => q.bind(s.as_str()),
            Arg::I(i) => q.bind(*i),
        };
    }
    q
}
