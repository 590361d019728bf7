//! Chat: conversations of one user, sending a message to a model the user may use, and the
//! answer streamed back as server-sent events while it is stored. The answer is written as
//! `streaming` first and finally as `complete`, `stopped` or `failed`. When the browser goes
//! away (stop button, closed tab), the upstream request is dropped and the partial answer is
//! kept as `stopped`.

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use domain::policy;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::time::{Duration, Instant};
use storage::{AnswerEnd, Conversation, Message, Model, NewTurn, Provider};
use tokio::sync::mpsc;

pub fn require_chat(a: &Authed) -> AppResult<()> {
    if policy::can_chat(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

/// A conversation of the caller; anyone else's answers 404.
pub async fn own_conversation(state: &Shared, a: &Authed, id: &str) -> AppResult<Conversation> {
    require_chat(a)?;
    if !domain::ids::is_valid_id(id) {
        return Err(AppError::NotFound);
    }
    Ok(state
        .store
        .conversation(&a.ctx.tenant.id, &a.auth.user.id, id)
        .await?)
}

/// A model as offered to staff.
#[derive(Clone, Debug, Serialize)]
pub struct ModelChoice {
    pub id: String,
    pub display_name: String,
    pub provider_name: String,
    pub is_default: bool,
}

/// The models this caller may use now: enabled, with an enabled provider, open to their
/// department.
pub async fn usable_models(state: &Shared, a: &Authed) -> AppResult<Vec<(Model, ModelChoice)>> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let path_of = |id: &str| catalog.department_paths.get(id).cloned();
    Ok(catalog
        .models
        .iter()
        .filter(|m| m.enabled && m.provider_enabled)
        .filter(|m| {
            let paths: Vec<String> = m.department_ids.iter().filter_map(|d| path_of(d)).collect();
            policy::can_use_model(a.actor(), m.all_departments, &paths)
        })
        .cloned()
        .map(|m| {
            let c = ModelChoice {
                id: m.id.clone(),
                display_name: m.display_name.clone(),
                provider_name: m.provider_name.clone(),
                is_default: m.is_default,
            };
            (m, c)
        })
        .collect())
}

/// The client for a provider, with the deployment's egress proxy unless it has its own.
pub fn client_for(state: &Shared, p: &Provider) -> Result<llm::Client, llm::LlmError> {
    // A client holds a connection pool and its TLS roots; building one per message costs
    // milliseconds of CPU, so one is kept per provider until its settings change.
    if let Ok(cache) = state.llm_clients.lock() {
        if let Some((stamp, client)) = cache.get(&p.id) {
            if *stamp == p.updated_at {
                return Ok(client.clone());
            }
        }
    }
    let kind = llm::ProviderKind::parse(&p.kind).unwrap_or(llm::ProviderKind::OpenAi);
    let base_url = if kind.is_local() {
        // A file name in the operator's models folder; nothing else on the server.
        crate::local_models::resolve(&state.config, &p.base_url)
            .map(|path| path.display().to_string())
            .unwrap_or_default()
    } else {
        p.base_url.clone()
    };
    let mut cfg = llm::ProviderConfig::new(kind, base_url, p.api_key.clone());
    cfg.api_version = p.api_version.clone();
    cfg.block_internal = !state.config.llm.allow_internal_provider_urls;
    if kind.is_local() {
        cfg.default_max_tokens = Some(state.config.local_model.max_answer_tokens);
    }
    cfg.proxy = p
        .proxy
        .clone()
        .or_else(|| state.config.llm.egress_proxy.clone());
    let client = llm::Client::new(cfg)?;
    if let Ok(mut cache) = state.llm_clients.lock() {
        cache.insert(p.id.clone(), (p.updated_at, client.clone()));
    }
    Ok(client)
}

pub fn title_from(content: &str) -> String {
    let line = content
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("新しい会話");
    let mut t: String = line.chars().take(40).collect();
    if line.chars().count() > 40 {
        t.push('…');
    }
    t
}

#[derive(Deserialize)]
pub struct SendInput {
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub model_id: String,
    /// The message is an edited version of the last question: the model sees the
    /// conversation without that earlier turn (which stays on record).
    #[serde(default)]
    pub edit_last: bool,
    /// One attached file (plain text or a PDF with a text layer) as context.
    #[serde(default)]
    pub attachment: Option<AttachmentInput>,
    /// Ask over knowledge: these collections (an empty list: every collection the caller
    /// may read that the model may receive). Absent: no knowledge.
    #[serde(default)]
    pub knowledge: Option<Vec<String>>,
}

/// The collections a question goes over, checked: readable by the caller (else 404) and
/// within what the model may receive (S14).
async fn knowledge_for(
    state: &Shared,
    a: &Authed,
    model: &Model,
    asked: &[String],
) -> AppResult<Vec<storage::Collection>> {
    let readable = crate::knowledge::readable(state, a).await?;
    let receivable = |c: &storage::Collection| {
        domain::policy::model_may_receive(model.max_class, c.classification)
    };
    if asked.is_empty() {
        let ids: Vec<storage::Collection> =
            readable.iter().filter(|c| receivable(c)).cloned().collect();
        if ids.is_empty() {
            return Err(AppError::field(
                "knowledge",
                "このモデルで使えるナレッジがありません（所属部署のナレッジがないか、機密性の高いナレッジだけです）。",
            ));
        }
        return Ok(ids);
    }
    let mut out = Vec::new();
    for id in asked {
        let Some(c) = readable.iter().find(|c| &c.id == id) else {
            return Err(AppError::NotFound);
        };
        if !receivable(c) {
            return Err(AppError::field(
                "knowledge",
                format!(
                    "ナレッジ「{}」は機密性{}のため、このモデル（機密性{}まで）には送れません。機密性{}を扱えるモデルを選んでください。",
                    c.name, c.classification, model.max_class, c.classification
                ),
            ));
        }
        out.push(c.clone());
    }
    Ok(out)
}

#[derive(Deserialize)]
pub struct AttachmentInput {
    pub name: String,
    /// The file's bytes, base64.
    pub data_base64: String,
}

/// The question as the model receives it: with the attached file's text after it.
fn with_attachment(content: &str, name: Option<&str>, text: Option<&str>) -> String {
    match (name, text) {
        (Some(n), Some(t)) => format!("{content}\n\n---\n添付ファイル「{n}」の内容:\n{t}"),
        _ => content.to_string(),
    }
}

/// Reads an attachment: its name cleaned, its type decided by content, its text extracted
/// off the async threads, within the tenant's length limit.
async fn read_attachment(att: &AttachmentInput, max_chars: usize) -> AppResult<(String, String)> {
    use base64::Engine;
    let name = domain::validate::required_line("添付ファイル名", &att.name, 200)
        .map_err(|e| AppError::field("attachment", e))?;
    let name: String = name
        .chars()
        .map(|c| if matches!(c, '/' | '\\') { '_' } else { c })
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(att.data_base64.as_bytes())
        .map_err(|_| {
            AppError::field(
                "attachment",
                "添付ファイルを読み取れません。もう一度選んでください。",
            )
        })?;
    let extracted = tokio::task::spawn_blocking(move || documents::extract(&bytes))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::field("attachment", e.message_ja()))?;
    let n = extracted.text.chars().count();
    if n > max_chars {
        return Err(AppError::field(
            "attachment",
            format!("添付ファイルの文字数（{n}文字）が上限（{max_chars}文字）を超えています。必要な部分だけを添付してください。"),
        ));
    }
    Ok((name, extracted.text))
}

/// What the browser receives, one JSON object per event.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload {
    Delta {
        text: String,
    },
    /// Before the first text of a local model: its place in the queue, or loading.
    Status {
        text: String,
    },
    Usage {
        input_chars: i64,
        output_chars: i64,
        /// Added by the service (earlier turns, attached file); counted only by choice.
        context_chars: i64,
        /// What this answer counted toward the allowance.
        counted_chars: i64,
        input_tokens: Option<i64>,
        output_tokens: Option<i64>,
        ttft_ms: Option<i64>,
        total_ms: i64,
    },
    Done {
        message_id: String,
        status: &'static str,
    },
    Error {
        code: String,
        message: String,
        retryable: bool,
    },
}

fn event(name: &str, p: &Payload) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(p).unwrap_or_else(|_| "{}".into()))
}

/// The conversation as the model sees it: each question with the last completed answer to
/// it (a regenerated answer replaces the earlier one); unanswered questions are left out, so
/// roles alternate as every provider requires.
fn history_pairs(history: &[Message]) -> Vec<llm::ChatMessage> {
    let mut out = Vec::new();
    let mut question: Option<&Message> = None;
    let mut answer: Option<&Message> = None;
    let flush = |q: Option<&Message>, a: Option<&Message>, out: &mut Vec<llm::ChatMessage>| {
        if let (Some(q), Some(a)) = (q, a) {
            out.push(llm::ChatMessage {
                role: llm::Role::User,
                content: q.content.clone(),
            });
            out.push(llm::ChatMessage {
                role: llm::Role::Assistant,
                content: a.content.clone(),
            });
        }
    };
    for m in history {
        if m.role == "user" {
            flush(question.take(), answer.take(), &mut out);
            question = Some(m);
        } else if m.status == "complete" {
            answer = Some(m);
        }
    }
    flush(question, answer, &mut out);
    out
}

/// A model the caller may use, with its provider.
async fn pick_model(state: &Shared, a: &Authed, model_id: &str) -> AppResult<(Model, Provider)> {
    let models = usable_models(state, a).await?;
    let Some((model, _)) = models.into_iter().find(|(m, _)| m.id == model_id) else {
        return Err(AppError::field("model_id", "このモデルは使えません。一覧から選び直してください（停止中か、所属部署に許可されていないモデルです）。"));
    };
    let provider = state
        .catalog(&a.ctx.tenant.id)
        .await?
        .providers
        .get(&model.provider_id)
        .cloned()
        .ok_or(AppError::NotFound)?;
    Ok((model, provider))
}

/// The write that records the question (or the regeneration) and yields the answer's id.
type Record = tokio::task::JoinHandle<Result<String, storage::StorageError>>;

/// Starts the answer in the background and returns the events for the browser.
fn start(
    state: &Shared,
    a: &Authed,
    record: Record,
    metered: Metered,
    provider: &Provider,
    req: llm::ChatRequest,
) -> Response {
    let (sse_tx, sse_rx) = mpsc::channel::<Event>(256);
    let job = Answer {
        state: state.clone(),
        tenant_id: a.ctx.tenant.id.clone(),
        user_id: a.auth.user.id.clone(),
        record,
        metered,
        client: client_for(state, provider),
        req,
    };
    tokio::spawn(job.run(sse_tx));
    let stream = futures_util::stream::unfold(sse_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Checks a message, stores the turn and starts the answer.
pub async fn send(
    state: &Shared,
    a: &Authed,
    conversation_id: &str,
    input: &SendInput,
) -> AppResult<Response> {
    let conv = own_conversation(state, a, conversation_id).await?;
    let max = a.ctx.tenant.settings.chat.max_message_chars as usize;
    let content = domain::validate::multi_line("メッセージ", &input.content, max)
        .map_err(|e| AppError::field("content", e))?;
    if content.trim().is_empty() {
        return Err(AppError::field("content", "メッセージを入力してください。"));
    }
    let (model, provider) = pick_model(state, a, &input.model_id).await?;
    let attachment = match &input.attachment {
        Some(att) => Some(read_attachment(att, max).await?),
        None => None,
    };
    let passages = match &input.knowledge {
        Some(asked) => {
            let ids = knowledge_for(state, a, &model, asked).await?;
            Some(crate::knowledge::retrieve(state, &a.ctx.tenant.id, &content, &ids).await?)
        }
        None => None,
    };
    let history = state.store.messages(&a.ctx.tenant.id, &conv.id).await?;
    let before = match history.iter().rposition(|m| m.role == "user") {
        Some(i) if input.edit_last => &history[..i],
        _ => &history[..],
    };
    let mut messages = history_pairs(before);
    let asked = with_attachment(
        &content,
        attachment.as_ref().map(|(n, _)| n.as_str()),
        attachment.as_ref().map(|(_, t)| t.as_str()),
    );
    messages.push(llm::ChatMessage {
        role: llm::Role::User,
        content: match &passages {
            Some(p) => crate::knowledge::with_passages(&asked, p),
            None => asked,
        },
    });
    let input_chars = messages
        .iter()
        .map(|m| m.content.chars().count() as i64)
        .sum();
    let metered = Metered::check(state, a, &content, &messages, &model).await?;
    let req = llm::ChatRequest {
        model: model.model.clone(),
        system: passages
            .as_ref()
            .map(|_| crate::knowledge::RAG_SYSTEM.to_string()),
        messages,
        max_tokens: None,
        temperature: None,
    };
    let turn = NewTurn {
        tenant_id: a.ctx.tenant.id.clone(),
        conversation_id: conv.id.clone(),
        content: content.clone(),
        attachment_name: attachment.as_ref().map(|(n, _)| n.clone()),
        attachment_text: attachment.map(|(_, t)| t),
        sources: passages
            .as_ref()
            .map(|p| serde_json::to_string(p).unwrap_or_else(|_| "[]".into())),
        input_chars,
        model_id: model.id.clone(),
        model_name: model.display_name.clone(),
        provider_name: provider.name.clone(),
        now: a.ctx.now,
    };
    // The question is recorded while the upstream request is already on its way, so the
    // database's write queue does not delay the first token; the answer is reported done
    // only after the record exists.
    let store = state.store.clone();
    let audit = a.audit();
    let rename = (history.is_empty() && conv.title == "新しい会話").then(|| {
        (
            a.ctx.tenant.id.clone(),
            a.auth.user.id.clone(),
            conv.id.clone(),
            title_from(&content),
        )
    });
    let record = tokio::spawn(async move {
        let (_, answer_id) = store.begin_turn(&turn, audit).await?;
        if let Some((tenant, user, conv, title)) = rename {
            store
                .rename_conversation(&tenant, &user, &conv, &title)
                .await?;
        }
        Ok(answer_id)
    });
    Ok(start(state, a, record, metered, &provider, req))
}

/// Answers the last question again (with this model); the earlier answers stay on record.
pub async fn regenerate(
    state: &Shared,
    a: &Authed,
    conversation_id: &str,
    model_id: &str,
) -> AppResult<Response> {
    let conv = own_conversation(state, a, conversation_id).await?;
    let (model, provider) = pick_model(state, a, model_id).await?;
    let history = state.store.messages(&a.ctx.tenant.id, &conv.id).await?;
    let Some(last_q) = history.iter().rposition(|m| m.role == "user") else {
        return Err(AppError::BadRequest("まだ質問がありません。".into()));
    };
    if history[last_q..].iter().any(|m| m.status == "streaming") {
        return Err(AppError::Conflict(
            "回答の作成中です。終わってから再生成してください。".into(),
        ));
    }
    let mut messages = history_pairs(&history[..last_q]);
    // Asked over knowledge: the same passages again.
    let passages: Option<Vec<storage::Passage>> = history[last_q]
        .sources
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok());
    if let Some(p) = &passages {
        // Still readable by the caller, and receivable by this model (S14).
        let mut ids: Vec<String> = p.iter().map(|x| x.collection_id.clone()).collect();
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            knowledge_for(state, a, &model, &ids).await?;
        }
    }
    let asked = with_attachment(
        &history[last_q].content,
        history[last_q].attachment_name.as_deref(),
        history[last_q].attachment_text.as_deref(),
    );
    messages.push(llm::ChatMessage {
        role: llm::Role::User,
        content: match &passages {
            Some(p) => crate::knowledge::with_passages(&asked, p),
            None => asked,
        },
    });
    let input_chars = messages
        .iter()
        .map(|m| m.content.chars().count() as i64)
        .sum();
    // The question goes to the model again, so it counts again.
    let metered = Metered::check(state, a, &history[last_q].content, &messages, &model).await?;
    let req = llm::ChatRequest {
        model: model.model.clone(),
        system: passages
            .as_ref()
            .map(|_| crate::knowledge::RAG_SYSTEM.to_string()),
        messages,
        max_tokens: None,
        temperature: None,
    };
    let turn = NewTurn {
        tenant_id: a.ctx.tenant.id.clone(),
        conversation_id: conv.id.clone(),
        content: String::new(),
        attachment_name: None,
        attachment_text: None,
        sources: None,
        input_chars,
        model_id: model.id.clone(),
        model_name: model.display_name.clone(),
        provider_name: provider.name.clone(),
        now: a.ctx.now,
    };
    let store = state.store.clone();
    let audit = a.audit();
    let record = tokio::spawn(async move { store.begin_answer(&turn, audit).await });
    Ok(start(state, a, record, metered, &provider, req))
}

/// A request that passed the allowance check: what it counts so far, the hold on the
/// allowance, and who and where it is counted for.
struct Metered {
    hold: crate::usage::Hold,
    count_context: bool,
    rec: storage::UsageRecord,
}

impl Metered {
    /// Counts the question and the context sent with it, and holds room for the answer;
    /// refuses when a limit is used up.
    async fn check(
        state: &Shared,
        a: &Authed,
        question: &str,
        sent: &[llm::ChatMessage],
        model: &Model,
    ) -> AppResult<Metered> {
        use domain::usage::count_chars;
        let policy = &a.ctx.tenant.settings.usage;
        let input_chars = count_chars(question);
        let total: i64 = sent.iter().map(|m| count_chars(&m.content)).sum();
        let context_chars = (total - input_chars).max(0);
        let counted_input = input_chars
            + if policy.count_context {
                context_chars
            } else {
                0
            };
        let catalog = state.catalog(&a.ctx.tenant.id).await?;
        let place = crate::usage::placement(a, &catalog);
        let month = domain::usage::Month::of(a.ctx.now);
        let hold = crate::usage::reserve(
            state,
            &a.ctx.tenant.id,
            month,
            &place.scopes,
            counted_input,
            policy.allow_overrun,
        )
        .await?;
        let user = &a.auth.user;
        let rec = storage::UsageRecord {
            tenant_id: a.ctx.tenant.id.clone(),
            month: month.key(),
            day: i64::from(domain::usage::day_of_month(a.ctx.now)),
            at: a.ctx.now,
            user_id: user.id.clone(),
            user_login: user.login_id.clone(),
            user_name: user.display_name.clone(),
            department_id: Some(user.department_id.clone()),
            department_path: user.department_path.clone(),
            dept_chain: place.dept_chain,
            model_id: Some(model.id.clone()),
            model_name: model.display_name.clone(),
            input_chars,
            context_chars,
            over_limit: hold.over_limit,
            ..Default::default()
        };
        Ok(Metered {
            hold,
            count_context: policy.count_context,
            rec,
        })
    }

    /// The record of what the request used. A failed request that produced nothing counts
    /// nothing (the provider did not answer); stopped and partial answers count what was
    /// sent and what came back.
    fn settle(
        &self,
        status: &str,
        output: &str,
        end: &AnswerEnd,
        message_id: Option<&str>,
    ) -> storage::UsageRecord {
        let mut rec = self.rec.clone();
        rec.status = status.to_string();
        rec.message_id = message_id.map(str::to_string);
        rec.output_chars = domain::usage::count_chars(output);
        rec.input_tokens = end.input_tokens;
        rec.output_tokens = end.output_tokens;
        rec.counted_chars = if status == "failed" && rec.output_chars == 0 {
            0
        } else {
            rec.input_chars
                + rec.output_chars
                + if self.count_context {
                    rec.context_chars
                } else {
                    0
                }
        };
        rec
    }
}

struct Answer {
    state: Shared,
    tenant_id: String,
    user_id: String,
    record: Record,
    metered: Metered,
    client: Result<llm::Client, llm::LlmError>,
    req: llm::ChatRequest,
}

impl Answer {
    /// Runs upstream, relays deltas, and stores the outcome whatever happens.
    async fn run(self, sse: mpsc::Sender<Event>) {
        let started = Instant::now();
        let mut content = String::new();
        let mut ttft: Option<i64> = None;
        let mut cancelled = false;
        let result = match self.client {
            Err(e) => Err(e),
            Ok(client) => {
                let (tx, mut rx) = mpsc::channel::<String>(64);
                let (ptx, mut prx) = mpsc::channel::<llm::Progress>(8);
                let req = self.req;
                let upstream =
                    tokio::spawn(
                        async move { client.stream_with_progress(&req, tx, Some(ptx)).await },
                    );
                loop {
                    tokio::select! {
                        Some(p) = prx.recv() => {
                            let text = match p {
                                llm::Progress::Queued { position } => format!(
                                    "順番待ちです（{position}番目）。前の回答が終わりしだい始まります。"
                                ),
                                llm::Progress::Loading => "AIモデルを読み込んでいます。しばらくお待ちください。".into(),
                                llm::Progress::Started => String::new(),
                            };
                            if sse.send(event("status", &Payload::Status { text })).await.is_err() {
                                cancelled = true;
                                break;
                            }
                        }
                        d = rx.recv() => match d {
                            Some(text) => {
                                if ttft.is_none() {
                                    ttft = Some(started.elapsed().as_millis() as i64);
                                }
                                content.push_str(&text);
                                if sse.send(event("delta", &Payload::Delta { text })).await.is_err() {
                                    cancelled = true;
                                    break;
                                }
                            }
                            None => break,
                        },
                        _ = sse.closed() => {
                            cancelled = true;
                            break;
                        }
                    }
                }
                // Dropping the receiver tells the adapter to drop the upstream request.
                drop(rx);
                match upstream.await {
                    Ok(r) => r,
                    Err(e) => Err(llm::LlmError {
                        kind: llm::ErrorKind::Upstream,
                        status: None,
                        detail: e.to_string(),
                        retry_after: None,
                    }),
                }
            }
        };
        let total_ms = started.elapsed().as_millis() as i64;
        let (status, end) = match &result {
            Ok(end) if !cancelled => (
                "complete",
                AnswerEnd {
                    status: "complete".into(),
                    content: content.clone(),
                    input_tokens: end.input_tokens.map(|t| t as i64),
                    output_tokens: end.output_tokens.map(|t| t as i64),
                    ttft_ms: ttft,
                    total_ms,
                    ..Default::default()
                },
            ),
            _ if cancelled => (
                "stopped",
                AnswerEnd {
                    status: "stopped".into(),
                    content: content.clone(),
                    ttft_ms: ttft,
                    total_ms,
                    ..Default::default()
                },
            ),
            Err(e) => (
                "failed",
                AnswerEnd {
                    status: "failed".into(),
                    content: content.clone(),
                    error_code: Some(e.code().to_string()),
                    error_detail: Some(e.to_string()),
                    ttft_ms: ttft,
                    total_ms,
                    ..Default::default()
                },
            ),
            Ok(_) => ("complete", AnswerEnd::default()),
        };
        let answer_id = match self.record.await {
            Ok(Ok(id)) => id,
            other => {
                tracing::error!(outcome = ?other.map(|r| r.map(|_| ())), "could not record a chat turn");
                // The provider still did the work: its characters count.
                let usage = self.metered.settle(status, &content, &end, None);
                let mut metered = self.metered;
                match self.state.store.record_usage(&usage).await {
                    Ok(()) => metered.hold.settled(usage.counted_chars),
                    Err(e) => {
                        tracing::error!(error = %e, "could not record usage of an unrecorded answer")
                    }
                }
                drop(metered);
                if !cancelled {
                    let p = Payload::Error {
                        code: "record_failed".into(),
                        message: "回答を記録できなかったため、この回答は保存されていません。時間をおいて再度お試しください。".into(),
                        retryable: true,
                    };
                    let _ = sse.send(event("error", &p)).await;
                }
                return;
            }
        };
        let usage = self
            .metered
            .settle(status, &content, &end, Some(&answer_id));
        let mut hold = self.metered.hold;
        match self
            .state
            .store
            .finish_answer(
                &self.tenant_id,
                &answer_id,
                &end,
                &self.user_id,
                self.state.now(),
                Some(&usage),
            )
            .await
        {
            Ok(()) => hold.settled(usage.counted_chars),
            Err(e) => tracing::error!(error = %e, "could not store the end of an answer"),
        }
        // The hold ends only now that the real count is stored.
        drop(hold);
        if cancelled {
            return;
        }
        match result {
            Ok(_) => {
                let usage = Payload::Usage {
                    input_chars: usage.input_chars,
                    output_chars: usage.output_chars,
                    context_chars: usage.context_chars,
                    counted_chars: usage.counted_chars,
                    input_tokens: end.input_tokens,
                    output_tokens: end.output_tokens,
                    ttft_ms: ttft,
                    total_ms,
                };
                let _ = sse.send(event("usage", &usage)).await;
                let _ = sse
                    .send(event(
                        "done",
                        &Payload::Done {
                            message_id: answer_id.clone(),
                            status,
                        },
                    ))
                    .await;
            }
            Err(e) => {
                tracing::warn!(code = e.code(), "answer failed");
                let p = Payload::Error {
                    code: e.code().to_string(),
                    message: e.message_ja(),
                    retryable: e.retryable(),
                };
                let _ = sse.send(event("error", &p)).await;
                let _ = sse
                    .send(event(
                        "done",
                        &Payload::Done {
                            message_id: answer_id.clone(),
                            status,
                        },
                    ))
                    .await;
            }
        }
    }
}
