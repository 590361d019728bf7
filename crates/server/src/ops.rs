//! What staff and admins do, once for every transport: the HTML pages and the JSON API
//! both call these. Each operation asks `domain::policy` first, validates its input, and
//! leaves an audit record through the store.

use crate::app::{Authed, Ctx, Shared};
use crate::error::{AppError, AppResult};
use domain::import::{ImportPlan, RowError};
use domain::policy::{self, Decision, UserScope};
use domain::settings::{FieldError, TenantSettings};
use domain::{validate, Role};
use serde::{Deserialize, Serialize};
use storage::{
    Department, ImportOutcome, NewUser, PendingImport, Session, User, UserStatus, UserUpdate,
};

pub(crate) fn decide(d: Decision) -> AppResult<()> {
    match d {
        Decision::Allow => Ok(()),
        Decision::Forbidden => Err(AppError::Forbidden),
        Decision::NotFound => Err(AppError::NotFound),
    }
}

fn fe(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.into(),
        message,
    }
}

/// A fresh temporary password (shown once), its hash and when it expires.
pub struct Temporary {
    pub password: String,
    pub hash: String,
    pub until: i64,
}

/// Issues a temporary password under the tenant's policy, hashing it off the async threads.
pub async fn issue_temporary(
    cost: domain::password::HashCost,
    policy: &domain::settings::PasswordPolicy,
    now: i64,
) -> AppResult<Temporary> {
    let password = domain::password::generate_temporary(policy);
    let p = password.clone();
    let hash = tokio::task::spawn_blocking(move || domain::password::hash(&p, cost))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let until = now + i64::from(policy.temporary_valid_hours) * domain::clock::HOUR_MS;
    Ok(Temporary {
        password,
        hash,
        until,
    })
}

// ---------------------------------------------------------------- sign-in

pub enum LoginError {
    /// Unknown account, wrong password or disabled account: one message for all.
    Invalid,
    Locked,
    TemporaryExpired,
}

impl LoginError {
    pub fn message(&self) -> &'static str {
        match self {
            LoginError::Invalid => "ログインIDまたはパスワードが正しくありません。",
            LoginError::Locked => "ログインに続けて失敗したため、このアカウントは一時的にロックされています。しばらく時間をおいてから再度お試しいただくか、情報管理者に連絡してください。",
            LoginError::TemporaryExpired => "仮パスワードの有効期限が切れています。情報管理者に仮パスワードの再発行を依頼してください。",
        }
    }
    pub fn code(&self) -> &'static str {
        match self {
            LoginError::Invalid => "invalid_credentials",
            LoginError::Locked => "locked",
            LoginError::TemporaryExpired => "temporary_password_expired",
        }
    }
}

pub struct LoginOk {
    /// The session token for the cookie (only its digest is stored).
    pub token: String,
    pub session: Session,
    pub user: User,
}

/// Signs in. Every outcome is recorded; a locked account is not even checked.
pub async fn login(
    state: &Shared,
    ctx: &Ctx,
    login_id: &str,
    password: &str,
) -> AppResult<Result<LoginOk, LoginError>> {
    let now = ctx.now;
    let typed: String = login_id.trim().chars().take(100).collect();
    let user = match validate::login_id(&typed) {
        Ok(id) => match state.store.user_by_login(&ctx.tenant.id, &id).await {
            Ok(u) => Some(u),
            Err(storage::StorageError::NotFound) => None,
            Err(e) => return Err(e.into()),
        },
        Err(_) => None,
    };
    let attempt = storage::LoginAttempt {
        tenant_id: &ctx.tenant.id,
        typed_login: &typed,
        ip: &ctx.ip,
        now,
    };
    let mut ev = ctx.audit();
    ev.actor_login = typed.clone();
    ev.actor_id = user.as_ref().map(|u| u.id.clone());
    let role = user.as_ref().map(|u| u.role).unwrap_or(Role::User);
    let lockout = ctx.tenant.settings.lockout_for(role);

    if let Some(u) = &user {
        if u.locked_until.is_some_and(|t| t > now) {
            state
                .store
                .record_login_failure(&attempt, Some(u), lockout, "locked", ev)
                .await?;
            return Ok(Err(LoginError::Locked));
        }
    }
    let too_long = password.chars().count() > domain::password::MAX_LENGTH;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| state.dummy_hash.clone());
    let verified = !too_long && state.verify_password(password.to_string(), hash).await?;
    let u = match user {
        None => {
            state
                .store
                .record_login_failure(&attempt, None, lockout, "unknown_user", ev)
                .await?;
            return Ok(Err(LoginError::Invalid));
        }
        Some(u) if !verified => {
            let locked = state
                .store
                .record_login_failure(&attempt, Some(&u), lockout, "bad_password", ev)
                .await?;
            return Ok(Err(if locked.is_some() {
                LoginError::Locked
            } else {
                LoginError::Invalid
            }));
        }
        Some(u) => u,
    };
    if u.status != UserStatus::Active {
        state
            .store
            .record_login_failure(&attempt, Some(&u), lockout, "disabled", ev)
            .await?;
        return Ok(Err(LoginError::Invalid));
    }
    if u.password_temporary && u.password_expires_at.is_some_and(|t| t <= now) {
        state
            .store
            .record_login_failure(&attempt, Some(&u), lockout, "temporary_expired", ev)
            .await?;
        return Ok(Err(LoginError::TemporaryExpired));
    }
    // Signing in again from the same browser replaces the session it had.
    if let Some(old) = &ctx.auth {
        let ev = ctx.audit().with(
            "auth.session_end",
            format!("user:{}", old.user.id),
            serde_json::json!({"reason": "replaced"}),
        );
        state.store.end_session(&old.session.id, Some(ev)).await?;
    }
    // A fresh session id at every sign-in: 256 random bits.
    let token = domain::ids::random_token(32);
    let csrf = domain::ids::random_token(32);
    let digest = domain::ids::token_digest(&token);
    let session = state
        .store
        .record_login_success(&attempt, &u, &digest, &csrf, &ctx.user_agent, ev)
        .await?;
    Ok(Ok(LoginOk {
        token,
        session,
        user: u,
    }))
}

pub async fn logout(state: &Shared, a: &Authed) -> AppResult<()> {
    let ev = a.audit().with(
        "auth.logout",
        format!("user:{}", a.auth.user.id),
        serde_json::json!({}),
    );
    state
        .store
        .end_session(&a.auth.session.id, Some(ev))
        .await?;
    Ok(())
}

/// Changes one's own password. Other sessions of the account end; this one stays.
pub async fn change_password(
    state: &Shared,
    a: &Authed,
    current: &str,
    new: &str,
    confirm: &str,
) -> AppResult<()> {
    let u = &a.auth.user;
    let mut errs = Vec::new();
    let current_ok = current.chars().count() <= domain::password::MAX_LENGTH
        && state
            .verify_password(current.to_string(), u.password_hash.clone())
            .await?;
    if !current_ok {
        errs.push(fe(
            "current_password",
            "現在のパスワードが正しくありません。".into(),
        ));
    }
    if let Err(es) = domain::password::check_new(new, &u.login_id, &a.ctx.tenant.settings.password)
    {
        errs.extend(es.into_iter().map(|m| fe("new_password", m)));
    }
    if new != confirm {
        errs.push(fe(
            "confirm_password",
            "確認用のパスワードが一致しません。".into(),
        ));
    }
    if current_ok && new == current {
        errs.push(fe(
            "new_password",
            "現在と同じパスワードは使えません。".into(),
        ));
    }
    if !errs.is_empty() {
        return Err(AppError::Validation(errs));
    }
    let hash = state.hash_password(new.to_string()).await?;
    state
        .store
        .set_password(
            &u.tenant_id,
            &u.id,
            &hash,
            None,
            Some(&a.auth.session.id),
            a.ctx.now,
            a.audit(),
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- accounts

/// An account as admins see it (no password hash).
#[derive(Clone, Debug, Serialize)]
pub struct UserView {
    pub id: String,
    pub login_id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub department_id: String,
    pub department_path: String,
    pub role: Role,
    pub role_label: &'static str,
    pub status: UserStatus,
    pub status_label: &'static str,
    pub password_temporary: bool,
    pub locked: bool,
    pub last_login_at: Option<String>,
    pub last_login_jst: String,
    pub created_at: String,
}

impl UserView {
    pub fn of(u: &User, now: i64) -> UserView {
        UserView {
            id: u.id.clone(),
            login_id: u.login_id.clone(),
            display_name: u.display_name.clone(),
            email: u.email.clone(),
            department_id: u.department_id.clone(),
            department_path: u.department_path.clone(),
            role: u.role,
            role_label: u.role.label(),
            status: u.status,
            status_label: u.status.label(),
            password_temporary: u.password_temporary,
            locked: u.locked_until.is_some_and(|t| t > now),
            last_login_at: u.last_login_at.map(domain::time::format_utc),
            last_login_jst: u
                .last_login_at
                .map(domain::time::format_jst)
                .unwrap_or_else(|| "未ログイン".into()),
            created_at: domain::time::format_utc(u.created_at),
        }
    }
}

/// Input for creating or changing an account, as typed.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct UserInput {
    #[serde(default)]
    pub login_id: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub department_id: String,
    #[serde(default)]
    pub role: String,
}

/// The user-list filter as typed in a form or query string (blank means "any").
pub fn user_filter(query: &str, department: &str, role: &str, status: &str) -> storage::UserFilter {
    storage::UserFilter {
        query: Some(query.chars().take(100).collect()),
        department_path: Some(department.to_string()).filter(|s| !s.is_empty()),
        role: Role::parse(role).filter(|_| !role.is_empty()),
        status: UserStatus::parse(status),
        unused_since: None,
    }
}

pub fn scope_of(a: &Authed) -> AppResult<UserScope> {
    policy::user_scope(a.actor()).ok_or(AppError::Forbidden)
}

/// An account the caller may see; anything else is "not found".
pub async fn visible_user(state: &Shared, a: &Authed, id: &str) -> AppResult<User> {
    if !domain::ids::is_valid_id(id) {
        return Err(AppError::NotFound);
    }
    let u = state.store.user_by_id(&a.ctx.tenant.id, id).await?;
    decide(policy::view_user(a.actor(), &u.target()))?;
    Ok(u)
}

async fn department_for(
    state: &Shared,
    a: &Authed,
    id: &str,
    errs: &mut Vec<FieldError>,
) -> AppResult<Option<Department>> {
    if !domain::ids::is_valid_id(id) {
        errs.push(fe("department_id", "所属を選んでください。".into()));
        return Ok(None);
    }
    match state.store.department_by_id(&a.ctx.tenant.id, id).await {
        Ok(d) => Ok(Some(d)),
        Err(storage::StorageError::NotFound) => {
            errs.push(fe("department_id", "選ばれた所属が見つかりません。".into()));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates an account with a temporary password, returned once.
pub async fn create_user(
    state: &Shared,
    a: &Authed,
    input: &UserInput,
) -> AppResult<(User, String)> {
    scope_of(a)?;
    let mut errs = Vec::new();
    let login_id = validate::login_id(&input.login_id)
        .map_err(|e| errs.push(fe("login_id", e)))
        .ok();
    let name = validate::required_line("氏名", &input.display_name, 100)
        .map_err(|e| errs.push(fe("display_name", e)))
        .ok();
    let email = validate::email(&input.email)
        .map_err(|e| errs.push(fe("email", e)))
        .ok();
    let role = Role::parse(&input.role);
    if role.is_none() {
        errs.push(fe("role", "権限を選んでください。".into()));
    }
    let dept = department_for(state, a, &input.department_id, &mut errs).await?;
    let (Some(login_id), Some(name), Some(email), Some(role), Some(dept), true) =
        (login_id, name, email, role, dept, errs.is_empty())
    else {
        return Err(AppError::Validation(errs));
    };
    decide(policy::assign(a.actor(), role, &dept.path))?;
    let Temporary {
        password: temp,
        hash,
        until,
    } = issue_temporary(
        state.config.hash_cost(),
        &a.ctx.tenant.settings.password,
        a.ctx.now,
    )
    .await?;
    let nu = NewUser {
        tenant_id: a.ctx.tenant.id.clone(),
        login_id,
        display_name: name,
        email,
        department_id: dept.id,
        role,
        password_hash: hash,
        temporary_until: Some(until),
        now: a.ctx.now,
    };
    let u = state
        .store
        .create_user(&nu, a.audit())
        .await
        .map_err(|e| match e {
            storage::StorageError::Conflict(m) => AppError::Validation(vec![fe("login_id", m)]),
            other => other.into(),
        })?;
    Ok((u, temp))
}

/// Changes name, e-mail, department and role; blank fields stay as they are.
pub async fn update_user(
    state: &Shared,
    a: &Authed,
    id: &str,
    input: &UserInput,
) -> AppResult<User> {
    let u = visible_user(state, a, id).await?;
    decide(policy::manage_user(a.actor(), &u.target()))?;
    let mut errs = Vec::new();
    let mut up = UserUpdate::default();
    if !input.display_name.trim().is_empty() {
        up.display_name = validate::required_line("氏名", &input.display_name, 100)
            .map_err(|e| errs.push(fe("display_name", e)))
            .ok();
    }
    up.email = validate::email(&input.email)
        .map_err(|e| errs.push(fe("email", e)))
        .ok();
    let mut path = u.department_path.clone();
    if !input.department_id.is_empty() && input.department_id != u.department_id {
        if let Some(d) = department_for(state, a, &input.department_id, &mut errs).await? {
            path = d.path.clone();
            up.department_id = Some(d.id);
        }
    }
    if !input.role.is_empty() {
        match Role::parse(&input.role) {
            Some(r) => up.role = Some(r),
            None => errs.push(fe("role", "権限を選んでください。".into())),
        }
    }
    if !errs.is_empty() {
        return Err(AppError::Validation(errs));
    }
    decide(policy::assign(a.actor(), up.role.unwrap_or(u.role), &path))?;
    Ok(state
        .store
        .update_user(&u.tenant_id, &u.id, &up, a.ctx.now, a.audit())
        .await?)
}

pub async fn set_status(
    state: &Shared,
    a: &Authed,
    id: &str,
    status: UserStatus,
) -> AppResult<User> {
    let u = visible_user(state, a, id).await?;
    decide(policy::manage_user(a.actor(), &u.target()))?;
    Ok(state
        .store
        .set_user_status(&u.tenant_id, &u.id, status, a.ctx.now, a.audit())
        .await?)
}

/// Issues a new temporary password (returned once) and ends the account's sessions.
pub async fn reset_password(state: &Shared, a: &Authed, id: &str) -> AppResult<(User, String)> {
    let u = visible_user(state, a, id).await?;
    decide(policy::manage_user(a.actor(), &u.target()))?;
    let Temporary {
        password: temp,
        hash,
        until,
    } = issue_temporary(
        state.config.hash_cost(),
        &a.ctx.tenant.settings.password,
        a.ctx.now,
    )
    .await?;
    state
        .store
        .set_password(
            &u.tenant_id,
            &u.id,
            &hash,
            Some(until),
            None,
            a.ctx.now,
            a.audit(),
        )
        .await?;
    let u = state.store.user_by_id(&u.tenant_id, &u.id).await?;
    Ok((u, temp))
}

/// Lifts a sign-in lock early (the user phoned the helpdesk, say).
pub async fn unlock_user(state: &Shared, a: &Authed, id: &str) -> AppResult<User> {
    let u = visible_user(state, a, id).await?;
    decide(policy::manage_user(a.actor(), &u.target()))?;
    state
        .store
        .unlock_user(&u.tenant_id, &u.id, a.ctx.now, a.audit())
        .await?;
    Ok(state.store.user_by_id(&u.tenant_id, &u.id).await?)
}

pub async fn delete_user(state: &Shared, a: &Authed, id: &str) -> AppResult<User> {
    let u = visible_user(state, a, id).await?;
    decide(policy::manage_user(a.actor(), &u.target()))?;
    state
        .store
        .delete_user(&u.tenant_id, &u.id, a.audit())
        .await?;
    Ok(u)
}

// ---------------------------------------------------------------- departments

pub fn require_tenant_admin(a: &Authed) -> AppResult<()> {
    if policy::can_manage_tenant(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

pub async fn create_department(
    state: &Shared,
    a: &Authed,
    parent_id: &str,
    name: &str,
) -> AppResult<Department> {
    require_tenant_admin(a)?;
    let name = validate::department_name(name).map_err(|e| AppError::field("name", e))?;
    let parent = if parent_id.is_empty() {
        None
    } else if domain::ids::is_valid_id(parent_id) {
        Some(parent_id)
    } else {
        return Err(AppError::field("parent_id", "親部署が見つかりません。"));
    };
    state
        .store
        .create_department(&a.ctx.tenant.id, parent, &name, a.ctx.now, a.audit())
        .await
        .map_err(|e| match e {
            storage::StorageError::NotFound => {
                AppError::field("parent_id", "親部署が見つかりません。")
            }
            storage::StorageError::Conflict(m) => AppError::field("name", m),
            other => other.into(),
        })
}

pub async fn rename_department(
    state: &Shared,
    a: &Authed,
    id: &str,
    name: &str,
) -> AppResult<Department> {
    require_tenant_admin(a)?;
    if !domain::ids::is_valid_id(id) {
        return Err(AppError::NotFound);
    }
    let name = validate::department_name(name).map_err(|e| AppError::field("name", e))?;
    Ok(state
        .store
        .rename_department(&a.ctx.tenant.id, id, &name, a.audit())
        .await?)
}

pub async fn delete_department(state: &Shared, a: &Authed, id: &str) -> AppResult<()> {
    require_tenant_admin(a)?;
    if !domain::ids::is_valid_id(id) {
        return Err(AppError::NotFound);
    }
    Ok(state
        .store
        .delete_department(&a.ctx.tenant.id, id, a.audit())
        .await?)
}

// ---------------------------------------------------------------- import

/// The check of an uploaded CSV: either a plan to show, or every problem by row.
pub async fn import_check(
    state: &Shared,
    a: &Authed,
    bytes: &[u8],
    create_departments: bool,
) -> AppResult<Result<ImportPlan, Vec<RowError>>> {
    require_tenant_admin(a)?;
    let tenant = &a.ctx.tenant.id;
    let depts = state
        .store
        .list_departments(tenant)
        .await?
        .into_iter()
        .map(|d| d.path)
        .collect();
    let logins = state.store.login_ids(tenant).await?;
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || {
        domain::import::plan(&bytes, &depts, &logins, create_departments)
    })
    .await
    .map_err(|e| AppError::Internal(e.to_string()))
}

/// The file kept by [`import_stage`].
pub fn staged_bytes(p: &PendingImport) -> AppResult<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(&p.content)
        .map_err(|e| AppError::Internal(format!("staged import: {e}")))
}

/// Keeps a checked import until the admin confirms it.
pub async fn import_stage(
    state: &Shared,
    a: &Authed,
    bytes: &[u8],
    create_departments: bool,
) -> AppResult<String> {
    use base64::Engine;
    // The file as uploaded, so the confirmation reads it exactly as the preview did.
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let p = PendingImport {
        id: domain::ids::new_id(),
        tenant_id: a.ctx.tenant.id.clone(),
        created_by: a.auth.user.id.clone(),
        created_at: a.ctx.now,
        create_departments,
        content: text,
    };
    state.store.save_pending_import(&p).await?;
    Ok(p.id)
}

/// One created account with its temporary password, shown once.
#[derive(Clone, Debug, Serialize)]
pub struct IssuedPassword {
    pub login_id: String,
    pub display_name: String,
    pub department_path: String,
    pub temporary_password: String,
}

/// Applies an import: checked again (the tenant may have changed since the preview), then
/// every account and department in one transaction.
pub async fn import_apply(
    state: &Shared,
    a: &Authed,
    bytes: &[u8],
    create_departments: bool,
    pending_id: Option<&str>,
) -> AppResult<Result<(ImportOutcome, Vec<IssuedPassword>, ImportPlan), Vec<RowError>>> {
    let plan = match import_check(state, a, bytes, create_departments).await? {
        Ok(p) => p,
        Err(errs) => return Ok(Err(errs)),
    };
    let policy = a.ctx.tenant.settings.password.clone();
    let temps: Vec<String> = plan
        .users
        .iter()
        .map(|_| domain::password::generate_temporary(&policy))
        .collect();
    let hashes = state.hash_many(temps.clone()).await?;
    let until = a.ctx.now + i64::from(policy.temporary_valid_hours) * domain::clock::HOUR_MS;
    let outcome = state
        .store
        .apply_import(
            &a.ctx.tenant.id,
            &plan,
            &hashes,
            until,
            pending_id,
            a.ctx.now,
            a.audit(),
        )
        .await
        .map_err(|e| match e {
            storage::StorageError::Conflict(m) => AppError::Conflict(m),
            other => other.into(),
        })?;
    let issued = plan
        .users
        .iter()
        .zip(temps)
        .map(|(r, t)| IssuedPassword {
            login_id: r.login_id.clone(),
            display_name: r.display_name.clone(),
            department_path: r.department_path.clone(),
            temporary_password: t,
        })
        .collect();
    Ok(Ok((outcome, issued, plan)))
}

// ---------------------------------------------------------------- settings

pub async fn update_settings(state: &Shared, a: &Authed, s: &TenantSettings) -> AppResult<()> {
    require_tenant_admin(a)?;
    s.validate().map_err(AppError::Validation)?;
    // No department's allocation may be larger than the whole.
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut over: Vec<&str> = catalog
        .allocations
        .iter()
        .filter(|(_, v)| **v > s.usage.monthly_chars)
        .filter_map(|(id, _)| catalog.department_paths.get(id).map(String::as_str))
        .collect();
    if !over.is_empty() {
        over.sort();
        return Err(AppError::field(
            "usage.monthly_chars",
            format!(
                "全体の上限を{}文字にすると、次の部署への配分が全体を超えます: {}。先に配分を見直してください。",
                domain::usage::grouped(s.usage.monthly_chars),
                over.join("、")
            ),
        ));
    }
    let mut clean = s.clone();
    clean.banner = validate::multi_line("ログイン画面のお知らせ", &s.banner, 2000)
        .map_err(|e| AppError::field("banner", e))?;
    state
        .store
        .update_tenant_settings(&a.ctx.tenant.id, &clean, a.audit())
        .await?;
    Ok(())
}
