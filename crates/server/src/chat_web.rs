//! Chat over the two transports: the pages (`/chat`) and the JSON API
//! (`/api/v1/conversations`, `/api/v1/models`). Both go through `chat`.

use crate::api::JsonBody;
use crate::app::{Authed, Shared};
use crate::chat::{self, ModelChoice, SendInput};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::pages::{render, Layout};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// A message as the page shows it.
pub struct MessageView {
    pub id: String,
    pub role: String,
    pub status: String,
    pub status_label: &'static str,
    /// Safe HTML of an answer (rendered Markdown) or of a question (escaped text).
    pub html: String,
    pub text: String,
    pub meta: String,
    pub error: String,
    pub attachment: String,
    /// The passages a question was asked over: (number, label, link).
    pub sources: Vec<(usize, String, String)>,
}

impl MessageView {
    fn of(m: &storage::Message) -> MessageView {
        let html = if m.role == "assistant" {
            crate::markdown::render(&m.content)
        } else {
            String::new()
        };
        let status_label = match m.status.as_str() {
            "stopped" => "途中で停止しました",
            "failed" => "回答できませんでした",
            "streaming" => "回答中",
            _ => "",
        };
        let mut meta = String::new();
        if m.role == "assistant" {
            meta = format!(
                "{}・AIへの送信{}字（それまでの会話を含む）・回答{}字",
                m.model_name.clone().unwrap_or_default(),
                domain::usage::grouped(m.input_chars),
                domain::usage::grouped(m.output_chars)
            );
            if let Some(t) = m.ttft_ms {
                meta.push_str(&format!("・最初の応答{:.1}秒", t as f64 / 1000.0));
            }
            if let Some(t) = m.total_ms {
                meta.push_str(&format!("・合計{:.1}秒", t as f64 / 1000.0));
            }
        }
        MessageView {
            id: m.id.clone(),
            role: m.role.clone(),
            status: m.status.clone(),
            status_label,
            html,
            text: m.content.clone(),
            meta,
            error: m.error_code.as_deref().map(error_text).unwrap_or_default(),
            attachment: m.attachment_name.clone().unwrap_or_default(),
            sources: m
                .sources
                .as_deref()
                .and_then(|s| serde_json::from_str::<Vec<storage::Passage>>(s).ok())
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        i + 1,
                        format!("{}　{}ページ", p.document_name, p.page),
                        format!(
                            "/knowledge/documents/{}/pages/{}?chunk={}#cited",
                            p.document_id, p.page, p.chunk_id
                        ),
                    )
                })
                .collect(),
        }
    }
}

fn error_text(code: &str) -> String {
    match code {
        "rate_limited" => "AIサービスが混み合っています。しばらく待ってから再度お試しください。",
        "auth" => "AIサービスの認証に失敗しました。管理者に設定の確認を依頼してください。",
        "first_token_timeout" | "idle_timeout" | "timeout" => {
            "AIサービスの応答がありませんでした。時間をおいて再度お試しください。"
        }
        "interrupted" => "サーバーの再起動により回答が中断されました。",
        _ => "AIサービスでエラーが発生しました。時間をおいて再度お試しください。",
    }
    .to_string()
}

pub struct ConvLink {
    pub id: String,
    pub title: String,
    pub when: String,
    pub current: bool,
}

#[derive(Template)]
#[template(path = "chat.html")]
struct ChatPage {
    l: Layout,
    conversations: Vec<ConvLink>,
    q: String,
    current: Option<storage::Conversation>,
    messages: Vec<MessageView>,
    models: Vec<ModelChoice>,
    selected_model: String,
    max_chars: u32,
    max_chars_label: String,
    can_regenerate: bool,
    /// The remaining allowance shown by the input box (rendered HTML).
    meter_html: String,
    /// Knowledge collections the user may ask over: (id, label).
    collections: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "chat_message.html")]
struct MessageFragment {
    m: MessageView,
}

#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    q: String,
}

async fn page(
    state: &Shared,
    a: &Authed,
    current: Option<storage::Conversation>,
    q: &str,
) -> AppResult<Response> {
    chat::require_chat(a)?;
    let list = state
        .store
        .list_conversations(&a.ctx.tenant.id, &a.auth.user.id, q, 200)
        .await?;
    let cur_id = current.as_ref().map(|c| c.id.clone()).unwrap_or_default();
    let messages = match &current {
        Some(c) => state
            .store
            .messages(&a.ctx.tenant.id, &c.id)
            .await?
            .iter()
            .map(MessageView::of)
            .collect(),
        None => Vec::new(),
    };
    let models: Vec<ModelChoice> = chat::usable_models(state, a)
        .await?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let last_model = match &current {
        Some(c) => state
            .store
            .messages(&a.ctx.tenant.id, &c.id)
            .await?
            .iter()
            .rev()
            .find_map(|m| m.model_id.clone()),
        None => None,
    };
    let selected_model = last_model
        .filter(|id| models.iter().any(|m| &m.id == id))
        .or_else(|| models.iter().find(|m| m.is_default).map(|m| m.id.clone()))
        .or_else(|| models.first().map(|m| m.id.clone()))
        .unwrap_or_default();
    let can_regenerate = messages
        .last()
        .is_some_and(|m: &MessageView| m.role == "assistant" && m.status != "streaming");
    let meter_html = if current.is_some() {
        crate::usage_web::meter_view(state, a).await?.render()?
    } else {
        String::new()
    };
    let collections = crate::knowledge::readable(state, a)
        .await?
        .into_iter()
        .map(|c| {
            let label = format!(
                "{}（{}・機密性{}）",
                c.name,
                c.department_path.as_deref().unwrap_or("全庁共有"),
                c.classification
            );
            (c.id, label)
        })
        .collect();
    render(&ChatPage {
        meter_html,
        collections,
        l: Layout::for_user(
            a,
            current
                .as_ref()
                .map(|c| c.title.as_str())
                .unwrap_or("チャット"),
            "chat",
        ),
        conversations: list
            .into_iter()
            .map(|c| ConvLink {
                current: c.id == cur_id,
                when: domain::time::format_jst(c.updated_at),
                id: c.id,
                title: c.title,
            })
            .collect(),
        q: q.to_string(),
        current,
        messages,
        models,
        selected_model,
        max_chars: a.ctx.tenant.settings.chat.max_message_chars,
        max_chars_label: domain::usage::grouped(i64::from(
            a.ctx.tenant.settings.chat.max_message_chars,
        )),
        can_regenerate,
    })
}

async fn chat_home(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ListQuery>,
) -> AppResult<Response> {
    page(&state, &a, None, &q.q).await
}

async fn chat_new(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    chat::require_chat(&a)?;
    let c = state
        .store
        .create_conversation(&a.ctx.tenant.id, &a.auth.user.id, "新しい会話", a.ctx.now)
        .await?;
    Ok(Redirect::to(&format!("/chat/{}", c.id)).into_response())
}

async fn chat_view(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> AppResult<Response> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    page(&state, &a, Some(c), &q.q).await
}

async fn chat_message(
    State(state): State<Shared>,
    a: Authed,
    Path((id, mid)): Path<(String, String)>,
) -> AppResult<Response> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    if !domain::ids::is_valid_id(&mid) {
        return Err(AppError::NotFound);
    }
    let m = state.store.message(&a.ctx.tenant.id, &mid).await?;
    if m.conversation_id != c.id {
        return Err(AppError::NotFound);
    }
    render(&MessageFragment {
        m: MessageView::of(&m),
    })
}

#[derive(Deserialize)]
struct TitleForm {
    #[serde(default)]
    title: String,
}

async fn chat_rename(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<TitleForm>,
) -> AppResult<Response> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    let title = domain::validate::required_line("会話の名前", &f.title, 100)
        .map_err(AppError::BadRequest)?;
    state
        .store
        .rename_conversation(&a.ctx.tenant.id, &a.auth.user.id, &c.id, &title)
        .await?;
    Ok(Redirect::to(&format!("/chat/{}", c.id)).into_response())
}

async fn chat_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    state
        .store
        .delete_conversation(&a.ctx.tenant.id, &a.auth.user.id, &c.id, a.audit())
        .await?;
    Ok(Redirect::to("/chat").into_response())
}

// ---------------------------------------------------------------- API

async fn api_models(State(state): State<Shared>, a: Authed) -> AppResult<Json<Value>> {
    chat::require_chat(&a)?;
    let models: Vec<ModelChoice> = chat::usable_models(&state, &a)
        .await?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    Ok(Json(json!({"models": models})))
}

async fn api_list(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<Value>> {
    chat::require_chat(&a)?;
    let list = state
        .store
        .list_conversations(&a.ctx.tenant.id, &a.auth.user.id, &q.q, 200)
        .await?;
    Ok(Json(json!({"conversations": list})))
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(default)]
    title: Option<String>,
}

async fn api_create(
    State(state): State<Shared>,
    a: Authed,
    JsonBody(b): JsonBody<CreateBody>,
) -> AppResult<(StatusCode, Json<Value>)> {
    chat::require_chat(&a)?;
    let title = match b.title.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(t) => domain::validate::required_line("会話の名前", t, 100)
            .map_err(|e| AppError::field("title", e))?,
        None => "新しい会話".into(),
    };
    let c = state
        .store
        .create_conversation(&a.ctx.tenant.id, &a.auth.user.id, &title, a.ctx.now)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(c))))
}

async fn api_get(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    let messages = state.store.messages(&a.ctx.tenant.id, &c.id).await?;
    Ok(Json(json!({"conversation": c, "messages": messages})))
}

async fn api_rename(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CreateBody>,
) -> AppResult<Json<Value>> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    let title =
        domain::validate::required_line("会話の名前", b.title.as_deref().unwrap_or(""), 100)
            .map_err(|e| AppError::field("title", e))?;
    state
        .store
        .rename_conversation(&a.ctx.tenant.id, &a.auth.user.id, &c.id, &title)
        .await?;
    Ok(Json(json!(
        state
            .store
            .conversation(&a.ctx.tenant.id, &a.auth.user.id, &c.id)
            .await?
    )))
}

async fn api_delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    let c = chat::own_conversation(&state, &a, &id).await?;
    state
        .store
        .delete_conversation(&a.ctx.tenant.id, &a.auth.user.id, &c.id, a.audit())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct RegenerateBody {
    #[serde(default)]
    model_id: String,
}

async fn api_regenerate(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RegenerateBody>,
) -> AppResult<Response> {
    chat::regenerate(&state, &a, &id, &b.model_id).await
}

async fn api_send(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<SendInput>,
) -> AppResult<Response> {
    chat::send(&state, &a, &id, &b).await
}

pub fn routes(max_upload: usize) -> Router<Shared> {
    Router::new()
        .route("/chat", get(chat_home))
        .route("/chat/new", post(chat_new))
        .route("/chat/{id}", get(chat_view))
        .route("/chat/{id}/messages/{mid}", get(chat_message))
        .route("/chat/{id}/rename", post(chat_rename))
        .route("/chat/{id}/delete", post(chat_delete))
        .route("/api/v1/models", get(api_models))
        .route("/api/v1/conversations", get(api_list).post(api_create))
        .route(
            "/api/v1/conversations/{id}",
            get(api_get).patch(api_rename).delete(api_delete),
        )
        .route(
            "/api/v1/conversations/{id}/messages",
            post(api_send).layer(axum::extract::DefaultBodyLimit::max(max_upload)),
        )
        .route(
            "/api/v1/conversations/{id}/regenerate",
            post(api_regenerate),
        )
}
