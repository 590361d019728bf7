//! Usage pages, CSV and API (M4): my own use, my department's (department admins), the
//! whole tenant's (tenant admins and auditors), month by month in JST; and the tenant
//! admin's page for the allowance, department allocations and user caps.

use crate::app::{Authed, Shared};
use crate::charts;
use crate::csvout;
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::pages::{render, render_status, Layout};
use crate::usage::{self as meter, LimitView};
use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::policy::{self, Decision};
use domain::settings::FieldError;
use domain::usage::{self, grouped, Level, Month};
use serde::Deserialize;
use serde_json::{json, Value};
use storage::{UsageFilter, UsageReport, UsageTotals};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/usage", get(usage_page))
        .route("/usage/meter", get(meter_fragment))
        .route("/usage/export.csv", get(usage_csv))
        .route("/api/v1/usage", get(api_usage))
        .route("/admin/usage", get(limits_page).post(limits_save))
        .route("/admin/usage/allocations", post(allocations_save))
        .route("/admin/usage/caps", post(cap_save))
}

// ---------------------------------------------------------------- which figures

#[derive(Deserialize, Default)]
struct ReportQuery {
    #[serde(default)]
    month: String,
    #[serde(default)]
    view: String,
    #[serde(default)]
    department: String,
    #[serde(default)]
    table: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    Me,
    Department,
    Tenant,
}

impl View {
    fn key(&self) -> &'static str {
        match self {
            View::Me => "me",
            View::Department => "department",
            View::Tenant => "tenant",
        }
    }
}

/// The month asked for: this month when none; never one that has not begun.
fn month_of(a: &Authed, s: &str) -> AppResult<Month> {
    let now = Month::of(a.ctx.now);
    if s.trim().is_empty() {
        return Ok(now);
    }
    let m = Month::parse(s).ok_or_else(|| {
        AppError::BadRequest("月は YYYY-MM の形式で指定してください（例: 2026-11）。".into())
    })?;
    if m > now {
        return Err(AppError::BadRequest(format!(
            "未来の月（{}）は指定できません。{}までの月を指定してください。",
            m.label(),
            now.label()
        )));
    }
    Ok(m)
}

/// One scope's figures for one month.
struct Figures {
    view: View,
    month: Month,
    /// Whose: 「あなた」, a department path, the tenant's name.
    subject: String,
    department_id: String,
    limit: Option<i64>,
    report: UsageReport,
    /// Allocated departments within the scope: (path, allocation, used this month).
    allocations: Vec<(String, i64, i64)>,
    history: Vec<(String, i64)>,
    forecast: Option<i64>,
    is_current: bool,
}

async fn figures(
    state: &Shared,
    a: &Authed,
    view: View,
    department: &str,
    month: Month,
) -> AppResult<Figures> {
    let tenant_id = &a.ctx.tenant.id;
    let catalog = state.catalog(tenant_id).await?;
    let actor = a.actor();
    let user = &a.auth.user;
    let (subject, department_id, filter, limit, top) = match view {
        View::Me => {
            let cap = catalog.user_caps.get(&user.id).copied().or(a
                .ctx
                .tenant
                .settings
                .usage
                .user_monthly_chars);
            (
                "あなた".to_string(),
                String::new(),
                UsageFilter {
                    user_id: Some(user.id.clone()),
                    dept_chain: None,
                },
                cap,
                0,
            )
        }
        View::Department => {
            let id = if department.is_empty() {
                user.department_id.clone()
            } else {
                department.to_string()
            };
            let Some(path) = catalog.department_paths.get(&id) else {
                return Err(AppError::NotFound);
            };
            if policy::view_department_usage(actor, path) != Decision::Allow {
                return Err(AppError::NotFound);
            }
            let chain = meter::dept_chain(&catalog, path);
            (
                path.clone(),
                id.clone(),
                UsageFilter {
                    user_id: None,
                    dept_chain: Some(chain.join("/")),
                },
                catalog.allocations.get(&id).copied(),
                10,
            )
        }
        View::Tenant => {
            if !policy::can_view_tenant_usage(actor) {
                return Err(AppError::NotFound);
            }
            (
                a.ctx.tenant.name.clone(),
                String::new(),
                UsageFilter::default(),
                Some(a.ctx.tenant.settings.usage.monthly_chars),
                10,
            )
        }
    };
    let key = month.key();
    let report = state
        .store
        .usage_report(tenant_id, &key, &filter, top)
        .await?;
    // Allocations inside the scope, with what each has used.
    let mut allocations = Vec::new();
    if view != View::Me {
        let mut allocated: Vec<(String, String, i64)> = catalog
            .allocations
            .iter()
            .filter_map(|(id, chars)| {
                let path = catalog.department_paths.get(id)?;
                let inside = view == View::Tenant || policy::in_subtree(&subject, path);
                inside.then(|| (id.clone(), path.clone(), *chars))
            })
            .collect();
        allocated.sort_by(|x, y| x.1.cmp(&y.1));
        let keys: Vec<String> = allocated
            .iter()
            .map(|(id, _, _)| format!("d:{id}"))
            .collect();
        let used = state.store.usage_used(tenant_id, &key, &keys).await?;
        for (id, path, chars) in allocated {
            let u = used.get(&format!("d:{id}")).copied().unwrap_or(0);
            allocations.push((path, chars, u));
        }
    }
    let mut months = Vec::new();
    let mut m = month;
    for _ in 0..12 {
        months.push(m.key());
        m = m.prev();
    }
    months.reverse();
    let history = state
        .store
        .usage_by_month(tenant_id, &months, &filter)
        .await?;
    let is_current = month == Month::of(a.ctx.now);
    let forecast =
        is_current.then(|| usage::forecast(report.totals.counted_chars, month, a.ctx.now));
    Ok(Figures {
        view,
        month,
        subject,
        department_id,
        limit,
        report,
        allocations,
        history,
        forecast,
        is_current,
    })
}

fn parse_view(a: &Authed, s: &str) -> View {
    match s {
        "department" => View::Department,
        "tenant" => View::Tenant,
        "" if policy::can_view_tenant_usage(a.actor()) => View::Tenant,
        "" if a.actor().role == domain::Role::DepartmentAdmin => View::Department,
        _ => View::Me,
    }
}

// ---------------------------------------------------------------- page

/// One line of a table, with the figures formatted (`1,234`).
pub struct Row {
    pub label: String,
    pub sub: String,
    pub requests: String,
    pub input: String,
    pub output: String,
    pub counted: String,
    pub input_tokens: String,
    pub output_tokens: String,
}

pub struct AllocationRow {
    pub path: String,
    pub limit: String,
    pub used: String,
    pub percent: i64,
    pub level: &'static str,
}

pub struct Tab {
    pub href: String,
    pub label: String,
    pub current: bool,
}

pub struct DeptOption {
    pub id: String,
    pub path: String,
    pub selected: bool,
}

#[derive(Template)]
#[template(path = "usage.html")]
struct UsagePage {
    l: Layout,
    tabs: Vec<Tab>,
    view: &'static str,
    month_key: String,
    month_label: String,
    subject: String,
    prev_href: String,
    next_href: String,
    limit: String,
    used: String,
    remaining: String,
    percent: i64,
    level: &'static str,
    notice: String,
    forecast: String,
    forecast_over: bool,
    requests: String,
    breakdown: String,
    daily_chart: String,
    cumulative_chart: String,
    history_chart: String,
    daily: Vec<(String, String)>,
    departments: Vec<Row>,
    models: Vec<Row>,
    users: Vec<Row>,
    allocations: Vec<AllocationRow>,
    history: Vec<(String, String)>,
    dept_options: Vec<DeptOption>,
    csv_base: String,
    over_limit: String,
}

fn level_class(l: Level) -> &'static str {
    match l {
        Level::Normal => "normal",
        Level::Warning => "warning",
        Level::Exhausted => "exhausted",
    }
}

fn query_string(view: View, department: &str, month: Month) -> String {
    let mut q = format!("view={}&month={}", view.key(), month.key());
    if view == View::Department && !department.is_empty() {
        q.push_str(&format!("&department={department}"));
    }
    q
}

async fn usage_page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ReportQuery>,
) -> AppResult<Response> {
    let month = month_of(&a, &q.month)?;
    let view = parse_view(&a, &q.view);
    let f = figures(&state, &a, view, &q.department, month).await?;
    let actor = a.actor();
    let mut tabs = vec![Tab {
        href: format!("/usage?view=me&month={}", month.key()),
        label: "自分".into(),
        current: view == View::Me,
    }];
    if matches!(
        actor.role,
        domain::Role::DepartmentAdmin | domain::Role::TenantAdmin | domain::Role::Auditor
    ) {
        tabs.push(Tab {
            href: format!("/usage?view=department&month={}", month.key()),
            label: "部署".into(),
            current: view == View::Department,
        });
    }
    if policy::can_view_tenant_usage(actor) {
        tabs.push(Tab {
            href: format!("/usage?view=tenant&month={}", month.key()),
            label: "全体".into(),
            current: view == View::Tenant,
        });
    }
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut dept_options: Vec<DeptOption> = if view == View::Department {
        catalog
            .department_paths
            .iter()
            .filter(|(_, p)| policy::view_department_usage(actor, p) == Decision::Allow)
            .map(|(id, p)| DeptOption {
                id: id.clone(),
                path: p.clone(),
                selected: *id == f.department_id,
            })
            .collect()
    } else {
        Vec::new()
    };
    dept_options.sort_by(|x, y| x.path.cmp(&y.path));

    let t = &f.report.totals;
    let days = f.month.days() as usize;
    let mut per_day = vec![0i64; days];
    for (d, v) in &f.report.daily {
        if let Some(slot) = per_day.get_mut((*d as usize).saturating_sub(1)) {
            *slot = *v;
        }
    }
    let shown_days = if f.is_current {
        (usage::day_of_month(a.ctx.now) as usize).min(days)
    } else {
        days
    };
    let daily_data: Vec<(String, i64)> = per_day
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("{}日", i + 1), *v))
        .collect();
    let daily_chart = charts::bars(
        &format!("{} 日別の利用文字数", f.month.label()),
        "文字",
        &daily_data,
        5,
    );
    let cumulative_chart = charts::cumulative(
        &format!("{} 累計と上限", f.month.label()),
        &per_day[..shown_days],
        days,
        f.limit,
        f.forecast,
    );
    let history_data: Vec<(String, i64)> = f
        .history
        .iter()
        .map(|(m, v)| {
            let label = Month::parse(m)
                .map(|m| format!("{}月", m.month))
                .unwrap_or_else(|| m.clone());
            (label, *v)
        })
        .collect();
    let history_chart = charts::bars("過去12か月の利用文字数", "文字", &history_data, 1);
    let (limit_s, remaining, percent, level) = match f.limit {
        Some(l) => (
            grouped(l),
            grouped((l - t.counted_chars).max(0)),
            usage::percent(t.counted_chars, l),
            level_class(usage::level(t.counted_chars, l)),
        ),
        None => (String::new(), String::new(), 0, "normal"),
    };
    let notice = match (f.limit, f.is_current) {
        (Some(l), true) => match usage::level(t.counted_chars, l) {
            Level::Exhausted => format!("今月の上限（{}文字）に達しています。", grouped(l)),
            Level::Warning => format!(
                "今月の上限の{}%を使いました（残り{}文字）。",
                usage::percent(t.counted_chars, l),
                grouped(l - t.counted_chars)
            ),
            Level::Normal => String::new(),
        },
        _ => String::new(),
    };
    let row = |label: &str, sub: &str, t: &UsageTotals| Row {
        label: label.to_string(),
        sub: sub.to_string(),
        requests: grouped(t.requests),
        input: grouped(t.input_chars),
        output: grouped(t.output_chars),
        counted: grouped(t.counted_chars),
        input_tokens: grouped(t.input_tokens),
        output_tokens: grouped(t.output_tokens),
    };
    let csv_base = format!(
        "/usage/export.csv?{}",
        query_string(view, &f.department_id, f.month)
    );
    let page = UsagePage {
        l: Layout::for_user(&a, "利用状況", "usage"),
        tabs,
        view: view.key(),
        month_key: f.month.key(),
        month_label: format!("{}（{}）", f.month.label(), f.month.wareki()),
        subject: f.subject.clone(),
        prev_href: format!(
            "/usage?{}",
            query_string(view, &f.department_id, f.month.prev())
        ),
        next_href: if f.is_current {
            String::new()
        } else {
            format!(
                "/usage?{}",
                query_string(view, &f.department_id, f.month.next())
            )
        },
        limit: limit_s,
        used: grouped(t.counted_chars),
        remaining,
        percent,
        level,
        notice,
        forecast: f.forecast.map(grouped).unwrap_or_default(),
        forecast_over: matches!((f.forecast, f.limit), (Some(fc), Some(l)) if fc > l),
        requests: grouped(t.requests),
        breakdown: format!(
            "内訳: 入力 {} 文字・出力 {} 文字・コンテキスト（添付ファイルやそれまでの会話） {} 文字{}・トークン 入力 {} / 出力 {}",
            grouped(t.input_chars),
            grouped(t.output_chars),
            grouped(t.context_chars),
            if a.ctx.tenant.settings.usage.count_context {
                "（上限に計上）"
            } else {
                "（上限には計上しません）"
            },
            grouped(t.input_tokens),
            grouped(t.output_tokens)
        ),
        daily_chart,
        cumulative_chart,
        history_chart,
        daily: per_day[..shown_days]
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0)
            .map(|(i, v)| (format!("{}日", i + 1), grouped(*v)))
            .collect(),
        departments: f
            .report
            .by_department
            .iter()
            .map(|(p, t)| row(p, "", t))
            .collect(),
        models: f
            .report
            .by_model
            .iter()
            .map(|(m, t)| row(m, "", t))
            .collect(),
        users: f
            .report
            .top_users
            .iter()
            .map(|u| {
                row(
                    &format!("{}（{}）", u.name, u.login_id),
                    &u.department_path,
                    &u.totals,
                )
            })
            .collect(),
        allocations: f
            .allocations
            .iter()
            .map(|(p, l, u)| AllocationRow {
                path: p.clone(),
                limit: grouped(*l),
                used: grouped(*u),
                percent: usage::percent(*u, *l),
                level: level_class(usage::level(*u, *l)),
            })
            .collect(),
        history: f.history.iter().map(|(m, v)| (m.clone(), grouped(*v))).collect(),
        dept_options,
        csv_base,
        over_limit: if t.over_limit > 0 {
            grouped(t.over_limit)
        } else {
            String::new()
        },
    };
    render(&page)
}

// ---------------------------------------------------------------- the meter by the input box

#[derive(Template)]
#[template(path = "usage_meter.html")]
pub struct MeterFragment {
    pub limits: Vec<LimitView>,
    pub notice: String,
    pub notice_level: &'static str,
}

pub async fn meter_view(state: &Shared, a: &Authed) -> AppResult<MeterFragment> {
    let limits = meter::my_limits(state, a).await?;
    let (notice_level, notice) =
        match meter::notice(&limits, a.ctx.tenant.settings.usage.allow_overrun) {
            Some((l, m)) => (level_class(l), m),
            None => ("normal", String::new()),
        };
    Ok(MeterFragment {
        limits,
        notice,
        notice_level,
    })
}

/// Limits at or past 80 % that an admin should know of: the whole tenant (tenant admins and
/// auditors) and the department allocations within the admin's view.
pub async fn admin_alerts(state: &Shared, a: &Authed) -> AppResult<Vec<(&'static str, String)>> {
    let actor = a.actor();
    let tenant_wide = policy::can_view_tenant_usage(actor);
    if !tenant_wide && actor.role != domain::Role::DepartmentAdmin {
        return Ok(Vec::new());
    }
    let tenant_id = &a.ctx.tenant.id;
    let catalog = state.catalog(tenant_id).await?;
    let month = Month::of(a.ctx.now).key();
    let mut scopes: Vec<(String, String, i64)> = Vec::new();
    if tenant_wide {
        scopes.push((
            "tenant".into(),
            "全体".into(),
            a.ctx.tenant.settings.usage.monthly_chars,
        ));
    }
    for (id, chars) in &catalog.allocations {
        if let Some(path) = catalog.department_paths.get(id) {
            if policy::view_department_usage(actor, path) == Decision::Allow {
                scopes.push((format!("d:{id}"), format!("{path}への配分"), *chars));
            }
        }
    }
    let keys: Vec<String> = scopes.iter().map(|s| s.0.clone()).collect();
    let used = state.store.usage_used(tenant_id, &month, &keys).await?;
    let mut out = Vec::new();
    for (key, name, limit) in scopes {
        let u = used.get(&key).copied().unwrap_or(0);
        match usage::level(u, limit) {
            Level::Normal => {}
            l => out.push((
                level_class(l),
                format!(
                    "今月の{name}: {}文字のうち{}文字を使用（{}%）{}",
                    grouped(limit),
                    grouped(u),
                    usage::percent(u, limit),
                    if l == Level::Exhausted {
                        "。上限に達しています。"
                    } else {
                        "。"
                    }
                ),
            )),
        }
    }
    out.sort();
    Ok(out)
}

async fn meter_fragment(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    render(&meter_view(&state, &a).await?)
}

// ---------------------------------------------------------------- CSV

const TOTAL_HEADERS: [&str; 8] = [
    "利用回数",
    "入力文字数",
    "出力文字数",
    "コンテキスト文字数",
    "計上文字数",
    "入力トークン",
    "出力トークン",
    "上限超過での利用回数",
];

/// A CSV row: the leading cells, then the totals.
fn row_with_totals(lead: Vec<String>, t: &UsageTotals) -> Vec<String> {
    let mut r = lead;
    r.extend(total_cells(t));
    r
}

fn total_cells(t: &UsageTotals) -> Vec<String> {
    [
        t.requests,
        t.input_chars,
        t.output_chars,
        t.context_chars,
        t.counted_chars,
        t.input_tokens,
        t.output_tokens,
        t.over_limit,
    ]
    .iter()
    .map(|v| v.to_string())
    .collect()
}

async fn usage_csv(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ReportQuery>,
) -> AppResult<Response> {
    let month = month_of(&a, &q.month)?;
    let view = parse_view(&a, &q.view);
    let f = figures(&state, &a, view, &q.department, month).await?;
    let key = f.month.key();
    let (name, headers, rows): (&str, Vec<&str>, Vec<Vec<String>>) = match q.table.as_str() {
        "" | "daily" => {
            let mut per_day = vec![0i64; f.month.days() as usize];
            for (d, v) in &f.report.daily {
                if let Some(s) = per_day.get_mut((*d as usize).saturating_sub(1)) {
                    *s = *v;
                }
            }
            let mut acc = 0;
            let rows = per_day
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    acc += v;
                    vec![
                        format!("{key}-{:02}", i + 1),
                        v.to_string(),
                        acc.to_string(),
                        f.limit.map(|l| l.to_string()).unwrap_or_default(),
                    ]
                })
                .collect();
            ("daily", vec!["日付", "計上文字数", "累計", "上限"], rows)
        }
        "departments" if view != View::Me => {
            let rows = f
                .report
                .by_department
                .iter()
                .map(|(p, t)| row_with_totals(vec![p.clone()], t))
                .collect();
            let mut h = vec!["部署"];
            h.extend(TOTAL_HEADERS);
            ("departments", h, rows)
        }
        "models" => {
            let rows = f
                .report
                .by_model
                .iter()
                .map(|(m, t)| row_with_totals(vec![m.clone()], t))
                .collect();
            let mut h = vec!["AIモデル"];
            h.extend(TOTAL_HEADERS);
            ("models", h, rows)
        }
        "users" if view != View::Me => {
            let rows = f
                .report
                .top_users
                .iter()
                .map(|u| {
                    row_with_totals(
                        vec![
                            u.login_id.clone(),
                            u.name.clone(),
                            u.department_path.clone(),
                        ],
                        &u.totals,
                    )
                })
                .collect();
            let mut h = vec!["ログインID", "氏名", "部署"];
            h.extend(TOTAL_HEADERS);
            ("top-users", h, rows)
        }
        "months" => {
            let rows = f
                .history
                .iter()
                .map(|(m, v)| vec![m.clone(), v.to_string()])
                .collect();
            ("months", vec!["月", "計上文字数"], rows)
        }
        _ => {
            return Err(AppError::BadRequest(
                "出力する表を選んでください（daily, departments, models, users, months）。".into(),
            ))
        }
    };
    let body =
        csvout::build(&headers, rows).map_err(|e| AppError::Internal(format!("csv: {e}")))?;
    Ok(csvout::response(
        &format!("usage-{}-{}-{key}.csv", view.key(), name),
        body,
    ))
}

// ---------------------------------------------------------------- API

fn totals_json(t: &UsageTotals) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn figures_json(f: &Figures, with_users: bool) -> Value {
    let mut v = json!({
        "subject": f.subject,
        "limit": f.limit,
        "counted_chars": f.report.totals.counted_chars,
        "remaining": f.limit.map(|l| (l - f.report.totals.counted_chars).max(0)),
        "level": f.limit.map(|l| usage::level(f.report.totals.counted_chars, l)),
        "forecast": f.forecast,
        "totals": totals_json(&f.report.totals),
        "daily": f.report.daily.iter().map(|(d, c)| json!({"day": d, "counted_chars": c})).collect::<Vec<_>>(),
        "by_model": f.report.by_model.iter().map(|(m, t)| json!({"model": m, "totals": totals_json(t)})).collect::<Vec<_>>(),
        "months": f.history.iter().map(|(m, c)| json!({"month": m, "counted_chars": c})).collect::<Vec<_>>(),
    });
    if f.view != View::Me {
        v["by_department"] = f
            .report
            .by_department
            .iter()
            .map(|(p, t)| json!({"department": p, "totals": totals_json(t)}))
            .collect();
        v["allocations"] = f
            .allocations
            .iter()
            .map(|(p, l, u)| json!({"department": p, "limit": l, "counted_chars": u}))
            .collect();
    }
    if with_users {
        v["top_users"] = f
            .report
            .top_users
            .iter()
            .map(|u| json!({"login_id": u.login_id, "name": u.name, "department": u.department_path, "totals": totals_json(&u.totals)}))
            .collect();
    }
    v
}

async fn api_usage(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ReportQuery>,
) -> AppResult<Json<Value>> {
    let month = month_of(&a, &q.month)?;
    let me = figures(&state, &a, View::Me, "", month).await?;
    let mut out = json!({
        "month": month.key(),
        "me": figures_json(&me, false),
    });
    if month == Month::of(a.ctx.now) {
        out["limits"] =
            serde_json::to_value(meter::my_limits(&state, &a).await?).unwrap_or(Value::Null);
    }
    let actor = a.actor();
    if matches!(
        actor.role,
        domain::Role::DepartmentAdmin | domain::Role::TenantAdmin | domain::Role::Auditor
    ) {
        let d = figures(&state, &a, View::Department, &q.department, month).await?;
        out["department"] = figures_json(&d, true);
    }
    if policy::can_view_tenant_usage(actor) {
        let t = figures(&state, &a, View::Tenant, "", month).await?;
        out["tenant"] = figures_json(&t, true);
    }
    Ok(Json(out))
}

// ---------------------------------------------------------------- limits (tenant admin)

fn require_limits(a: &Authed) -> AppResult<()> {
    if policy::can_set_usage_limits(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

pub struct AllocationInput {
    pub id: String,
    pub path: String,
    pub depth: usize,
    pub value: String,
    pub error: String,
}

pub struct CapRow {
    pub login_id: String,
    pub name: String,
    pub department_path: String,
    pub value: String,
}

#[derive(Template)]
#[template(path = "admin/usage_limits.html")]
struct LimitsPage {
    l: Layout,
    notice: String,
    errors: Vec<FieldError>,
    monthly_chars: String,
    user_monthly_chars: String,
    count_context: bool,
    allow_overrun: bool,
    allocations: Vec<AllocationInput>,
    allocation_sum: String,
    oversubscribed: bool,
    caps: Vec<CapRow>,
    cap_login: String,
    cap_value: String,
}

#[derive(Deserialize, Default)]
struct NoticeQuery {
    #[serde(default)]
    notice: String,
}

async fn limits_view(
    state: &Shared,
    a: &Authed,
    notice: &str,
    errors: Vec<FieldError>,
    typed: Option<&std::collections::HashMap<String, String>>,
) -> AppResult<LimitsPage> {
    let tenant_id = &a.ctx.tenant.id;
    let catalog = state.catalog(tenant_id).await?;
    let u = &a.ctx.tenant.settings.usage;
    let mut allocations: Vec<AllocationInput> = catalog
        .department_paths
        .iter()
        .map(|(id, path)| {
            let value = match typed.and_then(|t| t.get(&format!("alloc_{id}"))) {
                Some(v) => v.clone(),
                None => catalog
                    .allocations
                    .get(id)
                    .map(|v| grouped(*v))
                    .unwrap_or_default(),
            };
            AllocationInput {
                id: id.clone(),
                path: path.clone(),
                depth: path.matches('/').count(),
                error: errors
                    .iter()
                    .filter(|e| e.field == format!("alloc_{id}"))
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join(" "),
                value,
            }
        })
        .collect();
    allocations.sort_by(|x, y| x.path.cmp(&y.path));
    // Top-level allocations only: a department's allocation is part of its parent's.
    let top_sum: i64 = catalog
        .allocations
        .iter()
        .filter(|(id, _)| {
            let Some(path) = catalog.department_paths.get(*id) else {
                return false;
            };
            !catalog.allocations.keys().any(|other| {
                other != *id
                    && catalog
                        .department_paths
                        .get(other)
                        .is_some_and(|p| policy::in_subtree(p, path))
            })
        })
        .map(|(_, v)| *v)
        .sum();
    let caps: Vec<CapRow> = state
        .store
        .usage_capped_users(tenant_id)
        .await?
        .into_iter()
        .map(|(login_id, name, department_path, c)| CapRow {
            login_id,
            name,
            department_path,
            value: grouped(c),
        })
        .collect();
    Ok(LimitsPage {
        l: Layout::for_user(a, "利用上限", "usage_limits"),
        notice: notice.to_string(),
        errors,
        monthly_chars: typed
            .and_then(|t| t.get("monthly_chars").cloned())
            .unwrap_or_else(|| grouped(u.monthly_chars)),
        user_monthly_chars: typed
            .and_then(|t| t.get("user_monthly_chars").cloned())
            .unwrap_or_else(|| u.user_monthly_chars.map(grouped).unwrap_or_default()),
        count_context: u.count_context,
        allow_overrun: u.allow_overrun,
        allocations,
        allocation_sum: grouped(top_sum),
        oversubscribed: top_sum > u.monthly_chars,
        caps,
        cap_login: typed
            .and_then(|t| t.get("login_id").cloned())
            .unwrap_or_default(),
        cap_value: typed
            .and_then(|t| t.get("monthly_chars_cap").cloned())
            .unwrap_or_default(),
    })
}

async fn limits_page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<NoticeQuery>,
) -> AppResult<Response> {
    require_limits(&a)?;
    let notice = match q.notice.as_str() {
        "saved" => "利用上限を保存しました。",
        "allocations" => "部署への配分を保存しました。",
        "cap" => "職員の上限を保存しました。",
        _ => "",
    };
    render(&limits_view(&state, &a, notice, Vec::new(), None).await?)
}

fn field(errors: &mut Vec<FieldError>, field: &str, message: String) {
    errors.push(FieldError {
        field: field.into(),
        message,
    });
}

async fn limits_save(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> AppResult<Response> {
    require_limits(&a)?;
    let mut errors = Vec::new();
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    let monthly = match usage::parse_limit("月間の利用上限", get("monthly_chars")) {
        Ok(v) => Some(v),
        Err(e) => {
            field(&mut errors, "monthly_chars", e);
            None
        }
    };
    let user_cap = if get("user_monthly_chars").trim().is_empty() {
        None
    } else {
        match usage::parse_limit("職員1人あたりの上限", get("user_monthly_chars")) {
            Ok(v) => Some(v),
            Err(e) => {
                field(&mut errors, "user_monthly_chars", e);
                None
            }
        }
    };
    if errors.is_empty() {
        let mut s = a.ctx.tenant.settings.clone();
        s.usage.monthly_chars = monthly.unwrap_or(s.usage.monthly_chars);
        s.usage.user_monthly_chars = user_cap;
        s.usage.count_context = get("count_context") == "on";
        s.usage.allow_overrun = get("allow_overrun") == "on";
        match crate::ops::update_settings(&state, &a, &s).await {
            Ok(()) => return Ok(Redirect::to("/admin/usage?notice=saved").into_response()),
            Err(AppError::Validation(e)) => errors = e,
            Err(e) => return Err(e),
        }
    }
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &limits_view(&state, &a, "", errors, Some(&f)).await?,
    )
}

async fn allocations_save(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> AppResult<Response> {
    require_limits(&a)?;
    let tenant_id = a.ctx.tenant.id.clone();
    let catalog = state.catalog(&tenant_id).await?;
    let total = a.ctx.tenant.settings.usage.monthly_chars;
    let mut errors = Vec::new();
    let mut wanted: std::collections::HashMap<String, Option<i64>> = Default::default();
    for (k, v) in &f {
        let Some(id) = k.strip_prefix("alloc_") else {
            continue;
        };
        // A department of another tenant, or one deleted meanwhile, is simply unknown.
        let Some(path) = catalog.department_paths.get(id) else {
            return Err(AppError::NotFound);
        };
        if v.trim().is_empty() {
            wanted.insert(id.to_string(), None);
            continue;
        }
        match usage::parse_limit(&format!("{path}への配分"), v) {
            Ok(c) if c > total => field(
                &mut errors,
                k,
                format!(
                    "{path}への配分（{}文字）が全体の上限（{}文字）を超えています。",
                    grouped(c),
                    grouped(total)
                ),
            ),
            Ok(c) => {
                wanted.insert(id.to_string(), Some(c));
            }
            Err(e) => field(&mut errors, k, e),
        }
    }
    // A department's allocation is part of the one above it, so it cannot be larger.
    for (id, chars) in &wanted {
        let (Some(c), Some(path)) = (chars, catalog.department_paths.get(id)) else {
            continue;
        };
        for (other, oc) in &wanted {
            let (Some(oc), Some(op)) = (oc, catalog.department_paths.get(other)) else {
                continue;
            };
            if other != id && policy::in_subtree(op, path) && c > oc {
                field(
                    &mut errors,
                    &format!("alloc_{id}"),
                    format!(
                        "{path}への配分（{}文字）が上位の{op}への配分（{}文字）を超えています。",
                        grouped(*c),
                        grouped(*oc)
                    ),
                );
            }
        }
    }
    if !errors.is_empty() {
        return render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &limits_view(&state, &a, "", errors, Some(&f)).await?,
        );
    }
    let changes: Vec<(String, Option<i64>)> = wanted
        .into_iter()
        .filter(|(id, c)| catalog.allocations.get(id).copied() != *c)
        .collect();
    state
        .store
        .set_usage_allocations(&tenant_id, &changes, a.ctx.now, a.audit())
        .await?;
    Ok(Redirect::to("/admin/usage?notice=allocations").into_response())
}

async fn cap_save(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> AppResult<Response> {
    require_limits(&a)?;
    let login = f.get("login_id").map(|s| s.trim()).unwrap_or("");
    let value = f.get("monthly_chars_cap").map(|s| s.trim()).unwrap_or("");
    let mut errors = Vec::new();
    let user = if login.is_empty() {
        field(
            &mut errors,
            "login_id",
            "ログインIDを入力してください。".into(),
        );
        None
    } else {
        match state.store.user_by_login(&a.ctx.tenant.id, login).await {
            Ok(u) => Some(u),
            Err(storage::StorageError::NotFound) => {
                field(
                    &mut errors,
                    "login_id",
                    format!("ログインID「{login}」の職員は見つかりません。"),
                );
                None
            }
            Err(e) => return Err(e.into()),
        }
    };
    let chars = if value.is_empty() {
        None
    } else {
        match usage::parse_limit("職員の上限", value) {
            Ok(c) if c > a.ctx.tenant.settings.usage.monthly_chars => {
                field(
                    &mut errors,
                    "monthly_chars_cap",
                    "職員の上限は全体の上限以下にしてください。".into(),
                );
                None
            }
            Ok(c) => Some(c),
            Err(e) => {
                field(&mut errors, "monthly_chars_cap", e);
                None
            }
        }
    };
    match (user, errors.is_empty()) {
        (Some(u), true) => {
            state
                .store
                .set_usage_user_cap(&a.ctx.tenant.id, &u.id, chars, a.ctx.now, a.audit())
                .await?;
            Ok(Redirect::to("/admin/usage?notice=cap").into_response())
        }
        _ => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &limits_view(&state, &a, "", errors, Some(&f)).await?,
        ),
    }
}
