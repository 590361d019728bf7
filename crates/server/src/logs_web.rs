//! The chat log for tenant admins and auditors (M6): every request with user, department,
//! time (JST), model, question, answer, characters and status; filters; paging by position;
//! a conversation opened read-only; and exports (CSV for spreadsheets, TSV, JSONL) streamed
//! page by page so a year of logs leaves memory flat. Viewing and exporting are audited.

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::pages::{render, Layout};
use askama::Template;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::policy;
use serde::Deserialize;
use storage::{LogCursor, LogFilter, LogRow};

/// Rows per page on screen and per database round trip in an export.
const PAGE: i64 = 50;
const EXPORT_BATCH: i64 = 1_000;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/logs", get(logs_page))
        .route("/admin/logs/export", get(export))
        .route("/admin/logs/conversations/{id}", get(conversation_page))
        .route("/api/v1/admin/logs", get(api_logs))
}

fn require(a: &Authed) -> AppResult<()> {
    if policy::can_read_chat_logs(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

#[derive(Deserialize, Default, Clone)]
pub struct LogQuery {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub department: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub after: String,
    #[serde(default)]
    pub format: String,
}

/// Turns what was typed into a filter, or says in Japanese what is wrong.
pub fn filter_of(q: &LogQuery) -> AppResult<LogFilter> {
    let date = |label: &str, s: &str| -> AppResult<Option<i64>> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let ms = domain::time::parse_jst_date(s).ok_or_else(|| {
            AppError::BadRequest(format!(
                "{label}は日付（例: 2026-11-01）で指定してください。"
            ))
        })?;
        // 2000-01-01 to 2100-01-01 JST: anything else is a typo.
        if !(946_652_400_000..=4_102_412_400_000).contains(&ms) {
            return Err(AppError::BadRequest(format!(
                "{label}（{s}）は2000年〜2099年の日付で指定してください。"
            )));
        }
        Ok(Some(ms))
    };
    let from = date("期間の開始", &q.from)?;
    // The end date is included: up to the start of the next day.
    let to = date("期間の終了", &q.to)?.map(|t| t + domain::clock::DAY_MS);
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(AppError::BadRequest(
                "期間の開始が終了より後になっています。開始と終了を入れ替えてください。".into(),
            ));
        }
    }
    let opt = |s: &str| {
        let s = s.trim();
        (!s.is_empty()).then(|| s.chars().take(200).collect::<String>())
    };
    let status = opt(&q.status);
    if let Some(s) = &status {
        if !matches!(s.as_str(), "complete" | "stopped" | "failed" | "streaming") {
            return Err(AppError::BadRequest(
                "状態は一覧から選んでください。".into(),
            ));
        }
    }
    Ok(LogFilter {
        from_ms: from,
        to_ms: to,
        login_id: opt(&q.user).map(|s| s.to_lowercase()),
        department_path: opt(&q.department),
        model_name: opt(&q.model),
        status,
        keyword: opt(&q.q),
    })
}

fn cursor_of(s: &str) -> Option<LogCursor> {
    let (t, id) = s.split_once('.')?;
    let t: i64 = t.parse().ok()?;
    domain::ids::is_valid_id(id).then(|| (t, id.to_string()))
}

fn status_label(s: &str) -> &'static str {
    match s {
        "complete" => "完了",
        "stopped" => "停止",
        "failed" => "失敗",
        "streaming" => "回答中",
        _ => "不明",
    }
}

fn excerpt(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

pub struct RowView {
    pub when: String,
    pub user: String,
    pub department: String,
    pub model: String,
    pub status: &'static str,
    pub question: String,
    pub answer: String,
    pub chars: String,
    pub conversation_id: String,
    pub deleted: bool,
}

#[derive(Template)]
#[template(path = "admin/logs.html")]
struct LogsPage {
    l: Layout,
    q: LogQuery,
    rows: Vec<RowView>,
    next: String,
    export_query: String,
    departments: Vec<String>,
    models: Vec<String>,
}

fn query_string(q: &LogQuery) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("from", &q.from),
        ("to", &q.to),
        ("user", &q.user),
        ("department", &q.department),
        ("model", &q.model),
        ("status", &q.status),
        ("q", &q.q),
    ] {
        if !v.trim().is_empty() {
            parts.push(format!("{k}={}", crate::pages::url_encode(v.trim())));
        }
    }
    parts.join("&")
}

/// Records a look at the chat log (or an export of it) with the filter used.
async fn audit_log_access(
    state: &Shared,
    ev: storage::AuditEvent,
    action: &str,
    q: &LogQuery,
    extra: serde_json::Value,
) {
    let ev = ev.with(
        action,
        "chat_log".to_string(),
        serde_json::json!({"from": q.from, "to": q.to, "user": q.user, "department": q.department, "model": q.model, "status": q.status, "keyword": q.q, "detail": extra}),
    );
    if let Err(e) = state.store.append_audit(&ev).await {
        tracing::error!(error = %e, "could not audit a chat log access");
    }
}

async fn logs_page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<LogQuery>,
) -> AppResult<Response> {
    require(&a)?;
    let f = filter_of(&q)?;
    let cursor = cursor_of(&q.after);
    let mut rows = state
        .store
        .chat_logs(&a.ctx.tenant.id, &f, cursor.as_ref(), PAGE + 1)
        .await?;
    let more = rows.len() as i64 > PAGE;
    rows.truncate(PAGE as usize);
    audit_log_access(
        &state,
        a.audit(),
        "log.view",
        &q,
        serde_json::json!({"rows": rows.len()}),
    )
    .await;
    let next = match (more, rows.last()) {
        (true, Some(r)) => {
            let qs = query_string(&q);
            format!(
                "/admin/logs?{}{}after={}.{}",
                qs,
                if qs.is_empty() { "" } else { "&" },
                r.at,
                r.id
            )
        }
        _ => String::new(),
    };
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let mut departments: Vec<String> = catalog.department_paths.values().cloned().collect();
    departments.sort();
    let mut models: Vec<String> = catalog
        .models
        .iter()
        .map(|m| m.display_name.clone())
        .collect();
    models.sort();
    let views = rows
        .iter()
        .map(|r| RowView {
            when: domain::time::format_jst_compact(r.at),
            user: format!("{}（{}）", r.user_name, r.login_id),
            department: r.department_path.clone(),
            model: r.model_name.clone(),
            status: status_label(&r.status),
            question: excerpt(&r.question, 80),
            answer: excerpt(&r.answer, 80),
            chars: format!(
                "{} / {}",
                domain::usage::grouped(r.input_chars),
                domain::usage::grouped(r.output_chars)
            ),
            conversation_id: r.conversation_id.clone(),
            deleted: r.conversation_deleted,
        })
        .collect();
    render(&LogsPage {
        l: Layout::for_user(&a, "チャットログ", "logs"),
        export_query: query_string(&q),
        q,
        rows: views,
        next,
        departments,
        models,
    })
}

// ---------------------------------------------------------------- one conversation

pub struct TurnView {
    pub role: String,
    pub when: String,
    pub meta: String,
    pub text: String,
}

#[derive(Template)]
#[template(path = "admin/log_conversation.html")]
struct ConversationPage {
    l: Layout,
    title: String,
    owner: String,
    deleted: bool,
    turns: Vec<TurnView>,
}

async fn conversation_page(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    require(&a)?;
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let (conv, owner, deleted) = state
        .store
        .conversation_for_log(&a.ctx.tenant.id, &id)
        .await?;
    let messages = state.store.messages(&a.ctx.tenant.id, &conv.id).await?;
    let q = LogQuery::default();
    audit_log_access(
        &state,
        a.audit(),
        "log.view_conversation",
        &q,
        serde_json::json!({"conversation": conv.id}),
    )
    .await;
    let turns = messages
        .iter()
        .map(|m| TurnView {
            role: if m.role == "user" {
                "質問".into()
            } else {
                "回答".into()
            },
            when: domain::time::format_jst_compact(m.created_at),
            meta: if m.role == "user" {
                m.attachment_name
                    .as_ref()
                    .map(|n| format!("添付: {n}"))
                    .unwrap_or_default()
            } else {
                format!(
                    "{}・{}・AIへの送信{}字（それまでの会話を含む）・回答{}字",
                    m.model_name.clone().unwrap_or_default(),
                    status_label(&m.status),
                    domain::usage::grouped(m.input_chars),
                    domain::usage::grouped(m.output_chars)
                )
            },
            text: m.content.clone(),
        })
        .collect();
    render(&ConversationPage {
        l: Layout::for_user(&a, "会話の記録", "logs"),
        title: conv.title,
        owner,
        deleted,
        turns,
    })
}

// ---------------------------------------------------------------- export

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    pub fn parse(s: &str) -> AppResult<Format> {
        match s {
            "" | "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" => Ok(Format::Jsonl),
            _ => Err(AppError::BadRequest(
                "形式は csv、tsv、jsonl のいずれかを指定してください。".into(),
            )),
        }
    }
    fn content_type(&self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Tsv => "text/tab-separated-values; charset=utf-8",
            Format::Jsonl => "application/x-ndjson; charset=utf-8",
        }
    }
    fn ext(&self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Jsonl => "jsonl",
        }
    }
}

pub const HEADERS: [&str; 19] = [
    "日時（日本時間）",
    "ログインID",
    "氏名",
    "部署",
    "会話ID",
    "会話名",
    "会話の削除",
    "AIモデル",
    "提供元",
    "状態",
    "質問",
    "回答",
    "AIへの送信文字数（それまでの会話を含む）",
    "回答文字数",
    "入力トークン",
    "出力トークン",
    "最初の応答（ミリ秒）",
    "合計時間（ミリ秒）",
    "エラー",
];

fn cells(r: &LogRow) -> Vec<String> {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    vec![
        domain::time::format_jst_compact(r.at),
        r.login_id.clone(),
        r.user_name.clone(),
        r.department_path.clone(),
        r.conversation_id.clone(),
        r.conversation_title.clone(),
        if r.conversation_deleted {
            "削除済み"
        } else {
            ""
        }
        .into(),
        r.model_name.clone(),
        r.provider_name.clone(),
        status_label(&r.status).into(),
        r.question.clone(),
        r.answer.clone(),
        r.input_chars.to_string(),
        r.output_chars.to_string(),
        opt(r.input_tokens),
        opt(r.output_tokens),
        opt(r.ttft_ms),
        opt(r.total_ms),
        r.error_code.clone().unwrap_or_default(),
    ]
}

/// A CSV cell: line breaks kept (inside quotes), other control characters dropped, and a
/// leading `= + - @` neutralised so a spreadsheet never runs it as a formula.
fn csv_cell(s: &str) -> String {
    let clean: String = s
        .replace("\r\n", "\n")
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect();
    if clean.starts_with(['=', '+', '-', '@']) {
        format!("'{clean}")
    } else {
        clean
    }
}

/// A TSV field: backslash, tab and line breaks escaped as `\\`, `\t`, `\n`, `\r`.
fn tsv_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

pub fn encode(format: Format, rows: &[LogRow], with_header: bool) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        Format::Csv => {
            if with_header {
                out.extend_from_slice(b"\xEF\xBB\xBF");
            }
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(&mut out);
            if with_header {
                let _ = w.write_record(HEADERS);
            }
            for r in rows {
                let _ = w.write_record(cells(r).iter().map(|c| csv_cell(c)));
            }
            let _ = w.flush();
        }
        Format::Tsv => {
            if with_header {
                out.extend_from_slice(HEADERS.join("\t").as_bytes());
                out.extend_from_slice(b"\n");
            }
            for r in rows {
                let line: Vec<String> = cells(r).iter().map(|c| tsv_cell(c)).collect();
                out.extend_from_slice(line.join("\t").as_bytes());
                out.extend_from_slice(b"\n");
            }
        }
        Format::Jsonl => {
            for r in rows {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["at_jst"] = serde_json::Value::String(domain::time::format_jst_compact(r.at));
                v["at"] = serde_json::Value::String(domain::time::format_utc(r.at));
                out.extend_from_slice(v.to_string().as_bytes());
                out.push(b'\n');
            }
        }
    }
    out
}

/// Streams every row of the filter, a batch at a time; refuses an empty range up front.
pub async fn export_response(
    state: &Shared,
    tenant_id: &str,
    f: LogFilter,
    format: Format,
    name: &str,
) -> AppResult<Response> {
    let first = state
        .store
        .chat_logs(tenant_id, &f, None, EXPORT_BATCH)
        .await?;
    if first.is_empty() {
        return Err(AppError::BadRequest(
            "この条件に合う記録はありません。期間や条件を見直してください。".into(),
        ));
    }
    struct St {
        store: storage::Store,
        tenant: String,
        f: LogFilter,
        pending: Option<Vec<LogRow>>,
        cursor: Option<LogCursor>,
        header: bool,
        done: bool,
    }
    let st = St {
        store: state.store.clone(),
        tenant: tenant_id.to_string(),
        f,
        pending: Some(first),
        cursor: None,
        header: true,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        let rows = match st.pending.take() {
            Some(r) => r,
            None => match st
                .store
                .chat_logs(&st.tenant, &st.f, st.cursor.as_ref(), EXPORT_BATCH)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "chat log export stopped");
                    return Some((Err(std::io::Error::other("export failed")), st));
                }
            },
        };
        if rows.is_empty() {
            return None;
        }
        st.done = (rows.len() as i64) < EXPORT_BATCH;
        st.cursor = rows.last().map(|r| (r.at, r.id.clone()));
        let bytes = encode(format, &rows, st.header);
        st.header = false;
        Some((Ok::<_, std::io::Error>(bytes), st))
    });
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{}\"", format.ext()),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn export(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<LogQuery>,
) -> AppResult<Response> {
    require(&a)?;
    let f = filter_of(&q)?;
    let format = Format::parse(&q.format)?;
    audit_log_access(
        &state,
        a.audit(),
        "log.export",
        &q,
        serde_json::json!({"format": format.ext()}),
    )
    .await;
    export_response(&state, &a.ctx.tenant.id, f, format, "chat-log").await
}

/// `GET /api/v1/admin/logs`: the same export for a city's own systems, with an API token
/// (`Authorization: Bearer …`, scope `logs:read`) or the session of a tenant admin or
/// auditor.
async fn api_logs(
    State(state): State<Shared>,
    ctx: crate::app::Ctx,
    headers: axum::http::HeaderMap,
    Query(q): Query<LogQuery>,
) -> AppResult<Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let audit = match (bearer, &ctx.auth) {
        (Some(token), _) => {
            let t = state
                .store
                .api_token_by_digest(&domain::ids::token_digest(token))
                .await?
                .filter(|t| t.tenant_id == ctx.tenant.id)
                .ok_or_else(|| AppError::Token("API キーが正しくありません。".into()))?;
            if t.revoked_at.is_some() {
                return Err(AppError::Token(
                    "この API キーは無効にされています。情報管理者に新しいキーの発行を依頼してください。".into(),
                ));
            }
            if t.expires_at <= ctx.now {
                return Err(AppError::Token(format!(
                    "この API キーは有効期限（{}）が切れています。情報管理者に新しいキーの発行を依頼してください。",
                    domain::time::format_jst(t.expires_at)
                )));
            }
            if !t.has_scope("logs:read") {
                // Scope missing: the key is genuine but may not do this.
                return Err(AppError::Forbidden);
            }
            state.store.touch_api_token(&t.id, ctx.now).await?;
            let mut ev = ctx.audit();
            ev.actor_login = format!("api-token:{}", t.name);
            ev
        }
        (None, Some(auth)) => {
            if !policy::can_read_chat_logs(&auth.actor) {
                return Err(AppError::Forbidden);
            }
            ctx.audit()
        }
        (None, None) => return Err(AppError::Unauthenticated),
    };
    let f = filter_of(&q)?;
    let format = Format::parse(&q.format)?;
    audit_log_access(
        &state,
        audit,
        "log.export",
        &q,
        serde_json::json!({"format": format.ext(), "via": "api"}),
    )
    .await;
    export_response(&state, &ctx.tenant.id, f, format, "chat-log").await
}
