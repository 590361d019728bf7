//! Anthropic Messages API wire format: named SSE events from `message_start` to
//! `message_stop`, with the system prompt as a top-level field.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ErrorKind, LlmError};
use crate::sse::SseEvent;
use crate::types::{ChatRequest, Role, StreamEnd, ANTHROPIC_DEFAULT_MAX_TOKENS};
use crate::wire::{self, Flow};

pub(crate) const API_VERSION: &str = "2023-06-01";

pub(crate) fn url(base: &reqwest::Url) -> Result<reqwest::Url, LlmError> {
    // The documented base URL has no `/v1`, but a pasted one often does.
    let mut u = wire::strip_trailing_segment(base, "v1");
    wire::push_segments(&mut u, &["v1", "messages"])?;
    Ok(u)
}

pub(crate) fn body(req: &ChatRequest) -> Value {
    // Anthropic rejects empty text blocks, which a stopped-before-any-text answer leaves.
    let messages: Vec<Value> = req
        .messages
        .iter()
        .filter(|m| !m.content.is_empty())
        .map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": m.content})
        })
        .collect();
    let mut body = Map::new();
    body.insert("model".into(), json!(req.model));
    body.insert(
        "max_tokens".into(),
        json!(req.max_tokens.unwrap_or(ANTHROPIC_DEFAULT_MAX_TOKENS)),
    );
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        body.insert("system".into(), json!(system));
    }
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), json!(true));
    if let Some(t) = req.temperature {
        // Anthropic's range is 0..=1, OpenAI's 0..=2; clamp rather than fail the request.
        body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    Value::Object(body)
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    kind: String,
    message: Option<Message>,
    delta: Option<Delta>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl Usage {
    /// `input_tokens` excludes cached prompt parts; staff usage figures should not.
    fn total_input(&self) -> Option<u64> {
        self.input_tokens.map(|n| {
            n + self.cache_creation_input_tokens.unwrap_or(0)
                + self.cache_read_input_tokens.unwrap_or(0)
        })
    }
}

const USED_EVENTS: [&str; 5] = [
    "message_start",
    "content_block_delta",
    "message_delta",
    "message_stop",
    "error",
];

#[derive(Default)]
pub(crate) struct Decoder {
    end: StreamEnd,
}

impl Decoder {
    pub(crate) fn on_event(
        &mut self,
        ev: SseEvent,
        deltas: &mut Vec<String>,
    ) -> Result<Flow, LlmError> {
        // Events we do not use (ping, content_block_start/stop, future ones) are skipped
        // unparsed, so a new event shape can never break a stream.
        if let Some(name) = ev.event.as_deref() {
            if !USED_EVENTS.contains(&name) {
                return Ok(Flow::Continue);
            }
        }
        let parsed: Event = wire::parse_json(&ev.data)?;
        let name = ev.event.as_deref().unwrap_or(parsed.kind.as_str());
        match name {
            "message_start" => {
                if let Some(u) = parsed.message.and_then(|m| m.usage) {
                    self.end.input_tokens = u.total_input();
                    self.end.output_tokens = u.output_tokens;
                }
            }
            "content_block_delta" => {
                if let Some(d) = parsed.delta {
                    if d.kind.as_deref() == Some("text_delta") {
                        if let Some(text) = d.text.filter(|t| !t.is_empty()) {
                            deltas.push(text);
                        }
                    }
                }
            }
            "message_delta" => {
                if let Some(reason) = parsed.delta.and_then(|d| d.stop_reason) {
                    self.end.finish_reason = Some(reason);
                }
                if let Some(u) = parsed.usage {
                    self.end.output_tokens = u.output_tokens.or(self.end.output_tokens);
                    self.end.input_tokens = u.total_input().or(self.end.input_tokens);
                }
            }
            "message_stop" => return Ok(Flow::Done(std::mem::take(&mut self.end))),
            "error" => return Err(stream_error(parsed.error.as_ref())),
            _ => {}
        }
        Ok(Flow::Continue)
    }

    pub(crate) fn at_eof(self) -> Result<StreamEnd, LlmError> {
        Err(wire::cut("the stream ended without message_stop"))
    }
}

/// Maps an in-stream `error` event, whose `error.type` says what an HTTP status would.
fn stream_error(err: Option<&Value>) -> LlmError {
    let kind_name = err
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = match kind_name {
        "rate_limit_error" => ErrorKind::RateLimited,
        "authentication_error" | "permission_error" => ErrorKind::Auth,
        "not_found_error" => ErrorKind::NotFound,
        "invalid_request_error" | "request_too_large" => ErrorKind::BadRequest,
        // overloaded_error, api_error and anything new.
        _ => ErrorKind::Upstream,
    };
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("error event without message");
    LlmError::new(kind, format!("{kind_name}: {message}"))
}
