//! The one error type of this crate: what went wrong talking to a provider, classified so
//! that the server can pick a stable code, a Japanese message for staff and whether a
//! "retry" button makes sense, while the provider's own words stay available for admins.

use std::fmt;
use std::time::Duration;

/// The provider's error text is for admins and logs; 500 characters is enough to read it
/// and keeps a provider that answers with a whole HTML page out of our logs.
pub(crate) const DETAIL_MAX_CHARS: usize = 500;

/// What kind of failure happened. Each has a stable snake_case [`code`](ErrorKind::code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP/TLS/proxy connection could not be established.
    Connect,
    /// Establishing the connection took longer than `connect_timeout`.
    Timeout,
    /// No text arrived within `first_token_timeout` of sending the request.
    FirstTokenTimeout,
    /// After the first text, the provider went silent for longer than `idle_timeout`.
    IdleTimeout,
    /// HTTP 429 or a provider "rate limit" error.
    RateLimited,
    /// HTTP 401/403: wrong or missing API key, or no permission.
    Auth,
    /// HTTP 404: unknown model or Azure deployment (or a wrong base URL path).
    NotFound,
    /// HTTP 400 (and 413/422): the provider rejected the request itself.
    BadRequest,
    /// HTTP 5xx, an error event inside the stream, or any other unexpected status.
    Upstream,
    /// The answer could not be understood: invalid JSON, a stream cut before its proper
    /// end, or a line/event over 1 MiB.
    BadResponse,
    /// The receiver was dropped (the user pressed stop or left).
    Cancelled,
    /// The provider configuration is unusable (bad base URL, proxy or API key characters).
    Config,
    /// The local model's file is missing, not a GGUF, truncated, or of an unsupported
    /// architecture.
    ModelFile,
    /// The prompt does not fit in the model's context.
    ContextLength,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::FirstTokenTimeout,
        ErrorKind::IdleTimeout,
        ErrorKind::RateLimited,
        ErrorKind::Auth,
        ErrorKind::NotFound,
        ErrorKind::BadRequest,
        ErrorKind::Upstream,
        ErrorKind::BadResponse,
        ErrorKind::Cancelled,
        ErrorKind::Config,
        ErrorKind::ModelFile,
        ErrorKind::ContextLength,
    ];

    /// Stable snake_case code, safe to store in the database and send to the browser.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::FirstTokenTimeout => "first_token_timeout",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Upstream => "upstream",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Config => "config",
            ErrorKind::ModelFile => "model_file",
            ErrorKind::ContextLength => "context_length",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A failed provider call.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}{}: {}", .kind.code(), StatusSuffix(.status), .detail)]
pub struct LlmError {
    pub kind: ErrorKind,
    /// HTTP status, when the failure came with one.
    pub status: Option<u16>,
    /// The provider's own error text (or a description of the local failure), at most
    /// 500 characters, with the API key removed. For admins and logs, not for staff.
    pub detail: String,
    /// How long the provider asked us to wait (429 `Retry-After`), already capped.
    pub retry_after: Option<Duration>,
}

struct StatusSuffix<'a>(&'a Option<u16>);

impl fmt::Display for StatusSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, " (HTTP {s})"),
            None => Ok(()),
        }
    }
}

impl LlmError {
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> LlmError {
        LlmError {
            kind,
            status: None,
            detail: truncate_chars(&detail.into(), DETAIL_MAX_CHARS),
            retry_after: None,
        }
    }

    pub(crate) fn with_status(mut self, status: u16) -> LlmError {
        self.status = Some(status);
        self
    }

    pub(crate) fn cancelled() -> LlmError {
        LlmError::new(ErrorKind::Cancelled, "the receiver was dropped")
    }

    /// Stable snake_case code of the kind, e.g. `"rate_limited"`.
    pub fn code(&self) -> &'static str {
        self.kind.code()
    }

    /// Plain Japanese for staff: what happened and what to do, without provider jargon.
    pub fn message_ja(&self) -> String {
        let m = match self.kind {
            ErrorKind::Connect => "AIサービスに接続できませんでした。しばらく待ってから再度お試しください。解決しない場合は管理者にネットワーク設定の確認を依頼してください。",
            ErrorKind::Timeout => "AIサービスへの接続がタイムアウトしました。しばらく待ってから再度お試しください。",
            ErrorKind::FirstTokenTimeout => "AIサービスから時間内に応答がありませんでした。しばらく待ってから再度お試しください。",
            ErrorKind::IdleTimeout => "AIサービスからの応答が途中で止まりました。再度お試しください。",
            ErrorKind::RateLimited => "AIサービスが混み合っています。しばらく待ってから再度お試しください。",
            ErrorKind::Auth => "AIサービスの認証に失敗しました。管理者にAPIキーの設定を確認するよう依頼してください。",
            ErrorKind::NotFound => "指定されたAIモデルが見つかりません。管理者にモデル（デプロイ名）の設定を確認するよう依頼してください。",
            ErrorKind::BadRequest => "AIサービスが要求を受け付けませんでした。入力が長すぎるか、受け付けられない内容が含まれている可能性があります。内容を短くするか、新しい会話で再度お試しください。",
            ErrorKind::Upstream => "AIサービスでエラーが発生しました。しばらく待ってから再度お試しください。",
            ErrorKind::BadResponse => "AIサービスからの応答を正しく受け取れませんでした。再度お試しください。",
            ErrorKind::Cancelled => "回答の生成を中止しました。",
            ErrorKind::Config => "AIサービスの接続設定に誤りがあります。管理者に接続先URLやプロキシの設定を確認するよう依頼してください。",
            ErrorKind::ModelFile => "ローカルモデルのファイルを読み込めませんでした。管理者にモデルファイルの設定を確認するよう依頼してください。",
            ErrorKind::ContextLength => "入力がこのモデルで扱える長さを超えています。内容を短くするか、新しい会話で再度お試しください。",
        };
        m.to_string()
    }

    /// Whether offering the user a "retry" button makes sense: transient failures yes,
    /// configuration and request problems no (retrying would fail the same way).
    /// `Cancelled` is retryable because the user may simply want the answer regenerated.
    pub fn retryable(&self) -> bool {
        match self.kind {
            ErrorKind::Connect
            | ErrorKind::Timeout
            | ErrorKind::FirstTokenTimeout
            | ErrorKind::IdleTimeout
            | ErrorKind::RateLimited
            | ErrorKind::Upstream
            | ErrorKind::BadResponse
            | ErrorKind::Cancelled => true,
            ErrorKind::Auth
            | ErrorKind::NotFound
            | ErrorKind::BadRequest
            | ErrorKind::Config
            | ErrorKind::ModelFile
            | ErrorKind::ContextLength => false,
        }
    }

    /// Whether the client itself may try again before anything reached the user: only
    /// overload-type failures, never ones that would fail identically or that may have
    /// cost a long wait already (time-outs after the request was sent).
    pub(crate) fn worth_automatic_retry(&self) -> bool {
        match self.kind {
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::RateLimited => true,
            ErrorKind::Upstream => self.status.is_none_or(|s| s >= 500),
            _ => false,
        }
    }
}

/// Classifies an HTTP error status.
pub(crate) fn kind_for_status(status: u16) -> ErrorKind {
    match status {
        429 => ErrorKind::RateLimited,
        401 | 403 => ErrorKind::Auth,
        404 => ErrorKind::NotFound,
        400 | 413 | 422 => ErrorKind::BadRequest,
        _ => ErrorKind::Upstream,
    }
}

pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Removes the API key from text that came from outside (some providers echo the key, or
/// part of it, in their "invalid key" message).
pub(crate) fn redact(text: &str, secret: &str) -> String {
    // Very short keys would turn ordinary words into "***"; such keys are not real keys.
    if secret.len() < 8 {
        return text.to_string();
    }
    let mut out = text.replace(secret, "***");
    // Providers that mask the middle still show a long prefix; hide any 12+ char prefix.
    let prefix_len = secret.char_indices().nth(12).map(|(i, _)| i);
    if let Some(p) = prefix_len {
        out = out.replace(&secret[..p], "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for k in ErrorKind::ALL {
            let c = k.code();
            assert!(seen.insert(c), "duplicate code {c}");
            assert!(c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'));
        }
    }

    #[test]
    fn every_kind_has_a_japanese_message() {
        for k in ErrorKind::ALL {
            let m = LlmError::new(k, "x").message_ja();
            assert!(m.ends_with('。'), "{k}: {m}");
        }
        assert_eq!(
            LlmError::new(ErrorKind::RateLimited, "").message_ja(),
            "AIサービスが混み合っています。しばらく待ってから再度お試しください。"
        );
    }

    #[test]
    fn display_has_code_status_and_detail() {
        let e = LlmError::new(ErrorKind::Auth, "invalid x-api-key").with_status(401);
        assert_eq!(e.to_string(), "auth (HTTP 401): invalid x-api-key");
    }

    #[test]
    fn detail_is_truncated_on_char_boundary() {
        let long = "あ".repeat(600);
        let e = LlmError::new(ErrorKind::Upstream, long);
        assert_eq!(e.detail.chars().count(), DETAIL_MAX_CHARS + 1);
    }

    #[test]
    fn redact_removes_key_and_long_prefix() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz";
        assert_eq!(redact(&format!("bad key {key}"), key), "bad key ***");
        assert!(
            !redact("Incorrect API key provided: sk-proj-abcdefgh****wxyz", key)
                .contains("sk-proj-abcdefgh")
        );
        assert_eq!(redact("short", "abc"), "short");
    }

    #[test]
    fn status_classification() {
        assert_eq!(kind_for_status(429), ErrorKind::RateLimited);
        assert_eq!(kind_for_status(403), ErrorKind::Auth);
        assert_eq!(kind_for_status(404), ErrorKind::NotFound);
        assert_eq!(kind_for_status(400), ErrorKind::BadRequest);
        assert_eq!(kind_for_status(529), ErrorKind::Upstream);
        assert_eq!(kind_for_status(418), ErrorKind::Upstream);
    }
}
