//! Fake LLM providers for tests: real HTTP servers on 127.0.0.1 that speak the streaming
//! wire format of OpenAI, Azure OpenAI, Anthropic or Gemini, and misbehave on request
//! (errors, hangs, cut streams, huge or invalid chunks, endless drips) so that the client's
//! failure handling can be tested end to end without the network.
//!
//! Each request takes the next queued [`Script`] (or the default one). Every request is
//! recorded, and responses still being written are counted so that a test can prove the
//! client really closed the upstream connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hub;
mod smtp;
pub use hub::FakeHub;
pub use smtp::{ReceivedMail, SmtpSink};

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Which provider the fake imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

/// What the fake does with one request.
#[derive(Clone, Debug)]
pub enum Script {
    /// A normal stream: one text delta per chunk, `delay_ms` between chunks, then the
    /// flavour's proper end with usage (input 12 tokens, output `chunks.len()` tokens).
    Answer { chunks: Vec<String>, delay_ms: u64 },
    /// A plain HTTP error. An empty `body` means the flavour's own error JSON for `code`.
    Status {
        code: u16,
        retry_after: Option<u64>,
        body: String,
    },
    /// Never answers, not even with headers.
    Hang,
    /// `302 Found` to this location (a provider must never be followed elsewhere).
    Redirect { location: String },
    /// Sends the chunks, then ends the body without the flavour's proper end.
    CutAfter { chunks: Vec<String> },
    /// One SSE line of `bytes` bytes, written in 64 KiB pieces.
    HugeChunk { bytes: usize },
    /// A `data:` line that is not JSON.
    InvalidJson,
    /// Text deltas ("x") every `delay_ms`, never ending.
    Endless { delay_ms: u64 },
    /// A 200 `text/event-stream` response with exactly this body (e.g. an in-stream
    /// `error` event), for cases the other scripts do not cover.
    Raw { body: String },
}

impl Script {
    pub fn answer<S: Into<String>>(chunks: impl IntoIterator<Item = S>, delay_ms: u64) -> Script {
        Script::Answer {
            chunks: chunks.into_iter().map(Into::into).collect(),
            delay_ms,
        }
    }

    pub fn status(code: u16) -> Script {
        Script::Status {
            code,
            retry_after: None,
            body: String::new(),
        }
    }
}

fn default_script() -> Script {
    Script::answer(["こんにちは", "。"], 0)
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1beta/models/m:streamGenerateContent?alt=sse`.
    pub path: String,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Value::String` with the raw text if it was not JSON).
    pub body: Value,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

struct Shared {
    flavor: Flavor,
    queue: Mutex<VecDeque<Script>>,
    default: Mutex<Script>,
    requests: Mutex<Vec<RecordedRequest>>,
    open: AtomicUsize,
    deltas_sent: AtomicU64,
    bytes_sent: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// A running fake provider. Dropping it shuts the server down too.
pub struct FakeProvider {
    /// What `ProviderConfig.base_url` should be for this flavour.
    pub base_url: String,
    pub addr: SocketAddr,
    pub flavor: Flavor,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeProvider {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(flavor: Flavor) -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            flavor,
            queue: Mutex::new(VecDeque::new()),
            default: Mutex::new(default_script()),
            requests: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            deltas_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            shutdown: shutdown_rx.clone(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let mut stop_rx = shutdown_rx;
        let server = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            // A real provider's edge flushes each event at once; so must the fake.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                })
                .await;
        });
        let base_url = match flavor {
            Flavor::OpenAi => format!("http://{addr}/v1"),
            Flavor::Azure | Flavor::Anthropic | Flavor::Gemini => format!("http://{addr}"),
        };
        FakeProvider {
            base_url,
            addr,
            flavor,
            shared,
            shutdown,
            server: Mutex::new(Some(server)),
        }
    }

    /// Queues a script for the next request that has none.
    pub fn push(&self, script: Script) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(script);
    }

    /// The script used when the queue is empty.
    pub fn set_default(&self, script: Script) {
        *self
            .shared
            .default
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = script;
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Responses currently being written (including hanging ones).
    pub fn open_streams(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Text deltas written so far, over all responses (how far an `Endless` got).
    pub fn deltas_sent(&self) -> u64 {
        self.shared.deltas_sent.load(Ordering::SeqCst)
    }

    /// Response body bytes handed to the HTTP server so far, over all responses.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::SeqCst)
    }

    /// Ends all responses and stops the server.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let handle = self
            .server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut handle) = handle {
            if tokio::time::timeout(Duration::from_secs(2), &mut handle)
                .await
                .is_err()
            {
                handle.abort();
            }
        }
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(handle) = self
            .server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            handle.abort();
        }
    }
}

/// Counts an open response for as long as it lives; hyper drops the response body (and
/// with it this guard) when the client goes away.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> OpenGuard {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    shared
        .requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });

    let flavor = shared.flavor;
    let model = match route(
        flavor,
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &body,
    ) {
        Ok(m) => m,
        Err((code, msg)) => return error_response(code, None, &error_body(flavor, code, &msg)),
    };
    if !has_auth(flavor, &parts.headers, parts.uri.query().unwrap_or("")) {
        return error_response(401, None, &error_body(flavor, 401, &auth_message(flavor)));
    }
    if flavor == Flavor::Anthropic && !parts.headers.contains_key("anthropic-version") {
        let msg = "anthropic-version: header is required";
        return error_response(400, None, &error_body(flavor, 400, msg));
    }

    let script = shared
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop_front()
        .unwrap_or_else(|| {
            shared
                .default
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
    match script {
        Script::Status {
            code,
            retry_after,
            body,
        } => {
            let body = if body.is_empty() {
                error_body(flavor, code, &default_message(code))
            } else {
                body
            };
            error_response(code, retry_after, &body)
        }
        Script::Redirect { location } => (
            StatusCode::FOUND,
            [(axum::http::header::LOCATION, location)],
        )
            .into_response(),
        Script::Hang => {
            let _open = OpenGuard::new(&shared);
            let mut stop = shared.shutdown.clone();
            let _ = stop.wait_for(|s| *s).await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        _ if parts.uri.path().ends_with("/embeddings") => embeddings_response(&body),
        other => stream_response(&shared, Sse { flavor, model }, other),
    }
}

/// The dimensions of the toy embedding model (or the request's `dimensions`).
pub const EMBEDDING_DIMS: usize = 256;

/// Words the toy embedding model treats as one meaning, so a test can show vectors
/// finding what shares no characters with the question.
const SYNONYMS: &[(&str, &str)] = &[("引っ越し", "転居"), ("引越し", "転居"), ("子ども", "児童")];

/// A small deterministic "embedding model": character bigrams (after folding the synonyms
/// above) hashed into `dims` buckets, L2-normalised. Similar texts get similar vectors.
pub fn toy_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut t = text.to_string();
    for (from, to) in SYNONYMS {
        t = t.replace(from, to);
    }
    let chars: Vec<char> = t.chars().filter(|c| !c.is_whitespace()).collect();
    let mut v = vec![0f32; dims.max(1)];
    for w in chars.windows(2) {
        let mut h: u64 = 0xcbf29ce484222325;
        for c in w {
            h = (h ^ u64::from(*c)).wrapping_mul(0x100000001b3);
        }
        let i = (h % v.len() as u64) as usize;
        v[i] += if (h >> 63) == 1 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        v[0] = 1.0;
    } else {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// OpenAI's `/embeddings` answer for the request's `input` (a string or a list).
fn embeddings_response(body: &Value) -> Response {
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect(),
        _ => {
            return error_response(
                400,
                None,
                &error_body(Flavor::OpenAi, 400, "'input' is a required property"),
            )
        }
    };
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(EMBEDDING_DIMS, |d| d as usize);
    let tokens: usize = inputs.iter().map(|i| i.chars().count()).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": toy_embedding(t, dims)}))
        .collect();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// Checks the path against the flavour's endpoint and returns the model it names.
fn route(flavor: Flavor, path: &str, query: &str, body: &Value) -> Result<String, (u16, String)> {
    let body_model = || {
        body.get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let not_found = || (404, format!("no such endpoint: {path}"));
    match flavor {
        Flavor::OpenAi if path == "/v1/chat/completions" => Ok(body_model()),
        Flavor::OpenAi if path == "/v1/embeddings" => Ok(body_model()),
        Flavor::Anthropic if path == "/v1/messages" => Ok(body_model()),
        Flavor::Azure => {
            let dep = path
                .strip_prefix("/openai/deployments/")
                .and_then(|r| {
                    r.strip_suffix("/chat/completions")
                        .or_else(|| r.strip_suffix("/embeddings"))
                })
                .filter(|d| !d.is_empty() && !d.contains('/'))
                .ok_or_else(not_found)?;
            if !query
                .split('&')
                .any(|p| p.starts_with("api-version=") && p.len() > 12)
            {
                return Err((400, "Missing required query parameter: api-version".into()));
            }
            Ok(dep.to_string())
        }
        Flavor::Gemini => {
            let model = path
                .strip_prefix("/v1beta/models/")
                .and_then(|r| r.strip_suffix(":streamGenerateContent"))
                .filter(|m| !m.is_empty())
                .ok_or_else(not_found)?;
            if !query.split('&').any(|p| p == "alt=sse") {
                return Err((400, "this fake only streams with alt=sse".into()));
            }
            Ok(model.to_string())
        }
        _ => Err(not_found()),
    }
}

fn has_auth(flavor: Flavor, headers: &HeaderMap, query: &str) -> bool {
    let present = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().is_empty())
    };
    match flavor {
        Flavor::OpenAi => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| !k.trim().is_empty()),
        Flavor::Azure => present("api-key"),
        Flavor::Anthropic => present("x-api-key"),
        Flavor::Gemini => {
            present("x-goog-api-key")
                || query
                    .split('&')
                    .any(|p| p.starts_with("key=") && p.len() > 4)
        }
    }
}

fn auth_message(flavor: Flavor) -> String {
    match flavor {
        Flavor::OpenAi => "You didn't provide an API key.".into(),
        Flavor::Azure => "Access denied due to missing subscription key.".into(),
        Flavor::Anthropic => "x-api-key header is required".into(),
        Flavor::Gemini => "Method doesn't allow unregistered callers. Please use API Key.".into(),
    }
}

fn default_message(code: u16) -> String {
    match code {
        400 => "bad request".into(),
        401 => "invalid api key".into(),
        403 => "permission denied".into(),
        404 => "model not found".into(),
        429 => "rate limit exceeded".into(),
        500 => "internal server error".into(),
        503 | 529 => "overloaded".into(),
        c => format!("error {c}"),
    }
}

/// The flavour's own JSON error body for an HTTP status.
pub fn error_body(flavor: Flavor, code: u16, message: &str) -> String {
    let body = match flavor {
        Flavor::OpenAi => {
            let (kind, c) = match code {
                401 => ("invalid_request_error", json!("invalid_api_key")),
                404 => ("invalid_request_error", json!("model_not_found")),
                429 => ("requests", json!("rate_limit_exceeded")),
                400..=499 => ("invalid_request_error", Value::Null),
                _ => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": c}})
        }
        Flavor::Azure => {
            let c = match code {
                404 => "DeploymentNotFound".to_string(),
                500 => "InternalServerError".to_string(),
                c => c.to_string(),
            };
            json!({"error": {"code": c, "message": message}})
        }
        Flavor::Anthropic => {
            let kind = match code {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Flavor::Gemini => {
            let status = match code {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            json!({"error": {"code": code, "message": message, "status": status}})
        }
    };
    body.to_string()
}

fn error_response(code: u16, retry_after: Option<u64>, body: &str) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json");
    if let Some(secs) = retry_after {
        builder = builder.header("retry-after", secs.to_string());
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

/// Formats SSE events the way the flavour does.
struct Sse {
    flavor: Flavor,
    model: String,
}

/// One piece of a response body; `delta` marks text deltas (they are timed and counted).
struct Frame {
    data: Bytes,
    delta: bool,
}

impl Sse {
    fn data(&self, v: &Value) -> String {
        // Gemini really separates events with CRLF; it keeps the client's CRLF handling honest.
        match self.flavor {
            Flavor::Gemini => format!("data: {v}\r\n\r\n"),
            _ => format!("data: {v}\n\n"),
        }
    }

    fn event(&self, name: &str, v: &Value) -> String {
        format!("event: {name}\ndata: {v}\n\n")
    }

    fn frame(&self, s: String, delta: bool) -> Frame {
        Frame {
            data: Bytes::from(s),
            delta,
        }
    }

    fn openai_chunk(&self, choices: Value) -> Value {
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": self.model, "choices": choices})
    }

    fn preamble(&self) -> Vec<Frame> {
        let mut out = Vec::new();
        match self.flavor {
            Flavor::OpenAi | Flavor::Azure => {
                if self.flavor == Flavor::Azure {
                    // Azure opens with prompt filter results and no choices.
                    let v = json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]});
                    out.push(self.frame(self.data(&v), false));
                }
                let v = self.openai_chunk(
                    json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                );
                out.push(self.frame(self.data(&v), false));
            }
            Flavor::Anthropic => {
                let start = json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                    "role": "assistant", "content": [], "model": self.model, "stop_reason": null,
                    "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 1}}});
                out.push(self.frame(self.event("message_start", &start), false));
                let block = json!({"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}});
                out.push(self.frame(self.event("content_block_start", &block), false));
                out.push(self.frame(self.event("ping", &json!({"type": "ping"})), false));
            }
            Flavor::Gemini => {}
        }
        out
    }

    /// A text delta; for Gemini `finish` makes it the last chunk (with finishReason).
    fn delta(&self, text: &str, index: usize, finish: bool) -> Frame {
        let s = match self.flavor {
            Flavor::OpenAi | Flavor::Azure => {
                let v = self.openai_chunk(
                    json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]),
                );
                self.data(&v)
            }
            Flavor::Anthropic => {
                let v = json!({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": text}});
                self.event("content_block_delta", &v)
            }
            Flavor::Gemini => {
                let mut candidate =
                    json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
                if finish {
                    candidate["finishReason"] = json!("STOP");
                }
                let out = index as u64 + 1;
                let v = json!({"candidates": [candidate],
                    "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": out, "totalTokenCount": 12 + out},
                    "modelVersion": self.model});
                self.data(&v)
            }
        };
        self.frame(s, true)
    }

    fn ending(&self, n: usize) -> Vec<Frame> {
        let n = n as u64;
        let mut out = Vec::new();
        match self.flavor {
            Flavor::OpenAi | Flavor::Azure => {
                let finish =
                    self.openai_chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]));
                out.push(self.frame(self.data(&finish), false));
                let mut usage = self.openai_chunk(json!([]));
                usage["usage"] =
                    json!({"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n});
                out.push(self.frame(self.data(&usage), false));
                out.push(self.frame("data: [DONE]\n\n".into(), false));
            }
            Flavor::Anthropic => {
                out.push(self.frame(
                    self.event(
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": 0}),
                    ),
                    false,
                ));
                let delta = json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": n}});
                out.push(self.frame(self.event("message_delta", &delta), false));
                out.push(self.frame(
                    self.event("message_stop", &json!({"type": "message_stop"})),
                    false,
                ));
            }
            // Gemini's end is the finishReason on the last delta, then EOF.
            Flavor::Gemini => {}
        }
        out
    }

    fn answer(&self, chunks: &[String]) -> Vec<Frame> {
        let mut frames = self.preamble();
        let last = chunks.len().saturating_sub(1);
        for (i, c) in chunks.iter().enumerate() {
            frames.push(self.delta(c, i, i == last));
        }
        if chunks.is_empty() && self.flavor == Flavor::Gemini {
            frames.push(self.delta("", 0, true));
        }
        frames.extend(self.ending(chunks.len()));
        frames
    }

    fn cut_after(&self, chunks: &[String]) -> Vec<Frame> {
        let mut frames = self.preamble();
        for (i, c) in chunks.iter().enumerate() {
            frames.push(self.delta(c, i, false));
        }
        frames
    }

    fn invalid_json(&self) -> Vec<Frame> {
        let s = match self.flavor {
            Flavor::Anthropic => "event: message_start\ndata: {not json\n\n".to_string(),
            Flavor::Gemini => "data: {not json\r\n\r\n".to_string(),
            Flavor::OpenAi | Flavor::Azure => "data: {not json\n\n".to_string(),
        };
        vec![self.frame(s, false)]
    }
}

/// Writes frames into the response body channel, stopping when the client is gone or
/// the fake shuts down.
struct Writer {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

impl Writer {
    async fn send(&mut self, frame: Frame) -> bool {
        let n = frame.data.len() as u64;
        let ok = tokio::select! {
            r = self.tx.send(Ok(frame.data)) => r.is_ok(),
            _ = self.stop.wait_for(|s| *s) => false,
        };
        if ok {
            self.shared.bytes_sent.fetch_add(n, Ordering::SeqCst);
            if frame.delta {
                self.shared.deltas_sent.fetch_add(1, Ordering::SeqCst);
            }
        }
        ok
    }

    async fn sleep(&mut self, ms: u64) -> bool {
        if ms == 0 {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => true,
            () = self.tx.closed() => false,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }
}

fn stream_response(shared: &Arc<Shared>, sse: Sse, script: Script) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let guard = OpenGuard::new(shared);
    let mut w = Writer {
        tx,
        shared: shared.clone(),
        stop: shared.shutdown.clone(),
    };
    tokio::spawn(async move {
        match script {
            Script::Answer { chunks, delay_ms } => {
                let mut first_delta = true;
                for frame in sse.answer(&chunks) {
                    if frame.delta && !std::mem::take(&mut first_delta) && !w.sleep(delay_ms).await
                    {
                        return;
                    }
                    if !w.send(frame).await {
                        return;
                    }
                }
            }
            Script::CutAfter { chunks } => {
                for frame in sse.cut_after(&chunks) {
                    if !w.send(frame).await {
                        return;
                    }
                }
            }
            Script::HugeChunk { bytes } => {
                let head = match sse.flavor {
                    Flavor::Anthropic => "event: content_block_delta\ndata: ",
                    _ => "data: ",
                };
                if !w.send(sse.frame(head.into(), false)).await {
                    return;
                }
                let piece = Bytes::from(vec![b'a'; 64 * 1024]);
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(piece.len());
                    if !w
                        .send(Frame {
                            data: piece.slice(..n),
                            delta: false,
                        })
                        .await
                    {
                        return;
                    }
                    left -= n;
                }
                let _ = w.send(sse.frame("\n\n".into(), false)).await;
            }
            Script::InvalidJson => {
                for frame in sse.invalid_json() {
                    if !w.send(frame).await {
                        return;
                    }
                }
            }
            Script::Endless { delay_ms } => {
                for frame in sse.preamble() {
                    if !w.send(frame).await {
                        return;
                    }
                }
                let mut i = 0;
                loop {
                    if !w.send(sse.delta("x", i, false)).await || !w.sleep(delay_ms.max(1)).await {
                        return;
                    }
                    i += 1;
                }
            }
            Script::Raw { body } => {
                let _ = w.send(sse.frame(body, false)).await;
            }
            Script::Status { .. } | Script::Hang | Script::Redirect { .. } => {}
        }
    });
    let body = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|item| (item, (rx, guard)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap()
}
