//! Retention (M6, S16) for tenant admins: how many months chat records are kept, legal
//! holds on a user or a department, and the job that removes what is past the policy.

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::ops;
use crate::pages::{render, render_status, Layout};
use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use storage::{AuditEvent, Purged};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/retention", get(page).post(save))
        .route("/admin/retention/holds", post(add_hold))
        .route("/admin/retention/holds/{id}/delete", post(remove_hold))
}

/// Removes, for every tenant, the chat records older than its policy (legal holds
/// excepted). Run by the housekeeping task; safe to run at any time and as often as wanted.
pub async fn run(state: &Shared) -> Result<Vec<(String, Purged)>, storage::StorageError> {
    let now = state.now();
    let mut out = Vec::new();
    for t in state.store.list_tenants().await? {
        let cutoff = domain::time::months_before(now, t.settings.retention.chat_months);
        let ev = AuditEvent {
            tenant_id: t.id.clone(),
            at_ms: now,
            actor_login: "system:retention".into(),
            ..Default::default()
        };
        let purged = state.store.purge_chat_before(&t.id, cutoff, ev).await?;
        if purged != Purged::default() {
            tracing::info!(tenant = %t.id, ?purged, "records past the retention policy removed");
        }
        out.push((t.id, purged));
    }
    Ok(out)
}

pub struct HoldView {
    pub id: String,
    pub target: String,
    pub reason: String,
    pub since: String,
}

#[derive(Template)]
#[template(path = "admin/retention.html")]
struct RetentionPage {
    l: Layout,
    months: String,
    holds: Vec<HoldView>,
    departments: Vec<(String, String)>,
    notice: String,
    errors: Vec<String>,
}

async fn view(
    state: &Shared,
    a: &Authed,
    months: String,
    notice: &str,
    errors: Vec<String>,
) -> AppResult<RetentionPage> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut departments: Vec<(String, String)> = catalog
        .department_paths
        .iter()
        .map(|(id, p)| (id.clone(), p.clone()))
        .collect();
    departments.sort_by(|x, y| x.1.cmp(&y.1));
    let holds = state
        .store
        .legal_holds(&a.ctx.tenant.id)
        .await?
        .into_iter()
        .map(|h| HoldView {
            id: h.id,
            target: h.target,
            reason: h.reason,
            since: domain::time::format_jst(h.created_at),
        })
        .collect();
    Ok(RetentionPage {
        l: Layout::for_user(a, "保存期間", "retention"),
        months,
        holds,
        departments,
        notice: notice.to_string(),
        errors,
    })
}

async fn page(
    State(state): State<Shared>,
    a: Authed,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let notice = match q.get("notice").map(String::as_str) {
        Some("saved") => "保存期間を保存しました。",
        Some("held") => "保全（リーガルホールド）を設定しました。",
        Some("released") => "保全を解除しました。",
        _ => "",
    };
    let months = a.ctx.tenant.settings.retention.chat_months.to_string();
    render(&view(&state, &a, months, notice, Vec::new()).await?)
}

async fn save(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let typed = f.get("chat_months").cloned().unwrap_or_default();
    let err = |m: String| async {
        render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &view(&state, &a, typed.clone(), "", vec![m]).await?,
        )
    };
    let months = match domain::validate::number_in("チャットの保存期間", &typed, 1, 120) {
        Ok(m) => m as u32,
        Err(_) => {
            return err(
                "チャットの保存期間は1〜120か月で指定してください（1か月未満にはできません）。"
                    .into(),
            )
            .await
        }
    };
    let mut s = a.ctx.tenant.settings.clone();
    s.retention.chat_months = months;
    match ops::update_settings(&state, &a, &s).await {
        Ok(()) => Ok(Redirect::to("/admin/retention?notice=saved").into_response()),
        Err(AppError::Validation(e)) => {
            err(e.first().map(|e| e.message.clone()).unwrap_or_default()).await
        }
        Err(e) => Err(e),
    }
}

async fn add_hold(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let login = f.get("login_id").map(|s| s.trim()).unwrap_or("");
    let dept = f.get("department_id").map(|s| s.trim()).unwrap_or("");
    let reason = f.get("reason").map(String::as_str).unwrap_or("");
    let months = a.ctx.tenant.settings.retention.chat_months.to_string();
    let mut errors = Vec::new();
    let reason = match domain::validate::required_line("理由", reason, 200) {
        Ok(r) => r,
        Err(e) => {
            errors.push(e);
            String::new()
        }
    };
    let (user_id, department_id) = match (login.is_empty(), dept.is_empty()) {
        (false, true) => match state.store.user_by_login(&a.ctx.tenant.id, login).await {
            Ok(u) => (Some(u.id), None),
            Err(storage::StorageError::NotFound) => {
                errors.push(format!("ログインID「{login}」の職員は見つかりません。"));
                (None, None)
            }
            Err(e) => return Err(e.into()),
        },
        (true, false) => {
            let catalog = state.catalog(&a.ctx.tenant.id).await?;
            if !catalog.department_paths.contains_key(dept) {
                return Err(AppError::NotFound);
            }
            (None, Some(dept.to_string()))
        }
        _ => {
            errors.push(
                "保全する職員（ログインID）か部署の、どちらか一方を指定してください。".into(),
            );
            (None, None)
        }
    };
    if !errors.is_empty() {
        return render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &view(&state, &a, months, "", errors).await?,
        );
    }
    state
        .store
        .add_legal_hold(
            &a.ctx.tenant.id,
            user_id.as_deref(),
            department_id.as_deref(),
            &reason,
            a.audit(),
        )
        .await?;
    Ok(Redirect::to("/admin/retention?notice=held").into_response())
}

async fn remove_hold(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    state
        .store
        .remove_legal_hold(&a.ctx.tenant.id, &id, a.audit())
        .await?;
    Ok(Redirect::to("/admin/retention?notice=released").into_response())
}
