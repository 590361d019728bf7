//! Alerts (S8): the periodic analysis of each tenant's audit log (run by housekeeping),
//! the alerts page for tenant admins and auditors, and the e-mail to tenant admins when
//! an SMTP relay is configured.
//!
//! The analysis keeps its place per tenant (the last audit sequence number read) and reads
//! the sign-ins and chat requests just before it again, so a window that straddles two runs
//! is still seen whole; an alert is stored once per rule, subject and window however often
//! the analysis sees it.

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::pages::{render, Layout};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use domain::alerts::{History, FAILED_WINDOW_MS, VOLUME_HISTORY_DAYS};
use domain::policy;
use std::collections::{HashMap, HashSet};
use storage::{AlertRecord, StorageError, Tenant};

const BATCH: i64 = 5_000;
const DAY_MS: i64 = 24 * 3_600_000;
const JST_MS: i64 = 9 * 3_600_000;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/alerts", get(page))
        .route("/admin/alerts/{id}", get(detail))
        .route("/admin/alerts/{id}/acknowledge", post(acknowledge))
}

/// The start of the JST day `ms` falls in.
fn day_start(ms: i64) -> i64 {
    (ms + JST_MS).div_euclid(DAY_MS) * DAY_MS - JST_MS
}

/// Analyses what each tenant's audit log gained since the last run. Returns the alerts
/// raised. Safe to run at any time and as often as wanted.
pub async fn run(state: &Shared) -> Result<Vec<AlertRecord>, StorageError> {
    let mut raised = Vec::new();
    for t in state.store.list_tenants().await? {
        loop {
            let (n, new) = analyse_batch(state, &t).await?;
            if !new.is_empty() {
                tracing::warn!(tenant = %t.id, alerts = new.len(), "security alerts raised");
                notify(state, &t, &new).await;
            }
            raised.extend(new);
            if n < BATCH as usize {
                break;
            }
        }
    }
    Ok(raised)
}

async fn analyse_batch(
    state: &Shared,
    t: &Tenant,
) -> Result<(usize, Vec<AlertRecord>), StorageError> {
    let store = &state.store;
    let cursor = store.alert_cursor(&t.id).await?;
    let new = store.audit_events_after(&t.id, cursor, BATCH).await?;
    let (Some(first), Some(last)) = (new.first(), new.last()) else {
        return Ok((0, Vec::new()));
    };
    let (first_at, last_seq, n) = (first.at_ms, last.seq, new.len());
    let since = (first_at - FAILED_WINDOW_MS).min(day_start(first_at));
    let mut events = store.audit_lookback(&t.id, cursor, since).await?;
    events.extend(new);
    let earliest = events.first().map(|e| e.at_ms).unwrap_or(first_at);
    let mut history = History::default();
    let signed_in: HashSet<String> = events
        .iter()
        .filter(|e| e.action == "auth.login" && e.result == "success")
        .filter_map(|e| e.actor_id.clone())
        .collect();
    for u in signed_in {
        let known = store.known_addresses(&t.id, &u, earliest).await?;
        history.known_addresses.insert(u, known);
    }
    let senders: HashSet<String> = events
        .iter()
        .filter(|e| e.action == "chat.send")
        .filter_map(|e| e.actor_id.clone())
        .collect();
    let to = day_start(earliest);
    let from = to - VOLUME_HISTORY_DAYS as i64 * DAY_MS;
    for u in senders {
        let mut days = vec![0u64; VOLUME_HISTORY_DAYS];
        for (at, chars) in store.input_chars_between(&t.id, &u, from, to).await? {
            let i = ((at - from) / DAY_MS) as usize;
            if let Some(d) = days.get_mut(i) {
                *d += chars;
            }
        }
        history.daily_chars.insert(u, days);
    }
    let alerts = domain::alerts::analyse(&events, &history);
    let new = store
        .raise_alerts(&t.id, &alerts, last_seq, state.now())
        .await?;
    Ok((n, new))
}

/// E-mails the tenant admins about new alerts, when a relay is configured. A failure is
/// logged: the alerts are on the page either way.
async fn notify(state: &Shared, t: &Tenant, alerts: &[AlertRecord]) {
    let smtp = &state.config.smtp;
    if smtp.host.is_empty() {
        return;
    }
    let to = match state.store.tenant_admin_emails(&t.id).await {
        Ok(to) if !to.is_empty() => to,
        Ok(_) => {
            tracing::warn!(tenant = %t.id, "no tenant admin has an e-mail address for alerts");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "alert recipients could not be read");
            return;
        }
    };
    let subject = format!(
        "【yakuba】{} セキュリティのアラート {}件",
        t.name,
        alerts.len()
    );
    let mut body = format!(
        "{} の監査ログの分析で、次の{}件のアラートを検知しました。\n\n",
        t.name,
        alerts.len()
    );
    for a in alerts {
        body.push_str(&format!(
            "■ {}（{}）\n  {}\n\n",
            a.rule_label(),
            domain::time::format_jst(a.at),
            a.summary
        ));
    }
    body.push_str(
        "管理画面の「アラート」で、根拠となった記録を確認し、対応のうえ「確認済み」にしてください。\n\
         このメールは yakuba から自動で送信しています。\n",
    );
    match send_mail(smtp, &to, &subject, &body).await {
        Ok(()) => {
            let ids: Vec<String> = alerts.iter().map(|a| a.id.clone()).collect();
            if let Err(e) = state
                .store
                .mark_alerts_mailed(&t.id, &ids, state.now())
                .await
            {
                tracing::warn!(error = %e, "alert mail state not saved");
            }
        }
        Err(e) => tracing::warn!(error = %e, "alert mail not sent"),
    }
}

pub async fn send_mail(
    smtp: &crate::config::SmtpConfig,
    to: &[String],
    subject: &str,
    body: &str,
) -> Result<(), String> {
    use lettre::message::header::ContentType;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let mut m = Message::builder()
        .from(smtp.from.parse().map_err(|e| format!("from: {e}"))?)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for addr in to {
        m = m.to(addr.parse().map_err(|e| format!("to {addr}: {e}"))?);
    }
    let message = m.body(body.to_string()).map_err(|e| e.to_string())?;
    let builder = match smtp.security.as_str() {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        "tls" => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(|e| e.to_string())?
        }
        _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
            .map_err(|e| e.to_string())?,
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(std::time::Duration::from_secs(15)));
    if !smtp.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            smtp.username.clone(),
            smtp.password.expose().to_string(),
        ));
    }
    builder
        .build()
        .send(message)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ------------------------------------------------------------------ pages

pub struct AlertView {
    pub id: String,
    pub rule: &'static str,
    pub subject: String,
    pub at: String,
    pub summary: String,
    pub state: String,
    pub open: bool,
    pub mailed: bool,
}

fn view_of(a: AlertRecord) -> AlertView {
    AlertView {
        rule: a.rule_label(),
        at: domain::time::format_jst(a.at),
        state: match (&a.acknowledged_by, a.acknowledged_at) {
            (Some(by), Some(at)) => format!("確認済み（{by}、{}）", domain::time::format_jst(at)),
            _ => "未確認".into(),
        },
        open: a.acknowledged_at.is_none(),
        mailed: a.mailed_at.is_some(),
        id: a.id,
        subject: a.subject,
        summary: a.summary,
    }
}

fn require_read(a: &Authed) -> AppResult<()> {
    if policy::can_read_alerts(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

#[derive(Template)]
#[template(path = "admin/alerts.html")]
struct AlertsPage {
    l: Layout,
    alerts: Vec<AlertView>,
    all: bool,
    open: i64,
    mail: bool,
    notice: String,
}

async fn page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    require_read(&a)?;
    let all = q.get("all").is_some_and(|v| v == "1");
    let alerts = state
        .store
        .alerts(&a.ctx.tenant.id, !all, 500)
        .await?
        .into_iter()
        .map(view_of)
        .collect();
    render(&AlertsPage {
        l: Layout::for_user(&a, "アラート", "alerts"),
        alerts,
        all,
        open: state.store.open_alert_count(&a.ctx.tenant.id).await?,
        mail: !state.config.smtp.host.is_empty(),
        notice: if q.contains_key("acknowledged") {
            "アラートを確認済みにしました。".into()
        } else {
            String::new()
        },
    })
}

pub struct EventView {
    pub seq: i64,
    pub at: String,
    pub action: String,
    pub actor: String,
    pub ip: String,
    pub result: String,
}

#[derive(Template)]
#[template(path = "admin/alert.html")]
struct AlertPage {
    l: Layout,
    a: AlertView,
    events: Vec<EventView>,
    can_handle: bool,
}

async fn detail(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    require_read(&a)?;
    let alert = state.store.alert(&a.ctx.tenant.id, &id).await?;
    let events = state
        .store
        .audit_by_seqs(&a.ctx.tenant.id, &alert.event_seqs)
        .await?
        .into_iter()
        .map(|r| EventView {
            seq: r.seq,
            at: domain::time::format_jst_compact(r.at_ms),
            action: crate::admin::action_label(&r.action),
            actor: r.actor_login,
            ip: r.ip,
            result: match r.result.as_str() {
                "success" => "成功".into(),
                "failure" => "失敗".into(),
                "denied" => "拒否".into(),
                other => other.to_string(),
            },
        })
        .collect();
    render(&AlertPage {
        l: Layout::for_user(&a, "アラートの詳細", "alerts"),
        a: view_of(alert),
        events,
        can_handle: policy::can_handle_alerts(a.actor()),
    })
}

async fn acknowledge(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    if !policy::can_handle_alerts(a.actor()) {
        return Err(AppError::Forbidden);
    }
    let note: String = f
        .get("note")
        .map(|s| s.trim())
        .unwrap_or("")
        .chars()
        .take(500)
        .collect();
    state
        .store
        .acknowledge_alert(&a.ctx.tenant.id, &id, &note, a.audit())
        .await?;
    Ok(Redirect::to("/admin/alerts?acknowledged=1").into_response())
}
