//! Which provider to talk to and how: kind, endpoint, key, proxy, time-outs and retries.
//! The API key (and any proxy password) is a secret, so `Debug` masks them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The wire format to speak. OpenAI-compatible servers (vLLM, llama.cpp, LiteLLM, Ollama)
/// use [`ProviderKind::OpenAi`] with their own `base_url`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "azure_openai")]
    AzureOpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
    #[serde(rename = "gemini")]
    Gemini,
    /// A GGUF file run by yakuba itself; `base_url` holds the file's path.
    #[serde(rename = "local")]
    Local,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::OpenAi,
        ProviderKind::AzureOpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
        ProviderKind::Local,
    ];

    /// The stored form, identical to the serde name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::AzureOpenAi => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Local => "local",
        }
    }

    pub fn parse(s: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Name shown to admins.
    pub fn label(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OpenAI 互換",
            ProviderKind::AzureOpenAi => "Azure OpenAI",
            ProviderKind::Anthropic => "Anthropic",
            ProviderKind::Gemini => "Google Gemini",
            ProviderKind::Local => "ローカルモデル（GGUF）",
        }
    }

    /// Runs inside yakuba: data never leaves the server.
    pub fn is_local(self) -> bool {
        self == ProviderKind::Local
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Azure requires an `api-version`; this GA version supports streaming with usage.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Everything needed to reach one provider.
#[derive(Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `https://{resource}.openai.azure.com`,
    /// `https://api.anthropic.com`, `https://generativelanguage.googleapis.com`.
    pub base_url: String,
    /// Secret. Empty means "send no key" (local OpenAI-compatible servers).
    pub api_key: String,
    /// Azure `api-version` query parameter; `None` means [`DEFAULT_AZURE_API_VERSION`].
    pub api_version: Option<String>,
    /// HTTP(S) egress proxy for all traffic of this provider. `None` means a direct
    /// connection: proxy environment variables are deliberately ignored so that the admin
    /// setting is the one place that decides.
    pub proxy: Option<String>,
    pub connect_timeout: Duration,
    /// From sending the request until the first text delta.
    pub first_token_timeout: Duration,
    /// Longest silence between two network chunks after the first text delta.
    pub idle_timeout: Duration,
    /// Extra attempts on 429/5xx/connect failures, only while nothing was passed on yet.
    pub max_retries: u32,
    /// Refuse to connect to loopback, private and link-local addresses, whatever name
    /// leads there (checked when connecting, so a name that later resolves elsewhere —
    /// DNS rebinding — is caught too). Not applied through an egress proxy, which resolves
    /// names itself and is the place that decides.
    pub block_internal: bool,
    /// The longest answer in tokens when a request sets no limit (local models: a base
    /// model would otherwise write until the context is full).
    pub default_max_tokens: Option<u32>,
}

impl ProviderConfig {
    pub fn new(
        kind: ProviderKind,
        base_url: impl Into<String>,
        api_key: impl Into<String>,
    ) -> ProviderConfig {
        ProviderConfig {
            kind,
            base_url: base_url.into(),
            api_key: api_key.into(),
            api_version: None,
            proxy: None,
            connect_timeout: Duration::from_secs(10),
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_retries: 2,
            block_internal: false,
            default_max_tokens: None,
        }
    }

    pub(crate) fn azure_api_version(&self) -> &str {
        self.api_version
            .as_deref()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or(DEFAULT_AZURE_API_VERSION)
    }
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &"***")
            .field("api_version", &self.api_version)
            .field("proxy", &self.proxy.as_deref().map(mask_proxy))
            .field("connect_timeout", &self.connect_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

/// A proxy URL may carry `user:password@`; keep the host (useful when debugging egress)
/// and hide the credentials.
pub(crate) fn mask_proxy(proxy: &str) -> String {
    match reqwest::Url::parse(proxy) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                // Both setters only fail for URLs that cannot have credentials at all.
                let _ = u.set_username("***");
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => "(invalid proxy URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_key_and_proxy_password() {
        let mut cfg = ProviderConfig::new(
            ProviderKind::OpenAi,
            "https://api.openai.com/v1",
            "sk-very-secret-key-123456",
        );
        cfg.proxy = Some("http://alice:pr0xyPass@proxy.city.local:8080".into());
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("sk-very-secret-key-123456"), "{dbg}");
        assert!(!dbg.contains("pr0xyPass"), "{dbg}");
        assert!(!dbg.contains("alice"), "{dbg}");
        assert!(dbg.contains("***"));
        assert!(dbg.contains("proxy.city.local:8080"));
        let alt = format!("{cfg:#?}");
        assert!(!alt.contains("sk-very-secret-key-123456"));
    }

    #[test]
    fn defaults() {
        let cfg = ProviderConfig::new(ProviderKind::AzureOpenAi, "https://x.openai.azure.com", "k");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(10));
        assert_eq!(cfg.first_token_timeout, Duration::from_secs(60));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.max_retries, 2);
        assert_eq!(cfg.azure_api_version(), "2024-10-21");
        assert!(cfg.proxy.is_none());
    }

    #[test]
    fn kind_round_trips() {
        for k in ProviderKind::ALL {
            assert_eq!(ProviderKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ProviderKind>(&json).unwrap(), k);
            assert!(!k.label().is_empty());
        }
        assert_eq!(ProviderKind::parse("azure"), None);
        assert_eq!(ProviderKind::OpenAi.label(), "OpenAI 互換");
    }
}
