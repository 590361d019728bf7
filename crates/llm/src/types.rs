//! Provider-neutral request and result types: what the server asks for and what a finished
//! stream reports. Each provider module translates these to and from its wire format.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// Model id, or the deployment name for Azure.
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Anthropic requires a limit; [`ANTHROPIC_DEFAULT_MAX_TOKENS`] is sent when `None`.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

pub const ANTHROPIC_DEFAULT_MAX_TOKENS: u32 = 4096;

/// What a finished stream reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamEnd {
    /// The provider's own value, unchanged: OpenAI/Azure `stop`, `length`,
    /// `content_filter`; Anthropic `end_turn`, `max_tokens`, `stop_sequence`, `refusal`;
    /// Gemini `STOP`, `MAX_TOKENS`, `SAFETY`, ... (or a prompt `blockReason`).
    pub finish_reason: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl StreamEnd {
    /// Whether the answer stopped because it reached the token limit, whatever the
    /// provider calls that.
    pub fn hit_max_tokens(&self) -> bool {
        matches!(
            self.finish_reason.as_deref(),
            Some("length" | "max_tokens" | "MAX_TOKENS")
        )
    }
}
