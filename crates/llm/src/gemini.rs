//! Google Gemini `streamGenerateContent` wire format (with `alt=sse`): each event is a
//! whole response object; the last one carries `finishReason` and the stream then closes.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::LlmError;
use crate::sse::SseEvent;
use crate::types::{ChatRequest, Role, StreamEnd};
use crate::wire::{self, Flow};

pub(crate) fn url(base: &reqwest::Url, model: &str) -> Result<reqwest::Url, LlmError> {
    // Model ids are listed by the API as `models/gemini-...`; accept both spellings.
    let model = model.strip_prefix("models/").unwrap_or(model);
    let mut u = wire::strip_trailing_segment(base, "v1beta");
    wire::push_segments(
        &mut u,
        &[
            "v1beta",
            "models",
            &format!("{model}:streamGenerateContent"),
        ],
    )?;
    u.query_pairs_mut().append_pair("alt", "sse");
    Ok(u)
}

pub(crate) fn body(req: &ChatRequest) -> Value {
    // Gemini rejects parts with empty text, which a stopped-before-any-text answer leaves.
    let contents: Vec<Value> = req
        .messages
        .iter()
        .filter(|m| !m.content.is_empty())
        .map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "model",
            };
            json!({"role": role, "parts": [{"text": m.content}]})
        })
        .collect();
    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system}]}),
        );
    }
    let mut gen = Map::new();
    if let Some(n) = req.max_tokens {
        gen.insert("maxOutputTokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        gen.insert("temperature".into(), json!(t));
    }
    if !gen.is_empty() {
        body.insert("generationConfig".into(), Value::Object(gen));
    }
    Value::Object(body)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback>,
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
    /// Thinking models may stream thought summaries; they are not part of the answer.
    #[serde(default)]
    thought: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Default)]
pub(crate) struct Decoder {
    end: StreamEnd,
    finished: bool,
}

impl Decoder {
    pub(crate) fn on_event(
        &mut self,
        ev: SseEvent,
        deltas: &mut Vec<String>,
    ) -> Result<Flow, LlmError> {
        if ev.data.trim().is_empty() {
            return Ok(Flow::Continue);
        }
        let chunk: Chunk = wire::parse_json(&ev.data)?;
        if let Some(err) = chunk.error {
            return Err(wire::stream_error(&err));
        }
        if let Some(c) = chunk.candidates.into_iter().next() {
            for part in c.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(text) = part.text.filter(|t| !part.thought && !t.is_empty()) {
                    deltas.push(text);
                }
            }
            if let Some(reason) = c.finish_reason {
                self.end.finish_reason = Some(reason);
                self.finished = true;
            }
        }
        // A blocked prompt gets no candidates at all, only the reason, then the stream ends.
        if let Some(reason) = chunk.prompt_feedback.and_then(|p| p.block_reason) {
            self.end.finish_reason = Some(reason);
            self.finished = true;
        }
        if let Some(u) = chunk.usage_metadata {
            self.end.input_tokens = u.prompt_token_count.or(self.end.input_tokens);
            self.end.output_tokens = u.candidates_token_count.or(self.end.output_tokens);
        }
        // The proper end is EOF after the finishReason, so keep reading until then.
        Ok(Flow::Continue)
    }

    pub(crate) fn at_eof(self) -> Result<StreamEnd, LlmError> {
        if self.finished {
            Ok(self.end)
        } else {
            Err(wire::cut("the stream ended without a finishReason"))
        }
    }
}
