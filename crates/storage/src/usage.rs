//! Usage in characters (M4): one record per chat request, running totals per month and
//! scope (tenant, department with everything below it, user) that the check before each
//! request reads, the allocations and caps admins set, and the figures the usage pages
//! show.
//!
//! Holds for requests still running are not stored here: they live in the serving process
//! (see the server's meter), so a crash can never leave a hold behind.

use crate::audit::{append, AuditEvent};
use crate::{get_i64, get_opt_str, get_str, like_escape, Result, Store};
use sqlx::any::AnyRow;
use std::collections::HashMap;

/// What one chat request used, as settled when it ended.
#[derive(Clone, Debug, Default)]
pub struct UsageRecord {
    pub tenant_id: String,
    /// `YYYY-MM` in JST, of the moment the request started.
    pub month: String,
    pub day: i64,
    pub at: i64,
    pub user_id: String,
    pub user_login: String,
    pub user_name: String,
    pub department_id: Option<String>,
    pub department_path: String,
    /// Ids from the top department down to the user's own.
    pub dept_chain: Vec<String>,
    pub model_id: Option<String>,
    pub model_name: String,
    pub message_id: Option<String>,
    pub status: String,
    pub input_chars: i64,
    pub output_chars: i64,
    pub context_chars: i64,
    /// What counts toward the allowance.
    pub counted_chars: i64,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    /// Started past a limit because the tenant allows overrun.
    pub over_limit: bool,
}

impl UsageRecord {
    /// The counter scopes this record adds to.
    pub fn scopes(&self) -> Vec<String> {
        scopes_for(&self.user_id, &self.dept_chain)
    }
}

/// `tenant`, `d:<id>` for each department from the top down, `u:<id>`.
pub fn scopes_for(user_id: &str, dept_chain: &[String]) -> Vec<String> {
    let mut s = Vec::with_capacity(dept_chain.len() + 2);
    s.push("tenant".to_string());
    s.extend(dept_chain.iter().map(|d| format!("d:{d}")));
    s.push(format!("u:{user_id}"));
    s
}

/// Sums over a set of records.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    pub requests: i64,
    pub input_chars: i64,
    pub output_chars: i64,
    pub context_chars: i64,
    pub counted_chars: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub over_limit: i64,
}

/// Whose records a report covers.
#[derive(Clone, Debug, Default)]
pub struct UsageFilter {
    pub user_id: Option<String>,
    /// A department and everything below it, by its chain of ids joined with `/`.
    pub dept_chain: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UserUsage {
    pub user_id: String,
    pub login_id: String,
    pub name: String,
    pub department_path: String,
    pub totals: UsageTotals,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UsageReport {
    pub totals: UsageTotals,
    /// Counted characters per day of the month (only days with use).
    pub daily: Vec<(i64, i64)>,
    pub by_department: Vec<(String, UsageTotals)>,
    pub by_model: Vec<(String, UsageTotals)>,
    pub top_users: Vec<UserUsage>,
}

const SUMS: &str = "COUNT(*) AS requests, \
    CAST(COALESCE(SUM(input_chars), 0) AS BIGINT) AS input_chars, \
    CAST(COALESCE(SUM(output_chars), 0) AS BIGINT) AS output_chars, \
    CAST(COALESCE(SUM(context_chars), 0) AS BIGINT) AS context_chars, \
    CAST(COALESCE(SUM(counted_chars), 0) AS BIGINT) AS counted_chars, \
    CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
    CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
    CAST(COALESCE(SUM(over_limit), 0) AS BIGINT) AS over_limit";

fn totals_from(r: &AnyRow) -> Result<UsageTotals> {
    Ok(UsageTotals {
        requests: get_i64(r, "requests")?,
        input_chars: get_i64(r, "input_chars")?,
        output_chars: get_i64(r, "output_chars")?,
        context_chars: get_i64(r, "context_chars")?,
        counted_chars: get_i64(r, "counted_chars")?,
        input_tokens: get_i64(r, "input_tokens")?,
        output_tokens: get_i64(r, "output_tokens")?,
        over_limit: get_i64(r, "over_limit")?,
    })
}

/// Writes a record and adds it to the running totals, inside the caller's transaction.
pub(crate) async fn insert_usage(conn: &mut sqlx::AnyConnection, rec: &UsageRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO usage_events (id, tenant_id, month, day, at, user_id, user_login, user_name, department_id, \
         department_path, dept_chain, model_id, model_name, message_id, status, input_chars, output_chars, \
         context_chars, counted_chars, input_tokens, output_tokens, over_limit) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
    )
    .bind(domain::ids::new_id())
    .bind(&rec.tenant_id)
    .bind(&rec.month)
    .bind(rec.day)
    .bind(rec.at)
    .bind(&rec.user_id)
    .bind(&rec.user_login)
    .bind(&rec.user_name)
    .bind(&rec.department_id)
    .bind(&rec.department_path)
    .bind(rec.dept_chain.join("/"))
    .bind(&rec.model_id)
    .bind(&rec.model_name)
    .bind(&rec.message_id)
    .bind(&rec.status)
    .bind(rec.input_chars)
    .bind(rec.output_chars)
    .bind(rec.context_chars)
    .bind(rec.counted_chars)
    .bind(rec.input_tokens)
    .bind(rec.output_tokens)
    .bind(i64::from(rec.over_limit))
    .execute(&mut *conn)
    .await?;
    if rec.counted_chars != 0 {
        // One statement for every scope: the writer is shared, so fewer round trips matter.
        let scopes = rec.scopes();
        let rows: Vec<String> = (0..scopes.len())
            .map(|i| format!("($1, $2, ${}, $3)", i + 4))
            .collect();
        let sql = format!(
            "INSERT INTO usage_counters (tenant_id, month, scope, used) VALUES {} \
             ON CONFLICT (tenant_id, month, scope) DO UPDATE SET used = usage_counters.used + excluded.used",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(&rec.tenant_id)
            .bind(&rec.month)
            .bind(rec.counted_chars);
        for scope in &scopes {
            q = q.bind(scope);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

impl Store {
    /// Records a request's usage on its own (when its answer could not be stored).
    pub async fn record_usage(&self, rec: &UsageRecord) -> Result<()> {
        let mut tx = self.write_tx().await?;
        insert_usage(&mut tx, rec).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Settled characters this month for each of these scopes (missing ones are 0).
    pub async fn usage_used(
        &self,
        tenant_id: &str,
        month: &str,
        scopes: &[String],
    ) -> Result<HashMap<String, i64>> {
        if scopes.is_empty() {
            return Ok(HashMap::new());
        }
        let marks: Vec<String> = (0..scopes.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "SELECT scope, used FROM usage_counters WHERE tenant_id = $1 AND month = $2 AND scope IN ({})",
            marks.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(tenant_id).bind(month);
        for s in scopes {
            q = q.bind(s);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = HashMap::new();
        for r in &rows {
            out.insert(get_str(r, "scope")?, get_i64(r, "used")?);
        }
        Ok(out)
    }

    /// Department allocations: department id → characters a month.
    pub async fn usage_allocations(&self, tenant_id: &str) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query(
            "SELECT department_id, monthly_chars FROM usage_allocations WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((get_str(r, "department_id")?, get_i64(r, "monthly_chars")?)))
            .collect()
    }

    /// Caps set for individual users: user id → characters a month.
    pub async fn usage_user_caps(&self, tenant_id: &str) -> Result<HashMap<String, i64>> {
        let rows =
            sqlx::query("SELECT user_id, monthly_chars FROM usage_user_caps WHERE tenant_id = $1")
                .bind(tenant_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((get_str(r, "user_id")?, get_i64(r, "monthly_chars")?)))
            .collect()
    }

    /// Sets several departments' allocations at once (`None` removes one): all or none.
    pub async fn set_usage_allocations(
        &self,
        tenant_id: &str,
        changes: &[(String, Option<i64>)],
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        for (id, chars) in changes {
            sqlx::query(
                "DELETE FROM usage_allocations WHERE tenant_id = $1 AND department_id = $2",
            )
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if let Some(c) = chars {
                sqlx::query("INSERT INTO usage_allocations (tenant_id, department_id, monthly_chars, updated_at) VALUES ($1, $2, $3, $4)")
                    .bind(tenant_id)
                    .bind(id)
                    .bind(c)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            append(
                &mut tx,
                &audit.clone().with(
                    "usage.allocation",
                    format!("department:{id}"),
                    serde_json::json!({"monthly_chars": chars}),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Users with a cap of their own: (login id, name, department path, characters).
    pub async fn usage_capped_users(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<(String, String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT u.login_id, u.display_name, d.path, c.monthly_chars FROM usage_user_caps c \
             JOIN users u ON u.id = c.user_id JOIN departments d ON d.id = u.department_id \
             WHERE c.tenant_id = $1 ORDER BY u.login_id",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_str(r, "login_id")?,
                    get_str(r, "display_name")?,
                    get_str(r, "path")?,
                    get_i64(r, "monthly_chars")?,
                ))
            })
            .collect()
    }

    /// Sets (or with `None` removes) a user's own cap.
    pub async fn set_usage_user_cap(
        &self,
        tenant_id: &str,
        user_id: &str,
        chars: Option<i64>,
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        self.set_limit_row(
            "usage_user_caps",
            "user_id",
            tenant_id,
            user_id,
            chars,
            now,
            audit.with(
                "usage.user_cap",
                format!("user:{user_id}"),
                serde_json::json!({"monthly_chars": chars}),
            ),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn set_limit_row(
        &self,
        table: &str,
        key: &str,
        tenant_id: &str,
        id: &str,
        chars: Option<i64>,
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE tenant_id = $1 AND {key} = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if let Some(c) = chars {
            sqlx::query(&format!(
                "INSERT INTO {table} (tenant_id, {key}, monthly_chars, updated_at) VALUES ($1, $2, $3, $4)"
            ))
            .bind(tenant_id)
            .bind(id)
            .bind(c)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        append(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    fn usage_where(f: &UsageFilter, first: usize) -> (String, Vec<String>) {
        let mut sql = String::new();
        let mut binds = Vec::new();
        let mut n = first;
        if let Some(u) = &f.user_id {
            sql.push_str(&format!(" AND user_id = ${n}"));
            binds.push(u.clone());
            n += 1;
        }
        if let Some(c) = &f.dept_chain {
            sql.push_str(&format!(
                " AND (dept_chain = ${n} OR dept_chain LIKE ${} ESCAPE '\\')",
                n + 1
            ));
            binds.push(c.clone());
            binds.push(format!("{}/%", like_escape(c)));
        }
        (sql, binds)
    }

    async fn usage_rows(
        &self,
        select: &str,
        tenant_id: &str,
        month: &str,
        f: &UsageFilter,
        tail: &str,
    ) -> Result<Vec<AnyRow>> {
        let (cond, binds) = Self::usage_where(f, 3);
        let sql = format!(
            "SELECT {select} FROM usage_events WHERE tenant_id = $1 AND month = $2{cond} {tail}"
        );
        let mut q = sqlx::query(&sql).bind(tenant_id).bind(month);
        for b in binds {
            q = q.bind(b);
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// The figures of one month for the usage pages.
    pub async fn usage_report(
        &self,
        tenant_id: &str,
        month: &str,
        f: &UsageFilter,
        top_users: i64,
    ) -> Result<UsageReport> {
        let mut rep = UsageReport::default();
        if let Some(r) = self
            .usage_rows(SUMS, tenant_id, month, f, "")
            .await?
            .first()
        {
            rep.totals = totals_from(r)?;
        }
        for r in self
            .usage_rows(
                "day, CAST(COALESCE(SUM(counted_chars), 0) AS BIGINT) AS counted",
                tenant_id,
                month,
                f,
                "GROUP BY day ORDER BY day",
            )
            .await?
        {
            rep.daily
                .push((get_i64(&r, "day")?, get_i64(&r, "counted")?));
        }
        for r in self
            .usage_rows(
                &format!("department_path, {SUMS}"),
                tenant_id,
                month,
                f,
                "GROUP BY department_path ORDER BY counted_chars DESC, department_path",
            )
            .await?
        {
            rep.by_department
                .push((get_str(&r, "department_path")?, totals_from(&r)?));
        }
        for r in self
            .usage_rows(
                &format!("model_name, {SUMS}"),
                tenant_id,
                month,
                f,
                "GROUP BY model_name ORDER BY counted_chars DESC, model_name",
            )
            .await?
        {
            rep.by_model
                .push((get_str(&r, "model_name")?, totals_from(&r)?));
        }
        if top_users > 0 {
            for r in self
                .usage_rows(
                    &format!("user_id, MAX(user_login) AS login, MAX(user_name) AS name, MAX(department_path) AS dept, {SUMS}"),
                    tenant_id,
                    month,
                    f,
                    &format!("GROUP BY user_id ORDER BY counted_chars DESC, login LIMIT {top_users}"),
                )
                .await?
            {
                rep.top_users.push(UserUsage {
                    user_id: get_str(&r, "user_id")?,
                    login_id: get_opt_str(&r, "login")?.unwrap_or_default(),
                    name: get_opt_str(&r, "name")?.unwrap_or_default(),
                    department_path: get_opt_str(&r, "dept")?.unwrap_or_default(),
                    totals: totals_from(&r)?,
                });
            }
        }
        Ok(rep)
    }

    /// Counted characters per month for `months` (`YYYY-MM` keys), oldest first.
    pub async fn usage_by_month(
        &self,
        tenant_id: &str,
        months: &[String],
        f: &UsageFilter,
    ) -> Result<Vec<(String, i64)>> {
        let (Some(first), Some(last)) = (months.first(), months.last()) else {
            return Ok(Vec::new());
        };
        let (cond, binds) = Self::usage_where(f, 4);
        let sql = format!(
            "SELECT month, CAST(COALESCE(SUM(counted_chars), 0) AS BIGINT) AS counted FROM usage_events \
             WHERE tenant_id = $1 AND month >= $2 AND month <= $3{cond} GROUP BY month"
        );
        let mut q = sqlx::query(&sql).bind(tenant_id).bind(first).bind(last);
        for b in binds {
            q = q.bind(b);
        }
        let mut found = HashMap::new();
        for r in q.fetch_all(&self.pool).await? {
            found.insert(get_str(&r, "month")?, get_i64(&r, "counted")?);
        }
        Ok(months
            .iter()
            .map(|m| (m.clone(), found.get(m).copied().unwrap_or(0)))
            .collect())
    }
}
