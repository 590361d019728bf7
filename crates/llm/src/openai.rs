//! OpenAI Chat Completions wire format, shared by OpenAI, OpenAI-compatible servers and
//! Azure OpenAI (which differs only in URL and auth header).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::{ProviderConfig, ProviderKind};
use crate::error::LlmError;
use crate::sse::SseEvent;
use crate::types::{ChatRequest, Role, StreamEnd};
use crate::wire::{self, Flow};

pub(crate) fn url(
    base: &reqwest::Url,
    cfg: &ProviderConfig,
    model: &str,
) -> Result<reqwest::Url, LlmError> {
    if cfg.kind == ProviderKind::AzureOpenAi {
        // Admins often paste the endpoint with `/openai` already on it.
        let mut u = wire::strip_trailing_segment(base, "openai");
        wire::push_segments(
            &mut u,
            &["openai", "deployments", model, "chat", "completions"],
        )?;
        u.query_pairs_mut()
            .append_pair("api-version", cfg.azure_api_version());
        Ok(u)
    } else {
        let mut u = base.clone();
        wire::push_segments(&mut u, &["chat", "completions"])?;
        Ok(u)
    }
}

pub(crate) fn body(req: &ChatRequest, cfg: &ProviderConfig, base: &reqwest::Url) -> Value {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for m in &req.messages {
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        messages.push(json!({"role": role, "content": m.content}));
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(req.model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    if let Some(n) = req.max_tokens {
        body.insert(max_tokens_field(cfg, base).into(), json!(n));
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t));
    }
    Value::Object(body)
}

/// OpenAI's reasoning models reject the old `max_tokens` and want
/// `max_completion_tokens`, which Azure knows from api-version 2024-09-01 on; most
/// OpenAI-compatible servers (Ollama, older vLLM and llama.cpp) only know `max_tokens`.
fn max_tokens_field(cfg: &ProviderConfig, base: &reqwest::Url) -> &'static str {
    match cfg.kind {
        ProviderKind::AzureOpenAi if cfg.azure_api_version() >= "2024-09-01" => {
            "max_completion_tokens"
        }
        ProviderKind::OpenAi if base.host_str() == Some("api.openai.com") => {
            "max_completion_tokens"
        }
        _ => "max_tokens",
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

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
        let data = ev.data.trim();
        if data == "[DONE]" {
            return Ok(Flow::Done(std::mem::take(&mut self.end)));
        }
        if data.is_empty() {
            return Ok(Flow::Continue);
        }
        let chunk: Chunk = wire::parse_json(data)?;
        if let Some(err) = chunk.error {
            return Err(wire::stream_error(&err));
        }
        // Azure sends a first chunk with empty `choices` (prompt filter results only).
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice
                .delta
                .and_then(|d| d.content)
                .filter(|t| !t.is_empty())
            {
                deltas.push(text);
            }
            if choice.finish_reason.is_some() {
                self.end.finish_reason = choice.finish_reason;
            }
        }
        if let Some(u) = chunk.usage {
            self.end.input_tokens = u.prompt_tokens.or(self.end.input_tokens);
            self.end.output_tokens = u.completion_tokens.or(self.end.output_tokens);
        }
        Ok(Flow::Continue)
    }

    pub(crate) fn at_eof(self) -> Result<StreamEnd, LlmError> {
        Err(wire::cut("the stream ended without data: [DONE]"))
    }
}
