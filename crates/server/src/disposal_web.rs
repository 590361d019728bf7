//! Disposal on demand (M12, S16) for tenant admins: all records of a user or a department
//! at once, and of the whole tenant with a second admin's approval; each leaves a record
//! that prints as a certificate (a page and a CSV). Auditors read the records.
//!
//! After a tenant disposal its admins are gone with everything else, so the approver is
//! sent to the certificate under a key shown only to them (valid for 30 days).

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::ops;
use crate::pages::{render, render_status, Layout};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use domain::policy;
use std::collections::HashMap;
use storage::{Disposal, Operator, StorageError};

const KEY_VALID_MS: i64 = 30 * 24 * 3_600_000;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/disposal", get(page))
        .route("/admin/disposal/user", post(dispose_user))
        .route("/admin/disposal/department", post(dispose_department))
        .route("/admin/disposal/tenant", post(request_tenant))
        .route("/admin/disposal/{id}", get(certificate))
        .route("/admin/disposal/{id}/certificate.csv", get(certificate_csv))
        .route("/admin/disposal/{id}/approve", post(approve))
        .route("/admin/disposal/{id}/cancel", post(cancel))
        .route("/disposal-certificates/{id}", get(certificate_by_key))
        .route(
            "/disposal-certificates/{id}/certificate.csv",
            get(certificate_csv_by_key),
        )
}

/// 和暦 with the time in JST: 「令和8年11月30日 10:05」.
fn when(ms: i64) -> String {
    let full = domain::time::format_jst(ms);
    let time = full.rsplit(' ').next().unwrap_or_default();
    format!("{} {time}", domain::time::format_wareki(ms))
}

fn operator(a: &Authed) -> Operator {
    Operator {
        id: a.auth.user.id.clone(),
        label: format!("{}（{}）", a.auth.user.display_name, a.auth.user.login_id),
    }
}

pub struct RecordView {
    pub id: String,
    pub scope: &'static str,
    pub target: String,
    pub status: &'static str,
    pub pending: bool,
    pub requested_by: String,
    pub requested: String,
    pub executed: String,
    pub reason: String,
    pub mine: bool,
}

#[derive(Template)]
#[template(path = "admin/disposal.html")]
struct DisposalPage {
    l: Layout,
    can_dispose: bool,
    tenant_name: String,
    departments: Vec<(String, String)>,
    records: Vec<RecordView>,
    notice: String,
    errors: Vec<String>,
}

async fn view(
    state: &Shared,
    a: &Authed,
    notice: &str,
    errors: Vec<String>,
) -> AppResult<DisposalPage> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut departments: Vec<(String, String)> = catalog
        .department_paths
        .iter()
        .map(|(id, p)| (id.clone(), p.clone()))
        .collect();
    departments.sort_by(|x, y| x.1.cmp(&y.1));
    let records = state
        .store
        .disposals(&a.ctx.tenant.id)
        .await?
        .into_iter()
        .map(|d| RecordView {
            scope: d.scope_label(),
            status: d.status_label(),
            pending: d.status == "pending",
            requested: when(d.requested_at),
            executed: d.executed_at.map(when).unwrap_or_else(|| "-".into()),
            mine: d.requested_by_id == a.auth.user.id,
            id: d.id,
            target: d.target_label,
            requested_by: d.requested_by,
            reason: d.reason,
        })
        .collect();
    Ok(DisposalPage {
        l: Layout::for_user(a, "データの廃棄", "disposal"),
        can_dispose: policy::can_dispose(a.actor()),
        tenant_name: a.ctx.tenant.name.clone(),
        departments,
        records,
        notice: notice.to_string(),
        errors,
    })
}

fn require_read(a: &Authed) -> AppResult<()> {
    if policy::can_read_disposals(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

fn require_dispose(a: &Authed) -> AppResult<()> {
    if policy::can_dispose(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

async fn page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    require_read(&a)?;
    let notice = match q.get("notice").map(String::as_str) {
        Some("requested") => {
            "全データの廃棄を依頼しました。別の管理者が7日以内に承認すると実施されます。"
        }
        Some("cancelled") => "廃棄の依頼を取り消しました。",
        _ => "",
    };
    render(&view(&state, &a, notice, Vec::new()).await?)
}

/// The page again with the problems, nothing done.
async fn refuse(state: &Shared, a: &Authed, errors: Vec<String>) -> AppResult<Response> {
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &view(state, a, "", errors).await?,
    )
}

fn field<'a>(f: &'a HashMap<String, String>, name: &str) -> &'a str {
    f.get(name).map(|s| s.trim()).unwrap_or("")
}

async fn dispose_user(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    require_dispose(&a)?;
    let login = field(&f, "login_id");
    let mut errors = Vec::new();
    let reason = domain::validate::required_line("廃棄の理由", field(&f, "reason"), 200)
        .map_err(|e| errors.push(e))
        .unwrap_or_default();
    if login.is_empty() {
        errors.push("廃棄する職員のログインIDを入力してください。".into());
    } else if field(&f, "confirm") != login {
        errors.push("確認のため、同じログインIDをもう一度入力してください。".into());
    }
    if !errors.is_empty() {
        return refuse(&state, &a, errors).await;
    }
    let u = match state.store.user_by_login(&a.ctx.tenant.id, login).await {
        Ok(u) => u,
        Err(StorageError::NotFound) => {
            return refuse(
                &state,
                &a,
                vec![format!("ログインID「{login}」の職員は見つかりません。")],
            )
            .await
        }
        Err(e) => return Err(e.into()),
    };
    match state
        .store
        .dispose_user(&a.ctx.tenant.id, &u.id, &reason, &operator(&a), a.audit())
        .await
    {
        Ok(d) => {
            state.catalogs.invalidate(&a.ctx.tenant.id);
            Ok(Redirect::to(&format!("/admin/disposal/{}", d.id)).into_response())
        }
        Err(StorageError::Conflict(m)) => refuse(&state, &a, vec![m]).await,
        Err(e) => Err(e.into()),
    }
}

async fn dispose_department(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    require_dispose(&a)?;
    let id = field(&f, "department_id");
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut errors = Vec::new();
    let reason = domain::validate::required_line("廃棄の理由", field(&f, "reason"), 200)
        .map_err(|e| errors.push(e))
        .unwrap_or_default();
    let path = if id.is_empty() {
        errors.push("廃棄する部署を選んでください。".into());
        String::new()
    } else {
        // Another tenant's department is not there at all.
        catalog
            .department_paths
            .get(id)
            .cloned()
            .ok_or(AppError::NotFound)?
    };
    if !path.is_empty() && field(&f, "confirm") != path {
        errors.push(format!(
            "確認のため、部署名を「{path}」のとおりに入力してください。"
        ));
    }
    if !errors.is_empty() {
        return refuse(&state, &a, errors).await;
    }
    // The department's collections: their files and index entries go after the rows.
    let mut collections = Vec::new();
    for c in state.store.collections(&a.ctx.tenant.id).await? {
        if c.department_path
            .as_deref()
            .is_some_and(|p| policy::in_subtree(&path, p))
        {
            let docs = state.store.documents(&a.ctx.tenant.id, &c.id).await?;
            collections.push((c.id, docs));
        }
    }
    match state
        .store
        .dispose_department(&a.ctx.tenant.id, id, &reason, &operator(&a), a.audit())
        .await
    {
        Ok(d) => {
            for (_, docs) in &collections {
                crate::knowledge::forget_collection(&state, &a.ctx.tenant.id, docs).await?;
            }
            state.catalogs.invalidate(&a.ctx.tenant.id);
            Ok(Redirect::to(&format!("/admin/disposal/{}", d.id)).into_response())
        }
        Err(StorageError::Conflict(m)) => refuse(&state, &a, vec![m]).await,
        Err(e) => Err(e.into()),
    }
}

async fn request_tenant(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    require_dispose(&a)?;
    let mut errors = Vec::new();
    let reason = domain::validate::required_line("廃棄の理由", field(&f, "reason"), 200)
        .map_err(|e| errors.push(e))
        .unwrap_or_default();
    if field(&f, "confirm") != a.ctx.tenant.name {
        errors.push(format!(
            "確認のため、自治体名を「{}」のとおりに入力してください。",
            a.ctx.tenant.name
        ));
    }
    if !errors.is_empty() {
        return refuse(&state, &a, errors).await;
    }
    match state
        .store
        .request_tenant_disposal(&a.ctx.tenant.id, &reason, &operator(&a), a.audit())
        .await
    {
        Ok(_) => Ok(Redirect::to("/admin/disposal?notice=requested").into_response()),
        Err(StorageError::Conflict(m)) => refuse(&state, &a, vec![m]).await,
        Err(e) => Err(e.into()),
    }
}

async fn approve(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    require_dispose(&a)?;
    let d = state.store.disposal(&a.ctx.tenant.id, &id).await?;
    if d.scope != "tenant" || d.status != "pending" {
        return Err(AppError::NotFound);
    }
    if ops::decide(policy::approve_disposal(a.actor(), &d.requested_by_id)).is_err() {
        return refuse(
            &state,
            &a,
            vec!["廃棄を依頼した本人は承認できません。別の管理者が承認してください。".into()],
        )
        .await;
    }
    if field(&f, "confirm") != a.ctx.tenant.name {
        return refuse(
            &state,
            &a,
            vec![format!(
                "確認のため、自治体名を「{}」のとおりに入力してください。",
                a.ctx.tenant.name
            )],
        )
        .await;
    }
    let key = domain::ids::random_token(24);
    let digest = domain::ids::token_digest(&key);
    match state
        .store
        .approve_tenant_disposal(
            &a.ctx.tenant.id,
            &id,
            &operator(&a),
            (&digest, a.ctx.now + KEY_VALID_MS),
            a.audit(),
        )
        .await
    {
        Ok(d) => {
            crate::knowledge::forget_tenant(&state, &a.ctx.tenant.id).await;
            state.catalogs.invalidate(&a.ctx.tenant.id);
            state.tenants.invalidate(&a.ctx.tenant.id);
            tracing::warn!(tenant = %a.ctx.tenant.id, disposal = %d.id, "all records of the tenant disposed of");
            Ok(Redirect::to(&format!("/disposal-certificates/{}?key={key}", d.id)).into_response())
        }
        Err(StorageError::Conflict(m)) => refuse(&state, &a, vec![m]).await,
        Err(e) => Err(e.into()),
    }
}

async fn cancel(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    require_dispose(&a)?;
    state
        .store
        .cancel_disposal(&a.ctx.tenant.id, &id, a.audit())
        .await?;
    Ok(Redirect::to("/admin/disposal?notice=cancelled").into_response())
}

// ------------------------------------------------------------------ certificate

#[derive(Template)]
#[template(path = "admin/disposal_certificate.html")]
struct CertificatePage {
    title: String,
    d: Disposal,
    scope: &'static str,
    requested: String,
    approved: String,
    executed: String,
    issued: String,
    total: u64,
    csv_href: String,
    back: bool,
}

fn certificate_page(d: Disposal, now: i64, csv_href: String, back: bool) -> CertificatePage {
    CertificatePage {
        title: format!("データ廃棄証明書｜{}", d.tenant_name),
        scope: d.scope_label(),
        requested: when(d.requested_at),
        approved: match (&d.approved_by, d.approved_at) {
            (Some(by), Some(at)) => format!("{by}　{}", when(at)),
            _ => "—（職員・部署の廃棄は管理者1名で実施）".into(),
        },
        executed: d.executed_at.map(when).unwrap_or_else(|| "未実施".into()),
        issued: when(now),
        total: d.counts.iter().map(|(_, n)| n).sum(),
        csv_href,
        back,
        d,
    }
}

fn certificate_rows(d: &Disposal) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = [
        ("証明書番号", d.id.clone()),
        ("自治体", d.tenant_name.clone()),
        ("対象範囲", d.scope_label().to_string()),
        ("対象", d.target_label.clone()),
        ("理由", d.reason.clone()),
        ("状態", d.status_label().to_string()),
        (
            "実施者（依頼者）",
            format!("{}　{}", d.requested_by, when(d.requested_at)),
        ),
        (
            "承認者",
            match (&d.approved_by, d.approved_at) {
                (Some(by), Some(at)) => format!("{by}　{}", when(at)),
                _ => "-".into(),
            },
        ),
        (
            "実施日時",
            d.executed_at.map(when).unwrap_or_else(|| "-".into()),
        ),
        (
            "実施日時（UTC）",
            d.executed_at
                .map(domain::time::format_utc)
                .unwrap_or_else(|| "-".into()),
        ),
        ("方法", d.method.clone()),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect();
    for (label, n) in &d.counts {
        rows.push(vec![format!("削除件数: {label}"), n.to_string()]);
    }
    rows
}

fn csv_of(d: &Disposal) -> AppResult<Response> {
    let body = crate::csvout::build(&["項目", "内容"], certificate_rows(d))
        .map_err(|e| AppError::Internal(e.to_string()))?;
    Ok(crate::csvout::response(
        &format!("disposal-certificate-{}.csv", d.id),
        body,
    ))
}

async fn readable(state: &Shared, a: &Authed, id: &str) -> AppResult<Disposal> {
    require_read(a)?;
    Ok(state.store.disposal(&a.ctx.tenant.id, id).await?)
}

async fn certificate(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let d = readable(&state, &a, &id).await?;
    let csv = format!("/admin/disposal/{}/certificate.csv", d.id);
    render(&certificate_page(d, a.ctx.now, csv, true))
}

async fn certificate_csv(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let d = readable(&state, &a, &id).await?;
    state
        .store
        .append_audit(&a.audit().with(
            "disposal.certificate",
            format!("disposal:{}", d.id),
            serde_json::json!({"format": "csv"}),
        ))
        .await?;
    csv_of(&d)
}

async fn by_key(state: &Shared, id: &str, q: &HashMap<String, String>) -> AppResult<Disposal> {
    let key = q.get("key").map(String::as_str).unwrap_or("");
    if key.is_empty() || key.len() > 100 {
        return Err(AppError::NotFound);
    }
    Ok(state
        .store
        .disposal_by_key(id, &domain::ids::token_digest(key), state.now())
        .await?)
}

async fn certificate_by_key(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    let d = by_key(&state, &id, &q).await?;
    let csv = format!(
        "/disposal-certificates/{}/certificate.csv?key={}",
        d.id,
        crate::pages::url_encode(q.get("key").map(String::as_str).unwrap_or(""))
    );
    let mut r = render(&certificate_page(d, state.now(), csv, false))?;
    // The key is in the address: keep it out of caches and referrers.
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

async fn certificate_csv_by_key(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    let d = by_key(&state, &id, &q).await?;
    csv_of(&d)
}
