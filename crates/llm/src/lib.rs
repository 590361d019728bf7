//! LLM provider adapters: one [`Client`] per configured provider streams a chat answer as
//! text deltas over a channel, speaking the real wire format of OpenAI (and compatible
//! servers), Azure OpenAI, Anthropic or Google Gemini, with time-outs, bounded retries,
//! cancellation and errors classified for staff-facing messages.

mod anthropic;
mod client;
mod config;
mod embed;
mod error;
mod gemini;
pub mod local;
mod openai;
mod sse;
mod types;
mod wire;

pub use client::{Client, Progress};
pub use config::{ProviderConfig, ProviderKind, DEFAULT_AZURE_API_VERSION};
pub use embed::Embeddings;
pub use error::{ErrorKind, LlmError};
pub use types::{ChatMessage, ChatRequest, Role, StreamEnd, ANTHROPIC_DEFAULT_MAX_TOKENS};
