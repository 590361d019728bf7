//! The pages everyone sees: sign-in with the city's banner, the forced password change,
//! home with the previous-sign-in notice, sign-out, and the error page.

use crate::app::{cookie_value, same_secret, Authed, Ctx, Shared};
use crate::error::{AppError, AppResult, ErrorInfo};
use crate::form::Form;
use crate::ops;
use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use domain::policy;
use domain::settings::FieldError;
use serde::Deserialize;

/// What every page's frame shows.
pub struct Layout {
    pub title: String,
    pub tenant_name: String,
    pub user: Option<NavUser>,
    pub csrf: String,
    pub nav: &'static str,
}

pub struct NavUser {
    pub display_name: String,
    pub department_path: String,
    pub role_label: &'static str,
    pub can_users: bool,
    pub can_tenant: bool,
    pub can_audit: bool,
    pub can_chat: bool,
}

impl Layout {
    pub fn for_user(a: &Authed, title: &str, nav: &'static str) -> Layout {
        let actor = a.actor();
        Layout {
            title: title.to_string(),
            tenant_name: a.ctx.tenant.name.clone(),
            user: Some(NavUser {
                display_name: a.auth.user.display_name.clone(),
                department_path: a.auth.user.department_path.clone(),
                role_label: a.auth.user.role.label(),
                can_users: policy::user_scope(actor).is_some() && !a.auth.user.password_temporary,
                can_tenant: policy::can_manage_tenant(actor) && !a.auth.user.password_temporary,
                can_audit: policy::can_read_audit(actor) && !a.auth.user.password_temporary,
                can_chat: policy::can_chat(actor) && !a.auth.user.password_temporary,
            }),
            csrf: a.auth.session.csrf.clone(),
            nav,
        }
    }

    fn anonymous(ctx: &Ctx, title: &str, csrf: String) -> Layout {
        Layout {
            title: title.into(),
            tenant_name: ctx.tenant.name.clone(),
            user: None,
            csrf,
            nav: "",
        }
    }
}

pub fn render<T: Template>(t: &T) -> AppResult<Response> {
    Ok(Html(t.render()?).into_response())
}

pub fn render_status<T: Template>(status: StatusCode, t: &T) -> AppResult<Response> {
    Ok((status, Html(t.render()?)).into_response())
}

/// The message for one field, or "" (for templates).
pub fn field_message(errors: &[FieldError], field: &str) -> String {
    errors
        .iter()
        .filter(|e| e.field == field)
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Only paths on this site are followed after sign-in (no open redirect).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.contains(['\r', '\n'])
    {
        next
    } else {
        "/"
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    l: Layout,
    heading: String,
    message: String,
}

pub fn error_page(info: &ErrorInfo) -> Response {
    let heading = match info.status {
        StatusCode::NOT_FOUND => "ページが見つかりません",
        StatusCode::FORBIDDEN => "この操作はできません",
        StatusCode::PAYLOAD_TOO_LARGE => "データが大きすぎます",
        s if s.is_server_error() => "システムエラー",
        _ => "操作を完了できませんでした",
    };
    let page = ErrorPage {
        l: Layout {
            title: heading.into(),
            tenant_name: String::new(),
            user: None,
            csrf: String::new(),
            nav: "",
        },
        heading: heading.into(),
        message: info.message.clone(),
    };
    match page.render() {
        Ok(html) => (info.status, Html(html)).into_response(),
        Err(_) => (info.status, info.message.clone()).into_response(),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    l: Layout,
    banner: Vec<String>,
    error: String,
    info: String,
    login_id: String,
    next: String,
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    signed_out: Option<String>,
}

fn login_page(
    state: &Shared,
    ctx: &Ctx,
    status: StatusCode,
    error: &str,
    info: &str,
    login_id: &str,
    next: &str,
) -> AppResult<Response> {
    // A fresh pre-session token for each form: the sign-in POST must carry it back.
    let pre = domain::ids::random_token(32);
    let page = LoginPage {
        l: Layout::anonymous(ctx, "ログイン", pre.clone()),
        banner: ctx
            .tenant
            .settings
            .banner
            .lines()
            .map(str::to_string)
            .collect(),
        error: error.into(),
        info: info.into(),
        login_id: login_id.chars().take(100).collect(),
        next: safe_next(next).into(),
    };
    let mut res = render_status(status, &page)?;
    if let Ok(v) = state.cookie(state.pre_cookie(), &pre).parse() {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

async fn login_form(
    State(state): State<Shared>,
    ctx: Ctx,
    Query(q): Query<LoginQuery>,
) -> AppResult<Response> {
    if ctx.auth.is_some() {
        return Ok(Redirect::to("/").into_response());
    }
    let info = if q.signed_out.is_some() {
        "ログアウトしました。"
    } else {
        ""
    };
    login_page(&state, &ctx, StatusCode::OK, "", info, "", &q.next)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    login_id: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
    #[serde(default, rename = "_csrf")]
    csrf: String,
}

async fn login_submit(
    State(state): State<Shared>,
    ctx: Ctx,
    headers: axum::http::HeaderMap,
    Form(f): Form<LoginForm>,
) -> AppResult<Response> {
    let pre = cookie_value(&headers, state.pre_cookie()).unwrap_or_default();
    if !same_secret(&pre, &f.csrf) {
        return login_page(
            &state,
            &ctx,
            StatusCode::FORBIDDEN,
            "画面の有効期限が切れました。もう一度ログインしてください。",
            "",
            &f.login_id,
            &f.next,
        );
    }
    match ops::login(&state, &ctx, &f.login_id, &f.password).await? {
        Err(e) => login_page(
            &state,
            &ctx,
            StatusCode::UNAUTHORIZED,
            e.message(),
            "",
            &f.login_id,
            &f.next,
        ),
        Ok(ok) => {
            let target = if ok.user.password_temporary {
                "/password"
            } else {
                safe_next(&f.next)
            };
            let mut res = Redirect::to(target).into_response();
            let h = res.headers_mut();
            if let Ok(v) = state.cookie(state.session_cookie(), &ok.token).parse() {
                h.append(header::SET_COOKIE, v);
            }
            if let Ok(v) = state.expired_cookie(state.pre_cookie()).parse() {
                h.append(header::SET_COOKIE, v);
            }
            Ok(res)
        }
    }
}

async fn logout(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    ops::logout(&state, &a).await?;
    let mut res = Redirect::to("/login?signed_out=1").into_response();
    if let Ok(v) = state.expired_cookie(state.session_cookie()).parse() {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

#[derive(Template)]
#[template(path = "password.html")]
struct PasswordPage {
    l: Layout,
    forced: bool,
    errors: Vec<FieldError>,
    min_length: u32,
}

async fn password_form(a: Authed) -> AppResult<Response> {
    render(&PasswordPage {
        l: Layout::for_user(&a, "パスワード変更", "password"),
        forced: a.auth.user.password_temporary,
        errors: Vec::new(),
        min_length: a.ctx.tenant.settings.password.min_length,
    })
}

#[derive(Deserialize)]
struct PasswordForm {
    #[serde(default)]
    current_password: String,
    #[serde(default)]
    new_password: String,
    #[serde(default)]
    confirm_password: String,
}

async fn password_submit(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<PasswordForm>,
) -> AppResult<Response> {
    match ops::change_password(
        &state,
        &a,
        &f.current_password,
        &f.new_password,
        &f.confirm_password,
    )
    .await
    {
        Ok(()) => Ok(Redirect::to("/?notice=password_changed").into_response()),
        Err(AppError::Validation(errors)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &PasswordPage {
                l: Layout::for_user(&a, "パスワード変更", "password"),
                forced: a.auth.user.password_temporary,
                errors,
                min_length: a.ctx.tenant.settings.password.min_length,
            },
        ),
        Err(e) => Err(e),
    }
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    l: Layout,
    name: String,
    notice: String,
    prev_login: Option<String>,
    failures: i64,
    login_id: String,
    department: String,
    role: &'static str,
    /// The remaining allowance (rendered HTML).
    meter_html: String,
    /// Limits at or past 80 % that this admin looks after: (level, message).
    alerts: Vec<(&'static str, String)>,
}

#[derive(Deserialize)]
struct HomeQuery {
    #[serde(default)]
    notice: String,
}

async fn home(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<HomeQuery>,
) -> AppResult<Response> {
    let u = &a.auth.user;
    let notice = match q.notice.as_str() {
        "password_changed" => "パスワードを変更しました。",
        _ => "",
    };
    render(&HomePage {
        l: Layout::for_user(&a, "ホーム", "home"),
        name: u.display_name.clone(),
        notice: notice.into(),
        prev_login: a.auth.session.prev_login_at.map(domain::time::format_jst),
        failures: a.auth.session.failures_since,
        login_id: u.login_id.clone(),
        department: u.department_path.clone(),
        role: u.role.label(),
        meter_html: crate::usage_web::meter_view(&state, &a).await?.render()?,
        alerts: crate::usage_web::admin_alerts(&state, &a).await?,
    })
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login_submit))
        .route("/logout", axum::routing::post(logout))
        .route("/password", get(password_form).post(password_submit))
}
