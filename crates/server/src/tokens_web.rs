//! API tokens for a city's own systems (tenant admins): issued with a name, scopes and an
//! expiry, shown once, kept only as a digest; listed with their last use; revoked.

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

/// Scopes a token may carry, with what they allow.
pub const SCOPES: &[(&str, &str)] =
    &[("logs:read", "チャットログの読み出し（/api/v1/admin/logs）")];

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/api-tokens", get(page).post(create))
        .route("/admin/api-tokens/{id}/revoke", post(revoke))
}

pub struct TokenView {
    pub id: String,
    pub name: String,
    pub scopes: String,
    pub created: String,
    pub expires: String,
    pub last_used: String,
    pub state: &'static str,
    pub active: bool,
}

#[derive(Template)]
#[template(path = "admin/api_tokens.html")]
struct TokensPage {
    l: Layout,
    tokens: Vec<TokenView>,
    scopes: &'static [(&'static str, &'static str)],
    issued: String,
    errors: Vec<String>,
    name: String,
    days: String,
}

async fn view(
    state: &Shared,
    a: &Authed,
    issued: String,
    errors: Vec<String>,
    name: &str,
    days: &str,
) -> AppResult<TokensPage> {
    let now = a.ctx.now;
    let tokens = state
        .store
        .list_api_tokens(&a.ctx.tenant.id)
        .await?
        .into_iter()
        .map(|t| {
            let (st, active) = if t.revoked_at.is_some() {
                ("無効化済み", false)
            } else if t.expires_at <= now {
                ("期限切れ", false)
            } else {
                ("有効", true)
            };
            TokenView {
                id: t.id,
                name: t.name,
                scopes: t.scopes.join(", "),
                created: domain::time::format_jst(t.created_at),
                expires: domain::time::format_jst(t.expires_at),
                last_used: t
                    .last_used_at
                    .map(domain::time::format_jst)
                    .unwrap_or_else(|| "未使用".into()),
                state: st,
                active,
            }
        })
        .collect();
    Ok(TokensPage {
        l: Layout::for_user(a, "API キー", "api_tokens"),
        tokens,
        scopes: SCOPES,
        issued,
        errors,
        name: name.to_string(),
        days: days.to_string(),
    })
}

async fn page(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    render(&view(&state, &a, String::new(), Vec::new(), "", "90").await?)
}

async fn create(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let mut errors = Vec::new();
    let name_in = f.get("name").map(String::as_str).unwrap_or("");
    let days_in = f.get("days").map(String::as_str).unwrap_or("");
    let name = match domain::validate::required_line("名前", name_in, 100) {
        Ok(n) => n,
        Err(e) => {
            errors.push(e);
            String::new()
        }
    };
    let days = match domain::validate::number_in("有効期間", days_in, 1, 365) {
        Ok(d) => d,
        Err(e) => {
            errors.push(e);
            0
        }
    };
    let scopes: Vec<String> = SCOPES
        .iter()
        .filter(|(s, _)| f.get(&format!("scope_{s}")).map(String::as_str) == Some("on"))
        .map(|(s, _)| s.to_string())
        .collect();
    if scopes.is_empty() {
        errors.push("権限（スコープ）を1つ以上選んでください。".into());
    }
    if !errors.is_empty() {
        return render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &view(&state, &a, String::new(), errors, name_in, days_in).await?,
        );
    }
    let token = format!("ykb_{}", domain::ids::random_token(32));
    state
        .store
        .create_api_token(
            &a.ctx.tenant.id,
            &name,
            &scopes,
            &domain::ids::token_digest(&token),
            &a.auth.user.id,
            a.ctx.now,
            a.ctx.now + days * domain::clock::DAY_MS,
            a.audit(),
        )
        .await?;
    // Shown this once; only its digest is kept.
    let mut res = render(&view(&state, &a, token, Vec::new(), "", "90").await?)?;
    res.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(res)
}

async fn revoke(
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
        .revoke_api_token(&a.ctx.tenant.id, &id, a.ctx.now, a.audit())
        .await?;
    Ok(Redirect::to("/admin/api-tokens").into_response())
}
