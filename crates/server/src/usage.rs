//! The check before each chat request against the monthly allowances (M4), and the
//! settlement after it.
//!
//! Characters held by requests still running live in this process's [`Meter`]; a hold is
//! memory only, so a crash can never leave one behind. Settled use comes from the
//! database's running totals:
//! - on the embedded SQLite setup there is one process, so the meter keeps the settled
//!   totals in memory too (read once per scope and month, then added to as requests
//!   settle) and the check is exact and touches no disk;
//! - with several nodes on PostgreSQL every check reads the totals (so each node sees what
//!   the others settled); a node does not see the holds of the others, which lets a limit be
//!   passed by at most the requests in flight elsewhere — the tolerance the requirement
//!   sets.

use crate::app::{Authed, Catalog, Shared};
use crate::error::{AppError, AppResult};
use domain::usage::{self, Admission, Level, Month, ScopeKind, Standing};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One allowance, allocation or cap that applies to a member of staff.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Counter key: `tenant`, `d:<id>`, `u:<id>`.
    pub key: String,
    pub kind: ScopeKind,
    pub name: String,
    pub limit: Option<i64>,
}

/// Where a member of staff's usage is counted: their department chain and every scope.
#[derive(Clone, Debug)]
pub struct Placement {
    pub dept_chain: Vec<String>,
    pub scopes: Vec<Scope>,
}

/// The department ids from the top down to `path`.
pub fn dept_chain(catalog: &Catalog, path: &str) -> Vec<String> {
    let mut chain = Vec::new();
    let mut prefix = String::new();
    for part in path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if let Some(id) = catalog.department_ids.get(&prefix) {
            chain.push(id.clone());
        }
    }
    chain
}

pub fn placement(a: &Authed, catalog: &Catalog) -> Placement {
    let policy = &a.ctx.tenant.settings.usage;
    let user = &a.auth.user;
    let dept_chain = dept_chain(catalog, &user.department_path);
    let mut scopes = vec![Scope {
        key: "tenant".into(),
        kind: ScopeKind::Tenant,
        name: "全体".into(),
        limit: Some(policy.monthly_chars),
    }];
    for id in &dept_chain {
        let name = catalog
            .department_paths
            .get(id)
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or("所属")
            .to_string();
        scopes.push(Scope {
            key: format!("d:{id}"),
            kind: ScopeKind::Department,
            name,
            limit: catalog.allocations.get(id).copied(),
        });
    }
    scopes.push(Scope {
        key: format!("u:{}", user.id),
        kind: ScopeKind::User,
        name: "あなた".into(),
        limit: catalog
            .user_caps
            .get(&user.id)
            .copied()
            .or(policy.user_monthly_chars),
    });
    Placement { dept_chain, scopes }
}

type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    /// (tenant, month, scope) → characters held.
    held: HashMap<Key, i64>,
    /// (tenant, month, scope) → characters settled, when the meter keeps them (SQLite).
    /// A scope is loaded before any hold on it exists, so every settlement of a hold lands
    /// either in the loaded figure (committed before the load read it — impossible, the
    /// hold did not exist) or is added here when the hold ends.
    settled: HashMap<Key, i64>,
    /// Bumped per tenant whenever a hold ends, so a check can tell that a settlement
    /// landed between its read of the totals and its look at the holds.
    generation: HashMap<String, u64>,
}

/// Characters held by chat requests still running on this node.
#[derive(Default)]
pub struct Meter {
    inner: Mutex<Inner>,
    /// Keep settled totals in memory: only when this process is the only writer (SQLite).
    keep_settled: bool,
}

impl Meter {
    pub fn new(keep_settled: bool) -> Meter {
        Meter {
            inner: Mutex::default(),
            keep_settled,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain numbers behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self, tenant_id: &str) -> u64 {
        self.lock().generation.get(tenant_id).copied().unwrap_or(0)
    }

    /// Characters held on this node for these scopes.
    pub fn held(&self, tenant_id: &str, month: &str, keys: &[String]) -> HashMap<String, i64> {
        let inner = self.lock();
        keys.iter()
            .map(|k| {
                let v = inner
                    .held
                    .get(&(tenant_id.to_string(), month.to_string(), k.clone()))
                    .copied()
                    .unwrap_or(0);
                (k.clone(), v)
            })
            .collect()
    }
}

/// Characters held for one running request; released when dropped (after the request's
/// real count has been stored, so the two never both miss it).
pub struct Hold {
    meter: Arc<Meter>,
    tenant_id: String,
    month: String,
    keys: Vec<String>,
    amount: i64,
    /// The real count, once it is stored.
    settled: Option<i64>,
    pub over_limit: bool,
}

impl Hold {
    /// The request's real count has been committed to the database.
    pub fn settled(&mut self, counted: i64) {
        self.settled = Some(counted);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut inner = self.meter.lock();
        for k in &self.keys {
            let key = (self.tenant_id.clone(), self.month.clone(), k.clone());
            if let Some(v) = inner.held.get_mut(&key) {
                *v -= self.amount;
                if *v <= 0 {
                    inner.held.remove(&key);
                }
            }
            if let (Some(c), Some(v)) = (self.settled, inner.settled.get_mut(&key)) {
                *v += c;
            }
        }
        *inner.generation.entry(self.tenant_id.clone()).or_default() += 1;
    }
}

/// Checks the limits that apply to the caller and holds room for a request that counts
/// `input` characters before its answer. Refuses with the Japanese message of the limit
/// that stops it.
pub async fn reserve(
    state: &Shared,
    tenant_id: &str,
    month: Month,
    scopes: &[Scope],
    input: i64,
    allow_overrun: bool,
) -> AppResult<Hold> {
    let month = month.key();
    let keys: Vec<String> = scopes.iter().map(|s| s.key.clone()).collect();
    let limited: Vec<&Scope> = scopes.iter().filter(|s| s.limit.is_some()).collect();
    let limited_keys: Vec<String> = limited.iter().map(|s| s.key.clone()).collect();
    let meter = &state.meter;
    let key = |k: &str| (tenant_id.to_string(), month.clone(), k.to_string());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = meter.generation(tenant_id);
        let used: HashMap<String, i64> = if meter.keep_settled {
            // Every scope of the request, limited or not, is loaded before its hold exists.
            let missing: Vec<String> = {
                let inner = meter.lock();
                keys.iter()
                    .filter(|k| !inner.settled.contains_key(&key(k)))
                    .cloned()
                    .collect()
            };
            if missing.is_empty() {
                HashMap::new()
            } else {
                state.store.usage_used(tenant_id, &month, &missing).await?
            }
        } else {
            state
                .store
                .usage_used(tenant_id, &month, &limited_keys)
                .await?
        };
        let mut inner = meter.lock();
        let settled_of = |inner: &Inner, k: &str| -> i64 {
            if meter.keep_settled {
                inner.settled.get(&key(k)).copied().unwrap_or(0)
            } else {
                used.get(k).copied().unwrap_or(0)
            }
        };
        if meter.keep_settled {
            for k in &keys {
                let v = used.get(k).copied().unwrap_or(0);
                inner.settled.entry(key(k)).or_insert(v);
            }
        } else {
            let now = inner.generation.get(tenant_id).copied().unwrap_or(0);
            if now != before && attempt < 4 {
                // A request settled while the totals were read: read them again.
                continue;
            }
        }
        let standings: Vec<Standing> = limited
            .iter()
            .map(|s| Standing {
                kind: s.kind,
                name: s.name.clone(),
                limit: s.limit.unwrap_or(i64::MAX),
                used: settled_of(&inner, &s.key),
                reserved: inner
                    .held
                    .get(&(tenant_id.to_string(), month.clone(), s.key.clone()))
                    .copied()
                    .unwrap_or(0),
            })
            .collect();
        return match usage::admit(&standings, input, allow_overrun) {
            Admission::Admit {
                reserve,
                over_limit,
            } => {
                for k in &keys {
                    *inner
                        .held
                        .entry((tenant_id.to_string(), month.clone(), k.clone()))
                        .or_default() += reserve;
                }
                drop(inner);
                if over_limit {
                    tracing::warn!(
                        tenant = tenant_id,
                        "chat request started past a usage limit (overrun allowed)"
                    );
                }
                Ok(Hold {
                    meter: meter.clone(),
                    tenant_id: tenant_id.to_string(),
                    month,
                    keys,
                    amount: reserve,
                    settled: None,
                    over_limit,
                })
            }
            Admission::Refuse {
                kind,
                name,
                limit,
                remaining,
                input,
            } => Err(AppError::Quota(usage::refusal_message(
                kind, &name, limit, remaining, input,
            ))),
        };
    }
}

/// One limit as the caller sees it this month.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LimitView {
    pub kind: ScopeKind,
    pub name: String,
    pub limit: i64,
    pub used: i64,
    pub remaining: i64,
    pub percent: i64,
    pub level: Level,
}

impl LimitView {
    pub fn label(&self) -> String {
        match self.kind {
            ScopeKind::Tenant => "全体".into(),
            ScopeKind::Department => self.name.clone(),
            ScopeKind::User => "あなた".into(),
        }
    }
    pub fn remaining_label(&self) -> String {
        usage::grouped(self.remaining.max(0))
    }
    pub fn limit_label(&self) -> String {
        usage::grouped(self.limit)
    }
    pub fn used_label(&self) -> String {
        usage::grouped(self.used)
    }
    pub fn level_class(&self) -> &'static str {
        match self.level {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Exhausted => "exhausted",
        }
    }
}

/// The caller's limits this month (settled plus held on this node), tightest first.
pub async fn my_limits(state: &Shared, a: &Authed) -> AppResult<Vec<LimitView>> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let p = placement(a, &catalog);
    let month = Month::of(a.ctx.now).key();
    let limited: Vec<&Scope> = p.scopes.iter().filter(|s| s.limit.is_some()).collect();
    let keys: Vec<String> = limited.iter().map(|s| s.key.clone()).collect();
    let used = state
        .store
        .usage_used(&a.ctx.tenant.id, &month, &keys)
        .await?;
    let held = state.meter.held(&a.ctx.tenant.id, &month, &keys);
    let mut out: Vec<LimitView> = limited
        .iter()
        .map(|s| {
            let limit = s.limit.unwrap_or(i64::MAX);
            let u = used.get(&s.key).copied().unwrap_or(0) + held.get(&s.key).copied().unwrap_or(0);
            LimitView {
                kind: s.kind,
                name: s.name.clone(),
                limit,
                used: u,
                remaining: limit - u,
                percent: usage::percent(u, limit),
                level: usage::level(u, limit),
            }
        })
        .collect();
    // The user's own first, then the nearest department, then the city.
    out.reverse();
    Ok(out)
}

/// The warning or stop that goes with the tightest of these limits.
pub fn notice(limits: &[LimitView], allow_overrun: bool) -> Option<(Level, String)> {
    let worst = limits
        .iter()
        .filter(|l| l.level != Level::Normal)
        .max_by_key(|l| (l.level == Level::Exhausted, l.percent))?;
    let whose = match worst.kind {
        ScopeKind::Tenant => "全体".to_string(),
        ScopeKind::Department => format!("{}への配分", worst.name),
        ScopeKind::User => "あなたの利用上限".to_string(),
    };
    Some(match worst.level {
        Level::Exhausted if allow_overrun => (
            Level::Exhausted,
            format!("今月の{whose}（{}文字）を超えています。超過分は管理者に報告されます。", worst.limit_label()),
        ),
        Level::Exhausted => (
            Level::Exhausted,
            format!("今月の{whose}（{}文字）を使い切ったため、新しい質問は送信できません。来月1日（日本時間）に戻ります。急ぎの場合は情報管理者にご相談ください。", worst.limit_label()),
        ),
        _ => (
            Level::Warning,
            format!("今月の{whose}の{}%を使いました（残り{}文字）。計画的にご利用ください。", worst.percent, worst.remaining_label()),
        ),
    })
}
