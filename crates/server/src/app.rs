//! The application: shared state, the request context (tenant, client, session), the
//! middleware that enforces sessions, time-outs, forced password changes and CSRF, and the
//! one route table.

use crate::config::Config;
use crate::error::{info_for_status, AppError, ErrorInfo};
use crate::{admin, api, assets, chat_web, models_admin, pages};
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use domain::policy::Actor;
use domain::Clock;
use std::net::SocketAddr;
use std::sync::Arc;
use storage::{AuditEvent, Session, Store, Tenant, User};
use tokio::sync::Semaphore;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// A small time-limited cache for data read on every request that changes rarely. Entries
/// are dropped on change by this node and expire after `ttl`, so other nodes of a
/// scale-out deployment see a change within that time.
pub struct TtlCache<V> {
    ttl: std::time::Duration,
    map: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, V)>>,
}

impl<V: Clone> TtlCache<V> {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            map: Default::default(),
        }
    }
    pub fn get(&self, key: &str) -> Option<V> {
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }
    pub fn put(&self, key: &str, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() > 10_000 {
                map.clear();
            }
            map.insert(key.to_string(), (std::time::Instant::now(), value));
        }
    }
    pub fn invalidate(&self, key: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(key);
        }
    }
}

/// A tenant's models, providers and department paths: what every chat message needs.
pub struct Catalog {
    pub models: Vec<storage::Model>,
    pub providers: std::collections::HashMap<String, storage::Provider>,
    pub department_paths: std::collections::HashMap<String, String>,
    /// Department path → id.
    pub department_ids: std::collections::HashMap<String, String>,
    /// Monthly allocations by department id.
    pub allocations: std::collections::HashMap<String, i64>,
    /// Monthly caps set for individual users, by user id.
    pub user_caps: std::collections::HashMap<String, i64>,
}

pub struct AppState {
    pub store: Store,
    /// Uploaded files, sealed per tenant (see `encryption`).
    pub blobs: storage::BlobStore,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<Config>,
    pub default_tenant_id: String,
    /// Bounds concurrent argon2 work so a flood of sign-ins cannot exhaust memory.
    pub hash_slots: Arc<Semaphore>,
    /// Verified against when the account does not exist, so timing does not reveal it.
    pub dummy_hash: String,
    /// One LLM client per provider, with the provider's `updated_at` it was built from.
    pub llm_clients: std::sync::Mutex<std::collections::HashMap<String, (i64, llm::Client)>>,
    pub tenants: TtlCache<Arc<Tenant>>,
    pub catalogs: TtlCache<Arc<Catalog>>,
    /// Characters held by chat requests still running on this node.
    pub meter: Arc<crate::usage::Meter>,
    /// The tenants' search indexes, opened on first use.
    pub indexes: crate::knowledge::Indexes,
    /// The tenants' passage vectors, loaded on first use.
    pub vectors: crate::knowledge_vectors::Vectors,
    /// The morphological analyser of the second search field, when a dictionary is there.
    pub morph: Option<Arc<search::Morph>>,
    /// Wakes the ingestion worker when a document is queued.
    pub ingest: Arc<tokio::sync::Notify>,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// A tenant by id, cached for a few seconds (settings changes drop the entry).
    pub async fn tenant(&self, id: &str) -> Result<Arc<Tenant>, AppError> {
        if let Some(t) = self.tenants.get(id) {
            return Ok(t);
        }
        let t = Arc::new(self.store.tenant_by_id(id).await?);
        self.tenants.put(id, t.clone());
        Ok(t)
    }

    /// The tenant's models, providers and department paths, cached for a few seconds.
    pub async fn catalog(&self, tenant_id: &str) -> Result<Arc<Catalog>, AppError> {
        if let Some(c) = self.catalogs.get(tenant_id) {
            return Ok(c);
        }
        let paths = self.store.department_paths(tenant_id).await?;
        let c = Arc::new(Catalog {
            models: self.store.list_models(tenant_id).await?,
            providers: self
                .store
                .list_providers(tenant_id)
                .await?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect(),
            department_paths: paths.clone(),
            department_ids: paths.into_iter().map(|(id, p)| (p, id)).collect(),
            allocations: self.store.usage_allocations(tenant_id).await?,
            user_caps: self.store.usage_user_caps(tenant_id).await?,
        });
        self.catalogs.put(tenant_id, c.clone());
        Ok(c)
    }

    pub fn session_cookie(&self) -> &'static str {
        if self.config.cookie_secure {
            "__Host-yakuba_session"
        } else {
            "yakuba_session"
        }
    }

    pub fn pre_cookie(&self) -> &'static str {
        if self.config.cookie_secure {
            "__Host-yakuba_pre"
        } else {
            "yakuba_pre"
        }
    }

    pub fn cookie(&self, name: &str, value: &str) -> String {
        let secure = if self.config.cookie_secure {
            "; Secure"
        } else {
            ""
        };
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}")
    }

    pub fn expired_cookie(&self, name: &str) -> String {
        let secure = if self.config.cookie_secure {
            "; Secure"
        } else {
            ""
        };
        format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
    }

    /// Hashes a password off the async threads.
    pub async fn hash_password(&self, password: String) -> Result<String, AppError> {
        let _slot = self
            .hash_slots
            .acquire()
            .await
            .map_err(|e| AppError::Internal(e.to_string()))?;
        let cost = self.config.hash_cost();
        tokio::task::spawn_blocking(move || domain::password::hash(&password, cost))
            .await
            .map_err(|e| AppError::Internal(e.to_string()))?
            .map_err(|e| AppError::Internal(e.to_string()))
    }

    /// Hashes many passwords (an import) using every core, off the async threads.
    pub async fn hash_many(&self, passwords: Vec<String>) -> Result<Vec<String>, AppError> {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let chunk = passwords.len().div_ceil(cores).max(1);
        let mut tasks = Vec::new();
        for part in passwords.chunks(chunk) {
            let part = part.to_vec();
            let cost = self.config.hash_cost();
            tasks.push(tokio::task::spawn_blocking(move || {
                part.iter()
                    .map(|p| domain::password::hash(p, cost))
                    .collect::<Result<Vec<_>, _>>()
            }));
        }
        let mut out = Vec::with_capacity(passwords.len());
        for t in tasks {
            out.extend(
                t.await
                    .map_err(|e| AppError::Internal(e.to_string()))?
                    .map_err(|e| AppError::Internal(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Checks a password off the async threads.
    pub async fn verify_password(&self, password: String, hash: String) -> Result<bool, AppError> {
        let _slot = self
            .hash_slots
            .acquire()
            .await
            .map_err(|e| AppError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(move || domain::password::verify(&password, &hash))
            .await
            .map_err(|e| AppError::Internal(e.to_string()))
    }
}

/// A signed-in user with a live session.
pub struct Auth {
    pub session: Session,
    pub user: User,
    pub actor: Actor,
}

/// Everything a handler needs to know about the request beyond its input.
#[derive(Clone)]
pub struct Ctx {
    pub tenant: Arc<Tenant>,
    pub ip: String,
    pub user_agent: String,
    pub now: i64,
    pub auth: Option<Arc<Auth>>,
    pub path: String,
}

impl Ctx {
    /// An audit event pre-filled with who, when and from where.
    pub fn audit(&self) -> AuditEvent {
        let (actor_id, actor_login) = match &self.auth {
            Some(a) => (Some(a.user.id.clone()), a.user.login_id.clone()),
            None => (None, String::new()),
        };
        AuditEvent {
            tenant_id: self.tenant.id.clone(),
            at_ms: self.now,
            actor_id,
            actor_login,
            ip: self.ip.clone(),
            user_agent: self.user_agent.clone(),
            ..Default::default()
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = AppError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Ctx>()
            .cloned()
            .ok_or_else(|| AppError::Internal("context missing".into()))
    }
}

/// A request from a signed-in user.
pub struct Authed {
    pub ctx: Ctx,
    pub auth: Arc<Auth>,
}

impl Authed {
    pub fn actor(&self) -> &Actor {
        &self.auth.actor
    }
    pub fn audit(&self) -> AuditEvent {
        self.ctx.audit()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authed {
    type Rejection = AppError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &S,
    ) -> Result<Self, Self::Rejection> {
        let ctx = Ctx::from_request_parts(parts, s).await?;
        let auth = ctx.auth.clone().ok_or(AppError::Unauthenticated)?;
        Ok(Authed { ctx, auth })
    }
}

/// A signed-in tenant admin; anyone else is refused before the request body is read.
pub struct TenantAdmin(pub Authed);

impl<S: Send + Sync> FromRequestParts<S> for TenantAdmin {
    type Rejection = AppError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &S,
    ) -> Result<Self, Self::Rejection> {
        let a = Authed::from_request_parts(parts, s).await?;
        if domain::policy::can_manage_tenant(a.actor()) {
            Ok(TenantAdmin(a))
        } else {
            Err(AppError::Forbidden)
        }
    }
}

/// A signed-in user who manages accounts (tenant or department admin).
pub struct UserAdmin(pub Authed);

impl<S: Send + Sync> FromRequestParts<S> for UserAdmin {
    type Rejection = AppError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &S,
    ) -> Result<Self, Self::Rejection> {
        let a = Authed::from_request_parts(parts, s).await?;
        if domain::policy::user_scope(a.actor()).is_some() {
            Ok(UserAdmin(a))
        } else {
            Err(AppError::Forbidden)
        }
    }
}

pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && !a.is_empty()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn client_ip(state: &AppState, req: &Request) -> String {
    if state.config.trust_proxy_headers {
        if let Some(ip) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
        {
            return ip.to_string();
        }
    }
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "-".into())
}

async fn resolve_tenant(state: &AppState, headers: &HeaderMap) -> Result<Tenant, AppError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map(|(a, _)| a)
                .unwrap_or(h)
                .to_ascii_lowercase()
        });
    if let Some(h) = host {
        match state.store.tenant_by_host(&h).await {
            Ok(t) => return Ok(t),
            Err(storage::StorageError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((*state.tenant(&state.default_tenant_id).await?).clone())
}

/// Paths a user with a temporary password may still reach.
fn allowed_before_password_change(path: &str) -> bool {
    matches!(
        path,
        "/password"
            | "/logout"
            | "/api/v1/auth/password"
            | "/api/v1/auth/logout"
            | "/api/v1/auth/me"
    )
}

fn is_api(path: &str) -> bool {
    path.starts_with("/api/")
}

/// Builds the request context: the tenant, the client, and the session if there is a live
/// one. Enforces idle and absolute time-outs, forced password changes and CSRF.
async fn context(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let now = state.now();
    let path = req.uri().path().to_string();
    let ip = client_ip(&state, &req);
    let user_agent: String = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    let mut tenant = None;
    let mut auth = None;
    if let Some(token) = cookie_value(req.headers(), state.session_cookie()) {
        let digest = domain::ids::token_digest(&token);
        if let Some((session, user)) = state.store.session_with_user(&digest).await? {
            let t = (*state.tenant(&session.tenant_id).await?).clone();
            let policy = t.settings.session_for(user.role);
            let idle = now - session.last_seen_at
                > i64::from(policy.idle_minutes) * domain::clock::MINUTE_MS;
            let absolute = now - session.created_at
                > i64::from(policy.absolute_minutes) * domain::clock::MINUTE_MS;
            let usable = user.status == storage::UserStatus::Active
                && user.locked_until.is_none_or(|l| l <= now);
            if idle || absolute || !usable {
                let reason = if idle {
                    "idle"
                } else if absolute {
                    "absolute"
                } else {
                    "account"
                };
                let ev = AuditEvent {
                    tenant_id: t.id.clone(),
                    at_ms: now,
                    actor_id: Some(user.id.clone()),
                    actor_login: user.login_id.clone(),
                    ip: ip.clone(),
                    user_agent: user_agent.clone(),
                    ..Default::default()
                }
                .with(
                    "auth.session_end",
                    format!("user:{}", user.id),
                    serde_json::json!({"reason": reason}),
                );
                state.store.end_session(&digest, Some(ev)).await?;
            } else {
                if now - session.last_seen_at >= 15_000 {
                    state.store.touch_session(&digest, now).await?;
                }
                let actor = Actor {
                    tenant_id: user.tenant_id.clone(),
                    user_id: user.id.clone(),
                    login_id: user.login_id.clone(),
                    role: user.role,
                    department_id: user.department_id.clone(),
                    department_path: user.department_path.clone(),
                };
                auth = Some(Arc::new(Auth {
                    session,
                    user,
                    actor,
                }));
                tenant = Some(t);
            }
        }
    }
    let tenant = match tenant {
        Some(t) => t,
        None => resolve_tenant(&state, req.headers()).await?,
    };

    if let Some(a) = &auth {
        if a.user.password_temporary && !allowed_before_password_change(&path) {
            if is_api(&path) {
                return Err(AppError::PasswordChangeRequired);
            }
            return Ok(Redirect::to("/password").into_response());
        }
    }

    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if unsafe_method {
        // A browser always says where a cross-site request comes from.
        if let Some(origin) = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
        {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let origin_host = origin.split("://").nth(1).unwrap_or("");
            if origin == "null" || origin_host != host {
                record_denied(
                    &state,
                    &tenant,
                    auth.as_deref(),
                    &ip,
                    &user_agent,
                    now,
                    "request.csrf_rejected",
                    &path,
                )
                .await;
                return Err(AppError::Csrf);
            }
        }
        // Sign-in has its own protection: the pre-session token of the form, and for the
        // API a JSON body, which no cross-site form can send.
        let sign_in = path == "/login" || path == "/api/v1/auth/login";
        if let Some(a) = auth.as_ref().filter(|_| !sign_in) {
            let (token, rebuilt) = csrf_token(req, state.config.security.max_import_bytes).await?;
            req = rebuilt;
            if !token.is_some_and(|t| same_secret(&t, &a.session.csrf)) {
                record_denied(
                    &state,
                    &tenant,
                    Some(a),
                    &ip,
                    &user_agent,
                    now,
                    "request.csrf_rejected",
                    &path,
                )
                .await;
                return Err(AppError::Csrf);
            }
        }
    }

    let tenant = Arc::new(tenant);
    req.extensions_mut().insert(Ctx {
        tenant: tenant.clone(),
        ip: ip.clone(),
        user_agent: user_agent.clone(),
        now,
        auth: auth.clone(),
        path: path.clone(),
    });
    let res = next.run(req).await;
    // Any change made through the admin area may touch settings, departments, providers or
    // models: this node forgets its cached copies of the tenant at once.
    if unsafe_method && (path.starts_with("/admin") || path.starts_with("/api/v1/admin")) {
        state.tenants.invalidate(&tenant.id);
        state.catalogs.invalidate(&tenant.id);
    }
    // A signed-in user trying to change something they may not is worth a record.
    if unsafe_method && res.status() == StatusCode::FORBIDDEN {
        if let Some(a) = auth.as_deref() {
            record_denied(
                &state,
                &tenant,
                Some(a),
                &ip,
                &user_agent,
                now,
                "request.denied",
                &path,
            )
            .await;
        }
    }
    Ok(res)
}

/// Appends a `denied` audit record for a signed-in caller; anonymous noise is not recorded.
#[allow(clippy::too_many_arguments)]
async fn record_denied(
    state: &AppState,
    tenant: &Tenant,
    auth: Option<&Auth>,
    ip: &str,
    ua: &str,
    now: i64,
    action: &str,
    path: &str,
) {
    let Some(a) = auth else { return };
    let ev = AuditEvent {
        tenant_id: tenant.id.clone(),
        at_ms: now,
        actor_id: Some(a.user.id.clone()),
        actor_login: a.user.login_id.clone(),
        ip: ip.to_string(),
        user_agent: ua.to_string(),
        result: "denied".into(),
        ..Default::default()
    }
    .with(
        action,
        path.chars().take(200).collect::<String>(),
        serde_json::json!({}),
    );
    if let Err(e) = state.store.append_audit(&ev).await {
        tracing::error!(error = %e, "could not record a denied request");
    }
}

/// Finds the CSRF token of a state-changing request: the `X-CSRF-Token` header, the
/// `_csrf` query parameter (multipart forms), or the `_csrf` field of a URL-encoded form,
/// whose body is read and put back.
async fn csrf_token(req: Request, limit: usize) -> Result<(Option<String>, Request), AppError> {
    if let Some(t) = req
        .headers()
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
    {
        let t = t.to_string();
        return Ok((Some(t), req));
    }
    if let Some(q) = req.uri().query() {
        if let Some(t) = form_urlencoded_get(q.as_bytes(), "_csrf") {
            return Ok((Some(t), req));
        }
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok((None, req));
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| AppError::TooLarge)?;
    let token = form_urlencoded_get(&bytes, "_csrf");
    Ok((token, Request::from_parts(parts, Body::from(bytes))))
}

fn form_urlencoded_get(input: &[u8], key: &str) -> Option<String> {
    input.split(|b| *b == b'&').find_map(|pair| {
        let mut it = pair.splitn(2, |b| *b == b'=');
        let k = it.next()?;
        let v = it.next().unwrap_or(b"");
        (k == key.as_bytes()).then(|| String::from_utf8_lossy(v).into_owned())
    })
}

/// Turns error responses into a Japanese HTML page or a JSON error, by destination.
async fn render_errors(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let plain = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    let info = match res.extensions().get::<ErrorInfo>() {
        Some(i) => i.clone(),
        None if plain => match info_for_status(status, state.config.security.max_body_bytes) {
            Some(i) => i,
            None if status.is_server_error() => {
                AppError::Internal(format!("status {status}")).info()
            }
            None => return res,
        },
        None => return res,
    };
    if is_api(&path) {
        let body = serde_json::json!({"error": {"code": info.code, "message": info.message, "fields": info.fields}});
        return (info.status, axum::Json(body)).into_response();
    }
    match info.code {
        "unauthenticated" => {
            let next_path = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let target = if path == "/" || path == "/logout" {
                "/login".to_string()
            } else {
                format!("/login?next={}", pages::url_encode(&next_path))
            };
            Redirect::to(&target).into_response()
        }
        "password_change_required" => Redirect::to("/password").into_response(),
        _ => pages::error_page(&info),
    }
}

/// Headers on every response: a strict CSP (nothing from outside, no inline script or
/// style), no framing, no sniffing, and no caching of pages that carry personal data.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'");
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "same-origin");
    set(
        h,
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=()",
    );
    set(h, "cross-origin-opener-policy", "same-origin");
    if !is_static && !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    res
}

/// Declines request bodies over the limit before any of them is read.
async fn body_limit(
    State(state): State<Shared>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let path = req.uri().path();
    let limit = if path.ends_with("/import") || path.ends_with("/messages") {
        state.config.security.max_import_bytes
    } else if path.ends_with("/documents") && path.contains("knowledge") {
        state.config.knowledge.max_file_bytes as usize + 1024 * 1024
    } else {
        state.config.security.max_body_bytes
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(StatusCode::PAYLOAD_TOO_LARGE.into_response());
    }
    Ok(next.run(req).await)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Shared>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn not_found() -> AppError {
    AppError::NotFound
}

/// The one route table.
pub fn router(state: Shared) -> Router {
    let max_import = state.config.security.max_import_bytes;
    let max_body = state.config.security.max_body_bytes;
    let app = Router::new()
        .merge(pages::routes())
        .merge(admin::routes(max_import))
        .merge(api::routes(max_import))
        .merge(chat_web::routes(max_import))
        .merge(models_admin::routes())
        .merge(crate::eval_web::routes())
        .merge(crate::usage_web::routes())
        .merge(crate::templates_web::routes())
        .merge(crate::logs_web::routes())
        .merge(crate::tokens_web::routes())
        .merge(crate::retention_web::routes())
        .merge(crate::disposal_web::routes())
        .merge(crate::embedding_web::routes())
        .merge(crate::alerts_web::routes())
        .merge(crate::tenant_export::routes())
        .merge(crate::knowledge_web::routes(
            state.config.knowledge.max_file_bytes as usize,
        ))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), context))
        .layer(DefaultBodyLimit::max(max_body));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/static/{*path}", get(assets::serve))
        .route("/favicon.ico", get(|| async { Redirect::permanent("/static/favicon.svg") }))
        .merge(app)
        .layer(middleware::from_fn_with_state(state.clone(), body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), render_errors))
        .layer(middleware::from_fn(security_headers))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
                let id = req
                    .extensions()
                    .get::<RequestId>()
                    .and_then(|r| r.header_value().to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                // The path only: queries may carry search terms or tokens.
                tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
            })
            .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}
