//! The JSON API under `/api/v1`: the same sessions, CSRF rules and authorisation as the
//! pages (it calls the same `ops`). Errors are `{"error": {"code", "message", "fields"}}`.

use crate::admin::AuditQuery;
use crate::app::{Authed, Ctx, Shared, TenantAdmin, UserAdmin};
use crate::error::{AppError, AppResult};
use crate::ops::{self, UserInput, UserView};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::policy;
use domain::settings::TenantSettings;
use serde::Deserialize;
use serde_json::{json, Value};
use storage::{UserFilter, UserStatus};

/// A JSON body, with a Japanese error for anything that is not one.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;
    async fn from_request(req: axum::extract::Request, s: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(AppError::BadRequest(
                "JSON（Content-Type: application/json）で送ってください。".into(),
            ));
        }
        let bytes = Bytes::from_request(req, s).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::TooLarge
            } else {
                AppError::BadRequest("本文を読み取れません。".into())
            }
        })?;
        if bytes.is_empty() {
            return Err(AppError::BadRequest("本文（JSON）がありません。".into()));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            AppError::BadRequest(format!(
                "JSON の形式が正しくありません（{}行{}列）。",
                e.line(),
                e.column()
            ))
        })
    }
}

fn me_json(a: &Authed) -> Value {
    let u = &a.auth.user;
    json!({
        "user": UserView::of(u, a.ctx.now),
        "tenant": {"slug": a.ctx.tenant.slug, "name": a.ctx.tenant.name},
        "password_change_required": u.password_temporary,
        "previous_login_at": a.auth.session.prev_login_at.map(domain::time::format_utc),
        "failures_since_previous_login": a.auth.session.failures_since,
        "csrf_token": a.auth.session.csrf,
    })
}

#[derive(Deserialize)]
struct LoginBody {
    login_id: String,
    password: String,
    /// The tenant's short name, when the host does not tell.
    #[serde(default)]
    tenant: Option<String>,
}

async fn login(
    State(state): State<Shared>,
    mut ctx: Ctx,
    JsonBody(b): JsonBody<LoginBody>,
) -> AppResult<Response> {
    if let Some(slug) = b.tenant.as_deref().filter(|s| !s.is_empty()) {
        match state.store.tenant_by_slug(slug).await {
            Ok(t) => ctx.tenant = std::sync::Arc::new(t),
            // An unknown tenant answers like an unknown user.
            Err(storage::StorageError::NotFound) => {
                return Ok(login_error(&ops::LoginError::Invalid));
            }
            Err(e) => return Err(e.into()),
        }
    }
    match ops::login(&state, &ctx, &b.login_id, &b.password).await? {
        Err(e) => Ok(login_error(&e)),
        Ok(ok) => {
            let body = json!({
                "user": UserView::of(&ok.user, ctx.now),
                "tenant": {"slug": ctx.tenant.slug, "name": ctx.tenant.name},
                "password_change_required": ok.user.password_temporary,
                "previous_login_at": ok.session.prev_login_at.map(domain::time::format_utc),
                "failures_since_previous_login": ok.session.failures_since,
                "csrf_token": ok.session.csrf,
            });
            let mut res = (StatusCode::OK, Json(body)).into_response();
            if let Ok(v) = state.cookie(state.session_cookie(), &ok.token).parse() {
                res.headers_mut().append(header::SET_COOKIE, v);
            }
            Ok(res)
        }
    }
}

fn login_error(e: &ops::LoginError) -> Response {
    let status = match e {
        ops::LoginError::Locked => StatusCode::LOCKED,
        _ => StatusCode::UNAUTHORIZED,
    };
    (
        status,
        Json(json!({"error": {"code": e.code(), "message": e.message(), "fields": []}})),
    )
        .into_response()
}

async fn logout(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    ops::logout(&state, &a).await?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = state.expired_cookie(state.session_cookie()).parse() {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

async fn me(a: Authed) -> Json<Value> {
    Json(me_json(&a))
}

#[derive(Deserialize)]
struct PasswordBody {
    current_password: String,
    new_password: String,
}

async fn password(
    State(state): State<Shared>,
    a: Authed,
    JsonBody(b): JsonBody<PasswordBody>,
) -> AppResult<StatusCode> {
    ops::change_password(
        &state,
        &a,
        &b.current_password,
        &b.new_password,
        &b.new_password,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- departments

async fn departments(State(state): State<Shared>, a: Authed) -> AppResult<Json<Value>> {
    if policy::user_scope(a.actor()).is_none() {
        return Err(AppError::Forbidden);
    }
    let list = state.store.list_departments(&a.ctx.tenant.id).await?;
    Ok(Json(json!({"departments": list})))
}

#[derive(Deserialize)]
struct DeptBody {
    name: String,
    #[serde(default)]
    parent_id: Option<String>,
}

async fn department_create(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    JsonBody(b): JsonBody<DeptBody>,
) -> AppResult<(StatusCode, Json<Value>)> {
    let d =
        ops::create_department(&state, &a, b.parent_id.as_deref().unwrap_or(""), &b.name).await?;
    Ok((StatusCode::CREATED, Json(json!(d))))
}

async fn department_get(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    if policy::user_scope(a.actor()).is_none() {
        return Err(AppError::Forbidden);
    }
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    Ok(Json(json!(
        state.store.department_by_id(&a.ctx.tenant.id, &id).await?
    )))
}

#[derive(Deserialize)]
struct RenameBody {
    name: String,
}

async fn department_patch(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RenameBody>,
) -> AppResult<Json<Value>> {
    Ok(Json(json!(
        ops::rename_department(&state, &a, &id, &b.name).await?
    )))
}

async fn department_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    ops::delete_department(&state, &a, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- users

#[derive(Deserialize)]
struct UsersQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    department: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    offset: Option<i64>,
}

async fn users(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UsersQuery>,
) -> AppResult<Json<Value>> {
    let scope = ops::scope_of(&a)?;
    let f = ops::user_filter(&q.q, &q.department, &q.role, &q.status);
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let offset = q.offset.unwrap_or(0).max(0);
    let (list, total) = state
        .store
        .list_users(&a.ctx.tenant.id, &scope, &f, limit, offset)
        .await?;
    let views: Vec<UserView> = list.iter().map(|u| UserView::of(u, a.ctx.now)).collect();
    Ok(Json(
        json!({"users": views, "total": total, "limit": limit, "offset": offset}),
    ))
}

async fn user_create(
    State(state): State<Shared>,
    UserAdmin(a): UserAdmin,
    JsonBody(input): JsonBody<UserInput>,
) -> AppResult<(StatusCode, Json<Value>)> {
    let (u, temp) = ops::create_user(&state, &a, &input).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"user": UserView::of(&u, a.ctx.now), "temporary_password": temp})),
    ))
}

async fn user_get(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let u = ops::visible_user(&state, &a, &id).await?;
    Ok(Json(json!(UserView::of(&u, a.ctx.now))))
}

async fn user_patch(
    State(state): State<Shared>,
    UserAdmin(a): UserAdmin,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<UserInput>,
) -> AppResult<Json<Value>> {
    let u = ops::update_user(&state, &a, &id, &input).await?;
    Ok(Json(json!(UserView::of(&u, a.ctx.now))))
}

async fn user_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    ops::delete_user(&state, &a, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn user_disable(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let u = ops::set_status(&state, &a, &id, UserStatus::Disabled).await?;
    Ok(Json(json!(UserView::of(&u, a.ctx.now))))
}

async fn user_enable(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let u = ops::set_status(&state, &a, &id, UserStatus::Active).await?;
    Ok(Json(json!(UserView::of(&u, a.ctx.now))))
}

async fn user_unlock(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let u = ops::unlock_user(&state, &a, &id).await?;
    Ok(Json(json!(UserView::of(&u, a.ctx.now))))
}

async fn user_reset(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let (u, temp) = ops::reset_password(&state, &a, &id).await?;
    Ok(Json(
        json!({"user": UserView::of(&u, a.ctx.now), "temporary_password": temp}),
    ))
}

#[derive(Deserialize)]
struct UnusedQuery {
    #[serde(default)]
    days: Option<i64>,
}

async fn unused(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UnusedQuery>,
) -> AppResult<Json<Value>> {
    let scope = ops::scope_of(&a)?;
    let days = q.days.unwrap_or(90);
    if !(1..=3650).contains(&days) {
        return Err(AppError::field(
            "days",
            "日数は1〜3650の範囲で指定してください。",
        ));
    }
    let since = a.ctx.now - days * domain::clock::DAY_MS;
    let f = UserFilter {
        unused_since: Some(since),
        ..Default::default()
    };
    let (list, total) = state
        .store
        .list_users(&a.ctx.tenant.id, &scope, &f, 100_000, 0)
        .await?;
    let views: Vec<UserView> = list.iter().map(|u| UserView::of(u, a.ctx.now)).collect();
    Ok(Json(
        json!({"days": days, "since": domain::time::format_utc(since), "total": total, "users": views}),
    ))
}

#[derive(Deserialize)]
struct ImportQuery {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    create_departments: bool,
}

/// The body is the CSV file itself (`Content-Type: text/csv`).
async fn import(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let errors_response = |errors: Vec<domain::import::RowError>| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": {"code": "import_invalid", "message": format!("{}件の誤りがあるため取り込めません。何も登録していません。", errors.len()), "rows": errors}})),
        )
            .into_response()
    };
    if q.dry_run {
        return Ok(
            match ops::import_check(&state, &a, &body, q.create_departments).await? {
                Ok(plan) => Json(json!({"dry_run": true, "plan": plan})).into_response(),
                Err(errors) => errors_response(errors),
            },
        );
    }
    match ops::import_apply(&state, &a, &body, q.create_departments, None).await {
        Ok(Ok((outcome, issued, _))) => Ok((
            StatusCode::CREATED,
            Json(json!({"users_created": outcome.users_created, "departments_created": outcome.departments_created, "issued": issued})),
        )
            .into_response()),
        Ok(Err(errors)) => Ok(errors_response(errors)),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- settings and audit

async fn settings_get(a: Authed) -> AppResult<Json<TenantSettings>> {
    ops::require_tenant_admin(&a)?;
    Ok(Json(a.ctx.tenant.settings.clone()))
}

async fn settings_put(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    JsonBody(s): JsonBody<TenantSettings>,
) -> AppResult<Json<TenantSettings>> {
    ops::update_settings(&state, &a, &s).await?;
    Ok(Json(
        state.store.tenant_by_id(&a.ctx.tenant.id).await?.settings,
    ))
}

async fn audit(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<AuditQuery>,
) -> AppResult<Json<Value>> {
    if !policy::can_read_audit(a.actor()) {
        return Err(AppError::Forbidden);
    }
    let f = q.filter().map_err(AppError::BadRequest)?;
    let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let (recs, total) = state
        .store
        .list_audit(&a.ctx.tenant.id, &f, 100, (page - 1) * 100)
        .await?;
    let records: Vec<Value> = recs
        .into_iter()
        .map(|r| {
            json!({
                "seq": r.seq, "at": domain::time::format_utc(r.at_ms), "actor_id": r.actor_id, "actor_login": r.actor_login,
                "ip": r.ip, "user_agent": r.user_agent, "action": r.action, "target": r.target, "result": r.result,
                "detail": serde_json::from_str::<Value>(&r.detail).unwrap_or(Value::Null), "hash": r.hash,
            })
        })
        .collect();
    Ok(Json(
        json!({"total": total, "page": page, "records": records}),
    ))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}

pub fn routes(max_import: usize) -> Router<Shared> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/auth/password", post(password))
        .route(
            "/api/v1/admin/departments",
            get(departments).post(department_create),
        )
        .route(
            "/api/v1/admin/departments/{id}",
            get(department_get)
                .patch(department_patch)
                .delete(department_delete),
        )
        .route("/api/v1/admin/users", get(users).post(user_create))
        .route("/api/v1/admin/users/unused", get(unused))
        .route(
            "/api/v1/admin/users/import",
            post(import).layer(DefaultBodyLimit::max(max_import)),
        )
        .route(
            "/api/v1/admin/users/{id}",
            get(user_get).patch(user_patch).delete(user_delete),
        )
        .route("/api/v1/admin/users/{id}/disable", post(user_disable))
        .route("/api/v1/admin/users/{id}/enable", post(user_enable))
        .route("/api/v1/admin/users/{id}/reset-password", post(user_reset))
        .route("/api/v1/admin/users/{id}/unlock", post(user_unlock))
        .route(
            "/api/v1/admin/settings",
            get(settings_get).put(settings_put),
        )
        .route("/api/v1/admin/audit", get(audit))
}
