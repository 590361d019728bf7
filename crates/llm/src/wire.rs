//! What the provider formats have in common: building URLs under a base, turning SSE
//! events into deltas through the right decoder, and reading providers' JSON error bodies.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::ProviderKind;
use crate::error::{kind_for_status, ErrorKind, LlmError};
use crate::sse::SseEvent;
use crate::types::StreamEnd;
use crate::{anthropic, gemini, openai};

/// What a decoder says after one event.
pub(crate) enum Flow {
    Continue,
    /// The provider's explicit end marker arrived.
    Done(StreamEnd),
}

pub(crate) enum Decoder {
    OpenAi(openai::Decoder),
    Anthropic(anthropic::Decoder),
    Gemini(gemini::Decoder),
}

impl Decoder {
    pub(crate) fn new(kind: ProviderKind) -> Decoder {
        match kind {
            // A local model never reaches the HTTP path; OpenAI's decoder is harmless.
            ProviderKind::OpenAi | ProviderKind::AzureOpenAi | ProviderKind::Local => {
                Decoder::OpenAi(openai::Decoder::default())
            }
            ProviderKind::Anthropic => Decoder::Anthropic(anthropic::Decoder::default()),
            ProviderKind::Gemini => Decoder::Gemini(gemini::Decoder::default()),
        }
    }

    pub(crate) fn on_event(
        &mut self,
        ev: SseEvent,
        deltas: &mut Vec<String>,
    ) -> Result<Flow, LlmError> {
        match self {
            Decoder::OpenAi(d) => d.on_event(ev, deltas),
            Decoder::Anthropic(d) => d.on_event(ev, deltas),
            Decoder::Gemini(d) => d.on_event(ev, deltas),
        }
    }

    /// The body ended; only formats whose proper end *is* EOF succeed here.
    pub(crate) fn at_eof(self) -> Result<StreamEnd, LlmError> {
        match self {
            Decoder::OpenAi(d) => d.at_eof(),
            Decoder::Anthropic(d) => d.at_eof(),
            Decoder::Gemini(d) => d.at_eof(),
        }
    }
}

pub(crate) fn push_segments(url: &mut reqwest::Url, segments: &[&str]) -> Result<(), LlmError> {
    let mut path = url
        .path_segments_mut()
        .map_err(|()| LlmError::new(ErrorKind::Config, "the base URL cannot have a path"))?;
    path.pop_if_empty().extend(segments);
    Ok(())
}

/// `base` without a trailing `/{segment}` (and without a trailing slash).
pub(crate) fn strip_trailing_segment(base: &reqwest::Url, segment: &str) -> reqwest::Url {
    let mut u = base.clone();
    if let Ok(mut p) = u.path_segments_mut() {
        p.pop_if_empty();
    }
    let last = u
        .path_segments()
        .and_then(|mut s| s.next_back().map(str::to_string));
    if last.as_deref() == Some(segment) {
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop();
        }
    }
    u
}

pub(crate) fn parse_json<T: DeserializeOwned>(data: &str) -> Result<T, LlmError> {
    serde_json::from_str(data).map_err(|e| {
        LlmError::new(
            ErrorKind::BadResponse,
            format!("invalid JSON in the stream: {e}"),
        )
    })
}

pub(crate) fn cut(what: &str) -> LlmError {
    LlmError::new(ErrorKind::BadResponse, format!("cut: {what}"))
}

/// An `{"error": {...}}` object inside an OpenAI-style or Gemini stream (vLLM, LiteLLM and
/// Gemini report failures after the 200 this way).
pub(crate) fn stream_error(err: &Value) -> LlmError {
    let status = err
        .get("code")
        .and_then(|c| {
            c.as_u64()
                .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
        })
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c));
    let kind = status.map_or(ErrorKind::Upstream, kind_for_status);
    let message = error_message(&Value::Object(
        [("error".to_string(), err.clone())].into_iter().collect(),
    ))
    .unwrap_or_else(|| err.to_string());
    LlmError::new(kind, format!("error in stream: {message}"))
}

/// The human-readable message in a provider's error body. Covers OpenAI/Azure/Gemini
/// (`{"error":{"message"}}`), Anthropic (`{"type":"error","error":{"message"}}`),
/// Gemini's array form, vLLM (`{"message"}`) and Ollama (`{"error":"..."}`).
pub(crate) fn error_message(body: &Value) -> Option<String> {
    let body = match body {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let from_error = match body.get("error") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(e) => e.get("message").and_then(Value::as_str).map(|m| {
            let code = e
                .get("type")
                .or_else(|| e.get("status"))
                .or_else(|| e.get("code"))
                .and_then(|c| match c {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
            match code {
                Some(c) => format!("{c}: {m}"),
                None => m.to_string(),
            }
        }),
        None => None,
    };
    from_error.or_else(|| {
        body.get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

/// Classifies an HTTP error response from its status and body.
pub(crate) fn http_error(status: u16, body: &[u8]) -> LlmError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let mut kind = kind_for_status(status);
    // Gemini answers an invalid key with 400 INVALID_ARGUMENT / reason API_KEY_INVALID.
    if status == 400 && json.as_ref().is_some_and(is_invalid_key) {
        kind = ErrorKind::Auth;
    }
    let detail = json.as_ref().and_then(error_message).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {status} without a body")
        } else {
            text.to_string()
        }
    });
    LlmError::new(kind, detail).with_status(status)
}

fn is_invalid_key(body: &Value) -> bool {
    let body = match body {
        Value::Array(items) => items.first().unwrap_or(body),
        other => other,
    };
    body.pointer("/error/details")
        .and_then(Value::as_array)
        .is_some_and(|d| {
            d.iter()
                .any(|x| x.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_messages_of_each_provider() {
        let openai = json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}});
        assert_eq!(
            error_message(&openai).unwrap(),
            "invalid_request_error: Incorrect API key provided"
        );
        let anthropic = json!({"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}});
        assert_eq!(
            error_message(&anthropic).unwrap(),
            "authentication_error: invalid x-api-key"
        );
        let gemini = json!([{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}]);
        assert_eq!(
            error_message(&gemini).unwrap(),
            "RESOURCE_EXHAUSTED: Quota exceeded"
        );
        assert_eq!(
            error_message(&json!({"error":"model 'x' not found"})).unwrap(),
            "model 'x' not found"
        );
        assert_eq!(
            error_message(&json!({"object":"error","message":"too long"})).unwrap(),
            "too long"
        );
        assert_eq!(error_message(&json!({"foo":1})), None);
    }

    #[test]
    fn gemini_invalid_key_is_auth() {
        let body = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        let e = http_error(400, body);
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(e.detail.contains("API key not valid"));
        assert_eq!(
            http_error(400, br#"{"error":{"message":"too long"}}"#).kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn non_json_body_is_kept_as_text() {
        let e = http_error(502, b"<html>Bad Gateway</html>");
        assert_eq!(e.kind, ErrorKind::Upstream);
        assert_eq!(e.status, Some(502));
        assert_eq!(e.detail, "<html>Bad Gateway</html>");
        assert_eq!(http_error(503, b"").detail, "HTTP 503 without a body");
    }

    #[test]
    fn in_stream_errors_use_their_code() {
        assert_eq!(
            stream_error(&json!({"message":"x","code":429})).kind,
            ErrorKind::RateLimited
        );
        assert_eq!(
            stream_error(&json!({"message":"x","code":"400"})).kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            stream_error(&json!({"message":"x"})).kind,
            ErrorKind::Upstream
        );
    }

    #[test]
    fn urls() {
        let base = reqwest::Url::parse("https://res.openai.azure.com/openai/").unwrap();
        let stripped = strip_trailing_segment(&base, "openai");
        let mut u = stripped.clone();
        push_segments(
            &mut u,
            &["openai", "deployments", "gpt 4o", "chat", "completions"],
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "https://res.openai.azure.com/openai/deployments/gpt%204o/chat/completions"
        );
    }
}
