//! The admin pages: users (search, paging, create, change, disable, delete, temporary
//! passwords), the CSV import with its preview, the unused-account report, departments,
//! settings and the audit log. Every action goes through `ops`, which asks the policy.

use crate::app::{Authed, Shared};
use crate::csvout;
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::ops::{self, UserInput, UserView};
use crate::pages::{field_message, render, render_status, url_encode, Layout};
use askama::Template;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use domain::import::{ImportPlan, RowError};
use domain::policy;
use domain::settings::{FieldError, TenantSettings};
use domain::Role;
use serde::Deserialize;
use storage::{AuditFilter, Department, UserFilter, UserStatus};

const PAGE_SIZE: i64 = 50;

pub struct DeptOption {
    pub id: String,
    pub name: String,
    pub path: String,
    pub indent: String,
    pub depth: usize,
    pub user_count: i64,
}

impl DeptOption {
    fn of(d: &Department) -> DeptOption {
        let depth = d.depth();
        DeptOption {
            id: d.id.clone(),
            name: d.name.clone(),
            path: d.path.clone(),
            indent: "\u{3000}".repeat(depth),
            depth,
            user_count: d.user_count,
        }
    }
}

/// Departments the caller may put people in (all for tenant admins, their subtree else).
async fn dept_options(state: &Shared, a: &Authed) -> AppResult<Vec<DeptOption>> {
    let all = state.store.list_departments(&a.ctx.tenant.id).await?;
    let scope = policy::user_scope(a.actor());
    Ok(all
        .iter()
        .filter(|d| match &scope {
            Some(policy::UserScope::All) => true,
            Some(policy::UserScope::Subtree(root)) => policy::in_subtree(root, &d.path),
            None => false,
        })
        .map(DeptOption::of)
        .collect())
}

/// Roles the caller may give.
fn role_options(a: &Authed) -> Vec<(&'static str, &'static str)> {
    Role::ALL
        .iter()
        .filter(|r| {
            policy::assign(a.actor(), **r, &a.actor().department_path) == policy::Decision::Allow
                || policy::can_manage_tenant(a.actor())
        })
        .map(|r| (r.as_str(), r.label()))
        .collect()
}

fn page_links(base: &str, page: i64, total: i64) -> (Option<String>, Option<String>, String) {
    let pages = ((total + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
    let sep = if base.contains('?') { '&' } else { '?' };
    let prev = (page > 1).then(|| format!("{base}{sep}page={}", page - 1));
    let next = (page < pages).then(|| format!("{base}{sep}page={}", page + 1));
    (prev, next, format!("{page} / {pages} ページ"))
}

fn number(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

// ---------------------------------------------------------------- users list

#[derive(Deserialize, Default)]
struct UserQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    dept: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    page: Option<i64>,
}

impl UserQuery {
    fn filter(&self) -> UserFilter {
        ops::user_filter(&self.q, &self.dept, &self.role, &self.status)
    }
    fn query_string(&self) -> String {
        format!(
            "q={}&dept={}&role={}&status={}",
            url_encode(&self.q),
            url_encode(&self.dept),
            url_encode(&self.role),
            url_encode(&self.status)
        )
    }
}

#[derive(Template)]
#[template(path = "admin/users.html")]
struct UsersPage {
    l: Layout,
    users: Vec<UserView>,
    departments: Vec<DeptOption>,
    roles: Vec<(&'static str, &'static str)>,
    q: String,
    dept: String,
    role: String,
    status: String,
    total_label: String,
    page_label: String,
    prev_link: Option<String>,
    next_link: Option<String>,
    csv_link: String,
    can_import: bool,
    scope_note: String,
}

async fn users(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UserQuery>,
) -> AppResult<Response> {
    let scope = ops::scope_of(&a)?;
    let page = q.page.unwrap_or(1).clamp(1, 100_000);
    let (list, total) = state
        .store
        .list_users(
            &a.ctx.tenant.id,
            &scope,
            &q.filter(),
            PAGE_SIZE,
            (page - 1) * PAGE_SIZE,
        )
        .await?;
    let base = format!("/admin/users?{}", q.query_string());
    let (prev_link, next_link, page_label) = page_links(&base, page, total);
    let scope_note = match &scope {
        policy::UserScope::Subtree(root) => {
            format!("「{root}」とその下位の部署のユーザーを表示しています。")
        }
        policy::UserScope::All => String::new(),
    };
    render(&UsersPage {
        l: Layout::for_user(&a, "ユーザー", "users"),
        users: list.iter().map(|u| UserView::of(u, a.ctx.now)).collect(),
        departments: dept_options(&state, &a).await?,
        roles: Role::ALL.iter().map(|r| (r.as_str(), r.label())).collect(),
        total_label: format!("{}人", number(total)),
        page_label,
        prev_link,
        next_link,
        csv_link: format!("/admin/users.csv?{}", q.query_string()),
        can_import: policy::can_manage_tenant(a.actor()),
        scope_note,
        q: q.q,
        dept: q.dept,
        role: q.role,
        status: q.status,
    })
}

fn user_rows(list: &[storage::User]) -> Vec<Vec<String>> {
    list.iter()
        .map(|u| {
            vec![
                u.login_id.clone(),
                u.display_name.clone(),
                u.department_path.clone(),
                u.role.label().to_string(),
                u.email.clone().unwrap_or_default(),
                u.status.label().to_string(),
                u.last_login_at
                    .map(domain::time::format_jst_compact)
                    .unwrap_or_default(),
                domain::time::format_jst_compact(u.created_at),
            ]
        })
        .collect()
}

const USER_CSV_HEADERS: [&str; 8] = [
    "ログインID",
    "氏名",
    "所属",
    "権限",
    "メールアドレス",
    "状態",
    "最終ログイン",
    "登録日時",
];

async fn users_csv(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UserQuery>,
) -> AppResult<Response> {
    let scope = ops::scope_of(&a)?;
    let (list, total) = state
        .store
        .list_users(&a.ctx.tenant.id, &scope, &q.filter(), 200_000, 0)
        .await?;
    let body = csvout::build(&USER_CSV_HEADERS, user_rows(&list))
        .map_err(|e| AppError::Internal(e.to_string()))?;
    state
        .store
        .append_audit(&a.audit().with(
            "users.export",
            "users",
            serde_json::json!({"rows": total, "query": q.query_string()}),
        ))
        .await?;
    Ok(csvout::response("users.csv", body))
}

// ---------------------------------------------------------------- create

#[derive(Template)]
#[template(path = "admin/user_form.html")]
struct UserFormPage {
    l: Layout,
    input: UserInput,
    errors: Vec<FieldError>,
    departments: Vec<DeptOption>,
    roles: Vec<(&'static str, &'static str)>,
    temp_hours: u32,
}

impl UserFormPage {
    fn err(&self, field: &str) -> String {
        field_message(&self.errors, field)
    }
}

async fn user_new(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    ops::scope_of(&a)?;
    render(&UserFormPage {
        l: Layout::for_user(&a, "ユーザーを追加", "users"),
        input: UserInput {
            role: "user".into(),
            ..Default::default()
        },
        errors: Vec::new(),
        departments: dept_options(&state, &a).await?,
        roles: role_options(&a),
        temp_hours: a.ctx.tenant.settings.password.temporary_valid_hours,
    })
}

#[derive(Template)]
#[template(path = "admin/temp_password.html")]
struct TempPasswordPage {
    l: Layout,
    heading: String,
    display_name: String,
    login_id: String,
    user_id: String,
    temp_password: String,
    temp_hours: u32,
}

async fn user_create(
    State(state): State<Shared>,
    a: Authed,
    Form(input): Form<UserInput>,
) -> AppResult<Response> {
    match ops::create_user(&state, &a, &input).await {
        Ok((u, temp)) => render(&TempPasswordPage {
            l: Layout::for_user(&a, "ユーザーを登録しました", "users"),
            heading: "ユーザーを登録しました".into(),
            display_name: u.display_name,
            login_id: u.login_id,
            user_id: u.id,
            temp_password: temp,
            temp_hours: a.ctx.tenant.settings.password.temporary_valid_hours,
        }),
        Err(AppError::Validation(errors)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &UserFormPage {
                l: Layout::for_user(&a, "ユーザーを追加", "users"),
                input,
                errors,
                departments: dept_options(&state, &a).await?,
                roles: role_options(&a),
                temp_hours: a.ctx.tenant.settings.password.temporary_valid_hours,
            },
        ),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- one user

#[derive(Template)]
#[template(path = "admin/user_detail.html")]
struct UserDetailPage {
    l: Layout,
    u: UserView,
    created_jst: String,
    can_manage: bool,
    departments: Vec<DeptOption>,
    roles: Vec<(&'static str, &'static str)>,
    notice: String,
    errors: Vec<FieldError>,
    /// (time in JST, result, address) of the newest sign-in attempts.
    attempts: Vec<(String, &'static str, String)>,
    sessions: i64,
}

#[derive(Deserialize)]
struct NoticeQuery {
    #[serde(default)]
    notice: String,
}

async fn user_detail_page(
    state: &Shared,
    a: &Authed,
    id: &str,
    status: StatusCode,
    notice: &str,
    errors: Vec<FieldError>,
) -> AppResult<Response> {
    let u = ops::visible_user(state, a, id).await?;
    let can_manage = policy::manage_user(a.actor(), &u.target()) == policy::Decision::Allow;
    render_status(
        status,
        &UserDetailPage {
            l: Layout::for_user(a, &u.display_name, "users"),
            created_jst: domain::time::format_jst(u.created_at),
            u: UserView::of(&u, a.ctx.now),
            can_manage,
            departments: dept_options(state, a).await?,
            roles: role_options(a),
            notice: notice.into(),
            errors,
            attempts: state
                .store
                .recent_login_attempts(&u.tenant_id, &u.id, 10)
                .await?
                .into_iter()
                .map(|r| {
                    (
                        domain::time::format_jst_compact(r.at),
                        if r.success { "成功" } else { "失敗" },
                        r.ip,
                    )
                })
                .collect(),
            sessions: state.store.count_sessions(&u.tenant_id, &u.id).await?,
        },
    )
}

async fn user_detail(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Query(q): Query<NoticeQuery>,
) -> AppResult<Response> {
    let notice = match q.notice.as_str() {
        "saved" => "変更を保存しました。",
        "disabled" => "アカウントを無効にしました。ログイン中の画面は終了しました。",
        "active" => "アカウントを有効に戻しました。",
        "unlocked" => "ロックを解除しました。",
        _ => "",
    };
    user_detail_page(&state, &a, &id, StatusCode::OK, notice, Vec::new()).await
}

async fn user_update(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(input): Form<UserInput>,
) -> AppResult<Response> {
    match ops::update_user(&state, &a, &id, &input).await {
        Ok(_) => Ok(Redirect::to(&format!("/admin/users/{id}?notice=saved")).into_response()),
        Err(AppError::Validation(errors)) => {
            user_detail_page(
                &state,
                &a,
                &id,
                StatusCode::UNPROCESSABLE_ENTITY,
                "",
                errors,
            )
            .await
        }
        Err(AppError::Conflict(m)) => {
            user_detail_page(
                &state,
                &a,
                &id,
                StatusCode::CONFLICT,
                "",
                vec![FieldError {
                    field: "role".into(),
                    message: m,
                }],
            )
            .await
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct StatusForm {
    #[serde(default)]
    status: String,
}

async fn user_status(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<StatusForm>,
) -> AppResult<Response> {
    let status = UserStatus::parse(&f.status)
        .ok_or_else(|| AppError::BadRequest("状態の指定が正しくありません。".into()))?;
    match ops::set_status(&state, &a, &id, status).await {
        Ok(_) => Ok(
            Redirect::to(&format!("/admin/users/{id}?notice={}", status.as_str())).into_response(),
        ),
        Err(AppError::Conflict(m)) => {
            user_detail_page(
                &state,
                &a,
                &id,
                StatusCode::CONFLICT,
                "",
                vec![FieldError {
                    field: "status".into(),
                    message: m,
                }],
            )
            .await
        }
        Err(e) => Err(e),
    }
}

async fn user_unlock(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    ops::unlock_user(&state, &a, &id).await?;
    Ok(Redirect::to(&format!("/admin/users/{id}?notice=unlocked")).into_response())
}

async fn user_reset(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let (u, temp) = ops::reset_password(&state, &a, &id).await?;
    render(&TempPasswordPage {
        l: Layout::for_user(&a, "仮パスワードを再発行しました", "users"),
        heading: "仮パスワードを再発行しました".into(),
        display_name: u.display_name,
        login_id: u.login_id,
        user_id: u.id,
        temp_password: temp,
        temp_hours: a.ctx.tenant.settings.password.temporary_valid_hours,
    })
}

#[derive(Template)]
#[template(path = "admin/user_delete.html")]
struct UserDeletePage {
    l: Layout,
    u: UserView,
}

async fn user_delete_confirm(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let u = ops::visible_user(&state, &a, &id).await?;
    if policy::manage_user(a.actor(), &u.target()) != policy::Decision::Allow {
        return Err(AppError::Forbidden);
    }
    render(&UserDeletePage {
        l: Layout::for_user(&a, "ユーザーの削除", "users"),
        u: UserView::of(&u, a.ctx.now),
    })
}

#[derive(Template)]
#[template(path = "admin/message.html")]
struct MessagePage {
    l: Layout,
    heading: String,
    message: String,
    back: String,
    back_label: String,
}

async fn user_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    match ops::delete_user(&state, &a, &id).await {
        Ok(u) => render(&MessagePage {
            l: Layout::for_user(&a, "ユーザーを削除しました", "users"),
            heading: "ユーザーを削除しました".into(),
            message: format!("{}（{}）を削除しました。", u.display_name, u.login_id),
            back: "/admin/users".into(),
            back_label: "ユーザー一覧へ".into(),
        }),
        Err(AppError::Conflict(m)) => {
            user_detail_page(
                &state,
                &a,
                &id,
                StatusCode::CONFLICT,
                "",
                vec![FieldError {
                    field: "delete".into(),
                    message: m,
                }],
            )
            .await
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- unused accounts

#[derive(Deserialize)]
struct UnusedQuery {
    #[serde(default)]
    days: Option<String>,
}

#[derive(Template)]
#[template(path = "admin/unused.html")]
struct UnusedPage {
    l: Layout,
    days: i64,
    since: String,
    users: Vec<UserView>,
    total: i64,
    error: String,
}

async fn unused_list(
    state: &Shared,
    a: &Authed,
    q: &UnusedQuery,
) -> AppResult<(i64, i64, Vec<storage::User>, i64, String)> {
    let scope = ops::scope_of(a)?;
    let (days, error) = match q.days.as_deref() {
        None | Some("") => (90, String::new()),
        Some(v) => match domain::validate::number_in("日数", v, 1, 3650) {
            Ok(n) => (n, String::new()),
            Err(e) => (90, e),
        },
    };
    let since = a.ctx.now - days * domain::clock::DAY_MS;
    let f = UserFilter {
        unused_since: Some(since),
        ..Default::default()
    };
    let (list, total) = state
        .store
        .list_users(&a.ctx.tenant.id, &scope, &f, 200_000, 0)
        .await?;
    Ok((days, since, list, total, error))
}

async fn unused(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UnusedQuery>,
) -> AppResult<Response> {
    let (days, since, list, total, error) = unused_list(&state, &a, &q).await?;
    render(&UnusedPage {
        l: Layout::for_user(&a, "未使用アカウント", "unused"),
        days,
        since: domain::time::format_jst(since),
        users: list
            .iter()
            .take(1000)
            .map(|u| UserView::of(u, a.ctx.now))
            .collect(),
        total,
        error,
    })
}

async fn unused_csv(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<UnusedQuery>,
) -> AppResult<Response> {
    let (days, _, list, total, _) = unused_list(&state, &a, &q).await?;
    let body = csvout::build(&USER_CSV_HEADERS, user_rows(&list))
        .map_err(|e| AppError::Internal(e.to_string()))?;
    state
        .store
        .append_audit(&a.audit().with(
            "users.export",
            "users:unused",
            serde_json::json!({"rows": total, "days": days}),
        ))
        .await?;
    Ok(csvout::response(&format!("unused-{days}days.csv"), body))
}

// ---------------------------------------------------------------- import

#[derive(Template)]
#[template(path = "admin/import.html")]
struct ImportPage {
    l: Layout,
    errors: Vec<RowError>,
    create_departments: bool,
}

#[derive(Template)]
#[template(path = "admin/import_preview.html")]
struct ImportPreviewPage {
    l: Layout,
    plan: ImportPlan,
    pending_id: String,
    shown: usize,
    rows: Vec<domain::import::ImportRow>,
}

#[derive(Template)]
#[template(path = "admin/import_done.html")]
struct ImportDonePage {
    l: Layout,
    users: usize,
    departments: usize,
    issued: Vec<ops::IssuedPassword>,
    temp_hours: u32,
}

async fn import_form(a: Authed) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    render(&ImportPage {
        l: Layout::for_user(&a, "CSVで一括登録", "import"),
        errors: Vec::new(),
        create_departments: false,
    })
}

fn import_errors_page(
    a: &Authed,
    errors: Vec<RowError>,
    create_departments: bool,
) -> AppResult<Response> {
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &ImportPage {
            l: Layout::for_user(a, "CSVで一括登録", "import"),
            errors,
            create_departments,
        },
    )
}

async fn import_upload(
    State(state): State<Shared>,
    a: Authed,
    mp: Multipart,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let up = crate::form::read_upload(mp).await?;
    let create_departments = up.fields.contains_key("create_departments");
    let file = up.file;
    let Some(bytes) = file.filter(|b| !b.is_empty()) else {
        return import_errors_page(
            &a,
            vec![RowError {
                line: 0,
                message: "CSVファイルを選んでください。".into(),
            }],
            create_departments,
        );
    };
    match ops::import_check(&state, &a, &bytes, create_departments).await? {
        Err(errors) => import_errors_page(&a, errors, create_departments),
        Ok(plan) => {
            let pending_id = ops::import_stage(&state, &a, &bytes, create_departments).await?;
            let shown = plan.users.len().min(200);
            let rows = plan.users[..shown].to_vec();
            render(&ImportPreviewPage {
                l: Layout::for_user(&a, "取り込み内容の確認", "import"),
                shown,
                rows,
                plan,
                pending_id,
            })
        }
    }
}

async fn import_confirm(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let pending = state
        .store
        .pending_import(&a.ctx.tenant.id, &a.auth.user.id, &id)
        .await?;
    match ops::import_apply(
        &state,
        &a,
        &ops::staged_bytes(&pending)?,
        pending.create_departments,
        Some(&id),
    )
    .await
    {
        Ok(Ok((outcome, issued, _))) => render(&ImportDonePage {
            l: Layout::for_user(&a, "一括登録が完了しました", "import"),
            users: outcome.users_created,
            departments: outcome.departments_created,
            issued,
            temp_hours: a.ctx.tenant.settings.password.temporary_valid_hours,
        }),
        Ok(Err(errors)) => import_errors_page(&a, errors, pending.create_departments),
        Err(AppError::Conflict(m)) => import_errors_page(
            &a,
            vec![RowError {
                line: 0,
                message: m,
            }],
            pending.create_departments,
        ),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- departments

#[derive(Template)]
#[template(path = "admin/departments.html")]
struct DepartmentsPage {
    l: Layout,
    departments: Vec<DeptOption>,
    notice: String,
    errors: Vec<FieldError>,
    name: String,
}

async fn departments_page(
    state: &Shared,
    a: &Authed,
    status: StatusCode,
    notice: &str,
    errors: Vec<FieldError>,
    name: &str,
) -> AppResult<Response> {
    ops::require_tenant_admin(a)?;
    let list = state.store.list_departments(&a.ctx.tenant.id).await?;
    render_status(
        status,
        &DepartmentsPage {
            l: Layout::for_user(a, "部署", "departments"),
            departments: list.iter().map(DeptOption::of).collect(),
            notice: notice.into(),
            errors,
            name: name.into(),
        },
    )
}

async fn departments(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<NoticeQuery>,
) -> AppResult<Response> {
    let notice = match q.notice.as_str() {
        "created" => "部署を追加しました。",
        "renamed" => "部署名を変更しました。",
        "deleted" => "部署を削除しました。",
        _ => "",
    };
    departments_page(&state, &a, StatusCode::OK, notice, Vec::new(), "").await
}

#[derive(Deserialize)]
struct DeptForm {
    #[serde(default)]
    parent_id: String,
    #[serde(default)]
    name: String,
}

fn dept_failure(e: AppError) -> AppResult<Vec<FieldError>> {
    match e {
        AppError::Validation(f) => Ok(f),
        AppError::Conflict(m) => Ok(vec![FieldError {
            field: "name".into(),
            message: m,
        }]),
        other => Err(other),
    }
}

async fn department_create(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<DeptForm>,
) -> AppResult<Response> {
    match ops::create_department(&state, &a, &f.parent_id, &f.name).await {
        Ok(_) => Ok(Redirect::to("/admin/departments?notice=created").into_response()),
        Err(e) => {
            let errors = dept_failure(e)?;
            departments_page(
                &state,
                &a,
                StatusCode::UNPROCESSABLE_ENTITY,
                "",
                errors,
                &f.name,
            )
            .await
        }
    }
}

async fn department_rename(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<DeptForm>,
) -> AppResult<Response> {
    match ops::rename_department(&state, &a, &id, &f.name).await {
        Ok(_) => Ok(Redirect::to("/admin/departments?notice=renamed").into_response()),
        Err(e) => {
            let errors = dept_failure(e)?;
            departments_page(&state, &a, StatusCode::UNPROCESSABLE_ENTITY, "", errors, "").await
        }
    }
}

async fn department_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    match ops::delete_department(&state, &a, &id).await {
        Ok(()) => Ok(Redirect::to("/admin/departments?notice=deleted").into_response()),
        Err(e) => {
            let errors = dept_failure(e)?;
            departments_page(&state, &a, StatusCode::CONFLICT, "", errors, "").await
        }
    }
}

// ---------------------------------------------------------------- settings

#[derive(Template)]
#[template(path = "admin/settings.html")]
struct SettingsPage {
    l: Layout,
    s: TenantSettings,
    notice: String,
    errors: Vec<FieldError>,
}

async fn settings(a: Authed, Query(q): Query<NoticeQuery>) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    render(&SettingsPage {
        l: Layout::for_user(&a, "設定", "settings"),
        s: a.ctx.tenant.settings.clone(),
        notice: if q.notice == "saved" {
            "設定を保存しました。".into()
        } else {
            String::new()
        },
        errors: Vec::new(),
    })
}

#[derive(Deserialize)]
struct SettingsForm {
    #[serde(default)]
    banner: String,
    #[serde(default)]
    password_min_length: String,
    #[serde(default)]
    password_temporary_valid_hours: String,
    #[serde(default)]
    lockout_user_max_failures: String,
    #[serde(default)]
    lockout_user_window_minutes: String,
    #[serde(default)]
    lockout_user_lock_minutes: String,
    #[serde(default)]
    lockout_admin_max_failures: String,
    #[serde(default)]
    lockout_admin_window_minutes: String,
    #[serde(default)]
    lockout_admin_lock_minutes: String,
    #[serde(default)]
    session_user_idle_minutes: String,
    #[serde(default)]
    session_user_absolute_minutes: String,
    #[serde(default)]
    session_admin_idle_minutes: String,
    #[serde(default)]
    session_admin_absolute_minutes: String,
}

impl SettingsForm {
    /// Reads the numbers; a field that is not a number keeps its old value and is reported.
    fn apply(&self, base: &TenantSettings) -> (TenantSettings, Vec<FieldError>) {
        let mut s = base.clone();
        let mut errs = Vec::new();
        s.banner = self.banner.clone();
        let mut num =
            |field: &str, label: &str, v: &str, target: &mut u32| match v.trim().parse::<u32>() {
                Ok(n) => *target = n,
                Err(_) => errs.push(FieldError {
                    field: field.into(),
                    message: format!("{label}は半角数字で入力してください。"),
                }),
            };
        num(
            "password_min_length",
            "パスワードの最小文字数",
            &self.password_min_length,
            &mut s.password.min_length,
        );
        num(
            "password_temporary_valid_hours",
            "仮パスワードの有効期間",
            &self.password_temporary_valid_hours,
            &mut s.password.temporary_valid_hours,
        );
        num(
            "lockout_user_max_failures",
            "一般職員のロックまでの失敗回数",
            &self.lockout_user_max_failures,
            &mut s.lockout_user.max_failures,
        );
        num(
            "lockout_user_window_minutes",
            "一般職員の失敗回数を数える期間",
            &self.lockout_user_window_minutes,
            &mut s.lockout_user.window_minutes,
        );
        num(
            "lockout_user_lock_minutes",
            "一般職員のロックする時間",
            &self.lockout_user_lock_minutes,
            &mut s.lockout_user.lock_minutes,
        );
        num(
            "lockout_admin_max_failures",
            "管理者のロックまでの失敗回数",
            &self.lockout_admin_max_failures,
            &mut s.lockout_admin.max_failures,
        );
        num(
            "lockout_admin_window_minutes",
            "管理者の失敗回数を数える期間",
            &self.lockout_admin_window_minutes,
            &mut s.lockout_admin.window_minutes,
        );
        num(
            "lockout_admin_lock_minutes",
            "管理者のロックする時間",
            &self.lockout_admin_lock_minutes,
            &mut s.lockout_admin.lock_minutes,
        );
        num(
            "session_user_idle_minutes",
            "一般職員の無操作タイムアウト",
            &self.session_user_idle_minutes,
            &mut s.session_user.idle_minutes,
        );
        num(
            "session_user_absolute_minutes",
            "一般職員の最大ログイン時間",
            &self.session_user_absolute_minutes,
            &mut s.session_user.absolute_minutes,
        );
        num(
            "session_admin_idle_minutes",
            "管理者の無操作タイムアウト",
            &self.session_admin_idle_minutes,
            &mut s.session_admin.idle_minutes,
        );
        num(
            "session_admin_absolute_minutes",
            "管理者の最大ログイン時間",
            &self.session_admin_absolute_minutes,
            &mut s.session_admin.absolute_minutes,
        );
        (s, errs)
    }
}

async fn settings_save(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<SettingsForm>,
) -> AppResult<Response> {
    ops::require_tenant_admin(&a)?;
    let (s, mut errors) = f.apply(&a.ctx.tenant.settings);
    if errors.is_empty() {
        match ops::update_settings(&state, &a, &s).await {
            Ok(()) => return Ok(Redirect::to("/admin/settings?notice=saved").into_response()),
            Err(AppError::Validation(e)) => errors = e,
            Err(e) => return Err(e),
        }
    }
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &SettingsPage {
            l: Layout::for_user(&a, "設定", "settings"),
            s,
            notice: String::new(),
            errors,
        },
    )
}

// ---------------------------------------------------------------- audit

pub const ACTIONS: &[(&str, &str)] = &[
    ("auth.login", "ログイン"),
    ("auth.logout", "ログアウト"),
    ("auth.lockout", "アカウントロック"),
    ("auth.session_end", "セッション終了（タイムアウト等）"),
    ("auth.password_change", "パスワード変更"),
    ("user.create", "ユーザー登録"),
    ("user.update", "ユーザー変更"),
    ("user.disable", "ユーザー無効化"),
    ("user.enable", "ユーザー有効化"),
    ("user.delete", "ユーザー削除"),
    ("user.password_reset", "仮パスワード再発行"),
    ("user.unlock", "ロック解除"),
    ("user.import", "CSV一括登録"),
    ("users.export", "ユーザー一覧の出力"),
    ("department.create", "部署作成"),
    ("department.rename", "部署名変更"),
    ("department.delete", "部署削除"),
    ("settings.update", "設定変更"),
    ("tenant.create", "自治体の作成"),
    ("tenant_key.create", "保存ファイルの暗号鍵の作成"),
    ("files.encrypt", "以前の版の保存ファイルの暗号化"),
    ("audit.export", "監査ログの出力"),
    ("request.denied", "権限のない操作（拒否）"),
    ("request.csrf_rejected", "不正な送信（拒否）"),
    ("provider.save", "AIサービスの設定"),
    ("model.save", "AIモデルの設定"),
    ("eval.start", "モデルの評価の開始"),
    ("collection.create", "ナレッジの作成"),
    ("collection.update", "ナレッジの設定の変更"),
    ("collection.delete", "ナレッジの削除"),
    ("document.upload", "ナレッジへの文書の登録"),
    ("document.delete", "ナレッジの文書の削除"),
    ("document.infected", "ウイルスを検知した文書の拒否"),
    ("knowledge.embedder", "ナレッジ検索の埋め込みモデルの設定"),
    ("chat.send", "チャットの送信"),
    ("chat.regenerate", "回答の再生成"),
    ("conversation.delete", "会話の削除（利用者）"),
    ("usage.allocation", "部署への配分の変更"),
    ("usage.user_cap", "職員の利用上限の変更"),
    ("template.create", "テンプレートの作成"),
    ("template.update", "テンプレートの変更"),
    ("template.delete", "テンプレートの削除"),
    ("log.view", "チャットログの閲覧"),
    ("log.view_conversation", "会話の記録の閲覧"),
    ("log.export", "チャットログの出力"),
    ("api_token.create", "API キーの発行"),
    ("api_token.revoke", "API キーの無効化"),
    ("retention.hold", "保全の設定"),
    ("retention.release", "保全の解除"),
    ("retention.purge", "保存期間を過ぎた記録の削除"),
    ("disposal.user", "職員の記録の廃棄"),
    ("disposal.department", "部署の記録の廃棄"),
    ("disposal.request", "自治体の全データの廃棄の依頼"),
    ("disposal.cancel", "廃棄の依頼の取消し"),
    ("disposal.tenant", "自治体の全データの廃棄"),
    ("disposal.certificate", "廃棄証明書の出力"),
    ("tenant.export", "全データの書き出し"),
    ("alert.acknowledge", "アラートの確認"),
];

pub fn action_label(code: &str) -> String {
    ACTIONS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, l)| l.to_string())
        .unwrap_or_else(|| code.to_string())
}

/// The object of an audit record as a person reads it: `ユーザー yamada.hanako` rather
/// than `user:0190…` (the id stays in the CSV and the API).
fn describe_target(target: &str, detail: &str, actor: &str) -> String {
    let d: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
    let text = |k: &str| d.get(k).and_then(|v| v.as_str()).map(str::to_string);
    match target.split_once(':') {
        // Sign-ins and the like concern the actor's own account.
        Some(("user", _)) => format!(
            "ユーザー {}",
            text("login_id").unwrap_or_else(|| actor.to_string())
        ),
        Some(("department", _)) => match text("path").or_else(|| text("after")) {
            Some(p) => format!("部署 {p}"),
            None => "部署".into(),
        },
        Some(("tenant", _)) => "自治体".into(),
        _ => target.to_string(),
    }
}

/// Details as `key: value` lines, nested values kept as compact JSON.
fn detail_text(detail: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(detail) {
        Ok(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => detail.to_string(),
    }
}

fn result_label(r: &str) -> &'static str {
    match r {
        "success" => "成功",
        "failure" => "失敗",
        "denied" => "拒否",
        _ => "-",
    }
}

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub result: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub page: Option<i64>,
}

impl AuditQuery {
    pub fn filter(&self) -> Result<AuditFilter, String> {
        let date = |label: &str, v: &str| -> Result<Option<i64>, String> {
            if v.trim().is_empty() {
                return Ok(None);
            }
            domain::time::parse_jst_date(v)
                .map(Some)
                .ok_or_else(|| format!("{label}は 2026-04-01 の形式で入力してください。"))
        };
        Ok(AuditFilter {
            action_prefix: Some(self.action.clone()).filter(|s| !s.is_empty()),
            actor_login: Some(self.actor.chars().take(100).collect()),
            result: Some(self.result.clone())
                .filter(|s| s == "success" || s == "failure" || s == "denied"),
            from_ms: date("開始日", &self.from)?,
            to_ms: date("終了日", &self.to)?.map(|t| t + domain::clock::DAY_MS),
        })
    }
    fn query_string(&self) -> String {
        format!(
            "action={}&actor={}&result={}&from={}&to={}",
            url_encode(&self.action),
            url_encode(&self.actor),
            url_encode(&self.result),
            url_encode(&self.from),
            url_encode(&self.to)
        )
    }
}

pub struct AuditRow {
    seq: i64,
    at: String,
    actor: String,
    action: String,
    target: String,
    result: &'static str,
    ip: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "admin/audit.html")]
struct AuditPage {
    l: Layout,
    rows: Vec<AuditRow>,
    actions: &'static [(&'static str, &'static str)],
    f_action: String,
    f_actor: String,
    f_result: String,
    f_from: String,
    f_to: String,
    error: String,
    total_label: String,
    page_label: String,
    prev_link: Option<String>,
    next_link: Option<String>,
    csv_link: String,
}

fn require_audit(a: &Authed) -> AppResult<()> {
    if policy::can_read_audit(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

async fn audit(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<AuditQuery>,
) -> AppResult<Response> {
    require_audit(&a)?;
    let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let (filter, error) = match q.filter() {
        Ok(f) => (f, String::new()),
        Err(e) => (AuditFilter::default(), e),
    };
    let (recs, total) = state
        .store
        .list_audit(&a.ctx.tenant.id, &filter, PAGE_SIZE, (page - 1) * PAGE_SIZE)
        .await?;
    let base = format!("/admin/audit?{}", q.query_string());
    let (prev_link, next_link, page_label) = page_links(&base, page, total);
    let rows = recs
        .into_iter()
        .map(|r| AuditRow {
            seq: r.seq,
            at: domain::time::format_jst_compact(r.at_ms),
            actor: if r.actor_login.is_empty() {
                "-".into()
            } else {
                r.actor_login.clone()
            },
            action: action_label(&r.action),
            target: describe_target(&r.target, &r.detail, &r.actor_login),
            result: result_label(&r.result),
            ip: r.ip,
            detail: detail_text(&r.detail),
        })
        .collect();
    render(&AuditPage {
        l: Layout::for_user(&a, "監査ログ", "audit"),
        rows,
        actions: ACTIONS,
        error,
        total_label: format!("{}件", number(total)),
        page_label,
        prev_link,
        next_link,
        csv_link: format!("/admin/audit.csv?{}", q.query_string()),
        f_action: q.action,
        f_actor: q.actor,
        f_result: q.result,
        f_from: q.from,
        f_to: q.to,
    })
}

async fn audit_csv(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<AuditQuery>,
) -> AppResult<Response> {
    require_audit(&a)?;
    let filter = q.filter().map_err(AppError::BadRequest)?;
    let (recs, total) = state
        .store
        .list_audit(&a.ctx.tenant.id, &filter, 500_000, 0)
        .await?;
    let rows = recs.into_iter().map(|r| {
        vec![
            r.seq.to_string(),
            domain::time::format_jst_compact(r.at_ms),
            domain::time::format_utc(r.at_ms),
            r.actor_login,
            r.ip,
            r.user_agent,
            r.action.clone(),
            action_label(&r.action),
            r.target,
            result_label(&r.result).to_string(),
            r.detail,
            r.hash,
        ]
    });
    let body = csvout::build(
        &[
            "番号",
            "日時（日本時間）",
            "日時（UTC）",
            "操作者",
            "接続元",
            "ブラウザ",
            "操作コード",
            "操作",
            "対象",
            "結果",
            "詳細",
            "ハッシュ",
        ],
        rows,
    )
    .map_err(|e| AppError::Internal(e.to_string()))?;
    state
        .store
        .append_audit(&a.audit().with(
            "audit.export",
            "audit",
            serde_json::json!({"rows": total, "query": q.query_string()}),
        ))
        .await?;
    Ok(csvout::response("audit.csv", body))
}

async fn admin_home(a: Authed) -> AppResult<Response> {
    if policy::user_scope(a.actor()).is_some() {
        Ok(Redirect::to("/admin/users").into_response())
    } else if policy::can_read_audit(a.actor()) {
        Ok(Redirect::to("/admin/audit").into_response())
    } else {
        Err(AppError::Forbidden)
    }
}

pub fn routes(max_import: usize) -> Router<Shared> {
    Router::new()
        .route("/admin", get(admin_home))
        .route("/admin/users", get(users))
        .route("/admin/users.csv", get(users_csv))
        .route("/admin/users/new", get(user_new).post(user_create))
        .route("/admin/users/unused", get(unused))
        .route("/admin/users/unused.csv", get(unused_csv))
        .route(
            "/admin/users/import",
            get(import_form)
                .post(import_upload)
                .layer(DefaultBodyLimit::max(max_import)),
        )
        .route("/admin/users/import/{id}/confirm", post(import_confirm))
        .route("/admin/users/{id}", get(user_detail).post(user_update))
        .route("/admin/users/{id}/status", post(user_status))
        .route("/admin/users/{id}/reset-password", post(user_reset))
        .route("/admin/users/{id}/unlock", post(user_unlock))
        .route(
            "/admin/users/{id}/delete",
            get(user_delete_confirm).post(user_delete),
        )
        .route(
            "/admin/departments",
            get(departments).post(department_create),
        )
        .route("/admin/departments/{id}/rename", post(department_rename))
        .route("/admin/departments/{id}/delete", post(department_delete))
        .route("/admin/settings", get(settings).post(settings_save))
        .route("/admin/audit", get(audit))
        .route("/admin/audit.csv", get(audit_csv))
}
