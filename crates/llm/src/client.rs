//! The HTTP side: one configured `reqwest` client per provider, streaming an answer with
//! time-outs, bounded retries before anything reached the user, and prompt cancellation
//! when the receiver goes away.

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::{ProviderConfig, ProviderKind};
use crate::embed::{self, Embeddings};
use crate::error::{redact, ErrorKind, LlmError};
use crate::sse::{SseEvent, SseParser, MAX_EVENT_BYTES};
use crate::types::{ChatMessage, ChatRequest, StreamEnd};
use crate::wire::{self, Decoder, Flow};
use crate::{anthropic, gemini, openai};

/// A provider may ask for a long wait; a chat user will not sit through more than this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Error bodies are only read for their message; a proxy's huge HTML page is not.
const MAX_ERROR_BODY: usize = 64 * 1024;
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for one provider configuration. Cheap to clone; build one per provider and
/// keep it (it holds the connection pool), rebuilding it when the admin changes settings.
#[derive(Clone)]
pub struct Client {
    cfg: ProviderConfig,
    base: reqwest::Url,
    headers: HeaderMap,
    http: reqwest::Client,
}

/// What the chat path hears before the first token of a local model (queue, loading).
pub use crate::local::Progress;

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Validates the configuration (base URL, proxy, key characters) and builds the
    /// HTTP client. No network traffic happens here.
    pub fn new(cfg: ProviderConfig) -> Result<Client, LlmError> {
        let base = if cfg.kind.is_local() {
            if cfg.base_url.trim().is_empty() {
                return Err(LlmError::new(
                    ErrorKind::ModelFile,
                    "ローカルモデルのファイルのパスが設定されていません",
                ));
            }
            // Unused for a local model; the path stays in the configuration.
            reqwest::Url::parse("http://localhost/")
                .map_err(|e| LlmError::new(ErrorKind::Config, e.to_string()))?
        } else {
            parse_base_url(&cfg.base_url)?
        };
        let headers = auth_headers(&cfg)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            // An API endpoint never needs a redirect; following one could lead anywhere.
            .redirect(reqwest::redirect::Policy::none())
            // Long silent streams through NAT and proxies survive with keep-alive probes.
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .user_agent(concat!("yakuba-llm/", env!("CARGO_PKG_VERSION")));
        builder = match cfg
            .proxy
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            Some(p) => {
                // Admins often write `host:port`; without a scheme it would not parse.
                let p = if p.contains("://") {
                    p.to_string()
                } else {
                    format!("http://{p}")
                };
                // The URL may hold a proxy password, so the error does not repeat it.
                let proxy = reqwest::Proxy::all(p.as_str())
                    .map_err(|_| LlmError::new(ErrorKind::Config, "the proxy URL is invalid"))?;
                builder.proxy(proxy)
            }
            None if cfg.block_internal => {
                let literal = base
                    .host_str()
                    .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                    .and_then(|h| h.parse::<std::net::IpAddr>().ok());
                if literal.is_some_and(domain::validate::is_internal_ip) {
                    return Err(LlmError::new(
                        ErrorKind::Config,
                        "the provider URL points to an internal address",
                    ));
                }
                builder
                    .no_proxy()
                    .dns_resolver(std::sync::Arc::new(PublicOnly))
            }
            None => builder.no_proxy(),
        };
        let http = builder.build().map_err(|e| {
            LlmError::new(
                ErrorKind::Config,
                format!("cannot build the HTTP client: {}", chain(&e.without_url())),
            )
        })?;
        Ok(Client {
            cfg,
            base,
            headers,
            http,
        })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    /// Streams one answer. Each text delta is sent on `tx` as it arrives. Returns when the
    /// provider ends the stream properly. If `tx` is closed (the receiver dropped: the
    /// user pressed stop or closed the tab) it returns `Err(Cancelled)` within one second
    /// even while the upstream is silent, dropping the upstream connection.
    pub async fn stream(
        &self,
        req: &ChatRequest,
        tx: mpsc::Sender<String>,
    ) -> Result<StreamEnd, LlmError> {
        self.stream_with_progress(req, tx, None).await
    }

    /// [`Client::stream`], also reporting a local model's queue position and loading on
    /// `progress` (cloud providers report nothing there).
    pub async fn stream_with_progress(
        &self,
        req: &ChatRequest,
        tx: mpsc::Sender<String>,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<StreamEnd, LlmError> {
        if self.cfg.kind.is_local() {
            let capped;
            let req = match (req.max_tokens, self.cfg.default_max_tokens) {
                (None, Some(m)) => {
                    capped = ChatRequest {
                        max_tokens: Some(m),
                        ..req.clone()
                    };
                    &capped
                }
                _ => req,
            };
            return crate::local::stream(&self.cfg.base_url, req, tx, progress).await;
        }
        let (url, body) = self.prepare(req)?;
        tracing::debug!(provider = %self.cfg.kind, model = %req.model, "LLM request");
        let mut retries = 0u32;
        loop {
            let mut sent = false;
            // Dropping the attempt future drops the response and so the connection.
            let outcome = tokio::select! {
                biased;
                () = tx.closed() => return Err(LlmError::cancelled()),
                r = self.attempt(&url, &body, &tx, &mut sent) => r,
            };
            let err = match outcome {
                Ok(end) => return Ok(end),
                Err(e) => self.scrub(e),
            };
            if sent || retries >= self.cfg.max_retries || !err.worth_automatic_retry() {
                return Err(err);
            }
            let wait = backoff(&err, retries);
            tracing::warn!(
                provider = %self.cfg.kind,
                model = %req.model,
                code = err.code(),
                status = ?err.status,
                detail = %err.detail,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "LLM request failed before any text; retrying"
            );
            tokio::select! {
                biased;
                () = tx.closed() => return Err(LlmError::cancelled()),
                () = tokio::time::sleep(wait) => {}
            }
            retries += 1;
        }
    }

    /// A minimal request ("ping", at most 8 tokens) for the admin "test connection"
    /// button. Succeeds when the provider streams a properly ended answer.
    pub async fn test_connection(&self, model: &str) -> Result<(), LlmError> {
        if self.cfg.kind.is_local() {
            return crate::local::test(&self.cfg.base_url).await;
        }
        let req = ChatRequest {
            model: model.to_string(),
            system: None,
            messages: vec![ChatMessage::user("ping")],
            max_tokens: Some(8),
            temperature: None,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let drain = async { while rx.recv().await.is_some() {} };
        let (res, ()) = tokio::join!(self.stream(&req, tx), drain);
        res.map(|_| ())
    }

    /// Embeds `inputs` (one vector each, in order) with `model` over the `/embeddings`
    /// endpoint, retrying 429/5xx/connect failures like a chat request. The whole request
    /// must finish within `first_token_timeout`.
    pub async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, LlmError> {
        if inputs.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                tokens: None,
            });
        }
        let url = embed::url(&self.base, &self.cfg, model)?;
        let body = embed::body(model, inputs);
        let mut retries = 0u32;
        loop {
            let err =
                match timeout(self.cfg.first_token_timeout, self.embed_once(&url, &body)).await {
                    Err(_) => self.first_token_timeout(),
                    Ok(Ok(bytes)) => return embed::parse(&bytes, inputs.len()),
                    Ok(Err(e)) => self.scrub(e),
                };
            if retries >= self.cfg.max_retries || !err.worth_automatic_retry() {
                return Err(err);
            }
            let wait = backoff(&err, retries);
            tracing::warn!(provider = %self.cfg.kind, model, code = err.code(), "embedding request failed; retrying");
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    async fn embed_once(&self, url: &reqwest::Url, body: &Value) -> Result<Vec<u8>, LlmError> {
        let mut headers = self.headers.clone();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let resp = self
            .http
            .post(url.clone())
            .headers(headers)
            .json(body)
            .send()
            .await
            .map_err(transport_error)?;
        let resp = error_for_status(resp).await?;
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| wire::cut(&format!("connection lost: {}", chain(&e.without_url()))))?;
            if out.len() + chunk.len() > embed::MAX_BODY {
                return Err(LlmError::new(
                    ErrorKind::BadResponse,
                    format!(
                        "the embeddings response is larger than {} bytes",
                        embed::MAX_BODY
                    ),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    fn prepare(&self, req: &ChatRequest) -> Result<(reqwest::Url, Value), LlmError> {
        Ok(match self.cfg.kind {
            ProviderKind::OpenAi | ProviderKind::AzureOpenAi => (
                openai::url(&self.base, &self.cfg, &req.model)?,
                openai::body(req, &self.cfg, &self.base),
            ),
            ProviderKind::Anthropic => (anthropic::url(&self.base)?, anthropic::body(req)),
            ProviderKind::Gemini => (gemini::url(&self.base, &req.model)?, gemini::body(req)),
            ProviderKind::Local => {
                return Err(LlmError::new(ErrorKind::Config, "a local model has no URL"))
            }
        })
    }

    async fn attempt(
        &self,
        url: &reqwest::Url,
        body: &Value,
        tx: &mpsc::Sender<String>,
        sent: &mut bool,
    ) -> Result<StreamEnd, LlmError> {
        let now = Instant::now();
        // An absurdly large setting must mean "very long", not an overflow panic.
        let first_deadline = now
            .checked_add(self.cfg.first_token_timeout)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        let request = self
            .http
            .post(url.clone())
            .headers(self.headers.clone())
            .json(body)
            .send();
        let resp = match timeout_at(first_deadline, request).await {
            Err(_) => return Err(self.first_token_timeout()),
            Ok(Err(e)) => return Err(transport_error(e)),
            Ok(Ok(r)) => r,
        };
        let resp = error_for_status(resp).await?;

        let mut body = resp.bytes_stream();
        let mut parser = SseParser::new();
        let mut decoder = Decoder::new(self.cfg.kind);
        let mut events = Vec::new();
        loop {
            // Before the first text the whole wait counts against one deadline; after it,
            // each silence is measured on its own.
            let next = if *sent {
                timeout(self.cfg.idle_timeout, body.next())
                    .await
                    .map_err(|_| self.idle_timeout())?
            } else {
                timeout_at(first_deadline, body.next())
                    .await
                    .map_err(|_| self.first_token_timeout())?
            };
            match next {
                Some(Ok(chunk)) => {
                    let pushed = parser.push(&chunk, &mut events);
                    if let Some(end) = deliver(&mut decoder, &mut events, tx, sent).await? {
                        return Ok(end);
                    }
                    pushed.map_err(|_| too_large())?;
                }
                Some(Err(e)) => {
                    return Err(wire::cut(&format!(
                        "connection lost: {}",
                        chain(&e.without_url())
                    )));
                }
                None => {
                    let flushed = parser.finish(&mut events);
                    if let Some(end) = deliver(&mut decoder, &mut events, tx, sent).await? {
                        return Ok(end);
                    }
                    flushed.map_err(|_| too_large())?;
                    return decoder.at_eof();
                }
            }
        }
    }

    fn first_token_timeout(&self) -> LlmError {
        LlmError::new(
            ErrorKind::FirstTokenTimeout,
            format!(
                "no text within {} ms of sending the request",
                self.cfg.first_token_timeout.as_millis()
            ),
        )
    }

    fn idle_timeout(&self) -> LlmError {
        LlmError::new(
            ErrorKind::IdleTimeout,
            format!(
                "no data for {} ms in the middle of the answer",
                self.cfg.idle_timeout.as_millis()
            ),
        )
    }

    fn scrub(&self, mut e: LlmError) -> LlmError {
        e.detail = redact(&e.detail, self.cfg.api_key.trim());
        e
    }
}

/// Runs parsed events through the decoder and passes each text on at once.
async fn deliver(
    decoder: &mut Decoder,
    events: &mut Vec<SseEvent>,
    tx: &mpsc::Sender<String>,
    sent: &mut bool,
) -> Result<Option<StreamEnd>, LlmError> {
    let mut deltas = Vec::new();
    for ev in events.drain(..) {
        let flow = decoder.on_event(ev, &mut deltas)?;
        for d in deltas.drain(..) {
            tx.send(d).await.map_err(|_| LlmError::cancelled())?;
            *sent = true;
        }
        if let Flow::Done(end) = flow {
            return Ok(Some(end));
        }
    }
    Ok(None)
}

/// The provider's error for a non-2xx answer, with its `Retry-After`.
async fn error_for_status(resp: reqwest::Response) -> Result<reqwest::Response, LlmError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let body = read_error_body(resp).await;
    let mut e = wire::http_error(status.as_u16(), &body);
    e.retry_after = retry_after;
    Err(e)
}

/// How long to wait before retry number `retries + 1`: what the provider asked for, or
/// doubling from [`FIRST_BACKOFF`]; never more than [`MAX_RETRY_AFTER`].
fn backoff(err: &LlmError, retries: u32) -> Duration {
    err.retry_after
        .unwrap_or(FIRST_BACKOFF.saturating_mul(1 << retries.min(16)))
        .min(MAX_RETRY_AFTER)
}

fn too_large() -> LlmError {
    LlmError::new(
        ErrorKind::BadResponse,
        format!("a line or event of the stream is larger than {MAX_EVENT_BYTES} bytes"),
    )
}

fn parse_base_url(raw: &str) -> Result<reqwest::Url, LlmError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed)
        .map_err(|e| LlmError::new(ErrorKind::Config, format!("the base URL is invalid: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(LlmError::new(
            ErrorKind::Config,
            "the base URL must start with http:// or https:// and name a host",
        ));
    }
    Ok(url)
}

fn auth_headers(cfg: &ProviderConfig) -> Result<HeaderMap, LlmError> {
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    if cfg.kind == ProviderKind::Anthropic {
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(anthropic::API_VERSION),
        );
    }
    let key = cfg.api_key.trim();
    if key.is_empty() {
        return Ok(headers);
    }
    let (name, value) = match cfg.kind {
        ProviderKind::OpenAi => (AUTHORIZATION, format!("Bearer {key}")),
        ProviderKind::AzureOpenAi => (HeaderName::from_static("api-key"), key.to_string()),
        ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.to_string()),
        ProviderKind::Gemini => (HeaderName::from_static("x-goog-api-key"), key.to_string()),
        ProviderKind::Local => return Ok(headers),
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        LlmError::new(
            ErrorKind::Config,
            "the API key contains characters that cannot be sent",
        )
    })?;
    // Keeps the key out of HTTP-level debug output.
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(headers)
}

fn transport_error(e: reqwest::Error) -> LlmError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_builder() {
        ErrorKind::Config
    } else {
        // Refused, DNS, TLS, proxy, or the server closing before answering: all mean
        // "could not get an answer started", which is worth another attempt.
        ErrorKind::Connect
    };
    // The URL can hold a deployment name or, for some setups, a key parameter.
    LlmError::new(kind, chain(&e.without_url()))
}

/// An error and its causes on one line (the causes say what actually happened).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `Retry-After` in seconds (or Azure's `retry-after-ms`), capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let read = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let secs = read("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| read("retry-after"))?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_RETRY_AFTER.as_secs_f64()),
    ))
}

async fn read_error_body(resp: reqwest::Response) -> Vec<u8> {
    let mut body = resp.bytes_stream();
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(chunk)) = body.next().await {
            let room = MAX_ERROR_BODY.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    // A slow error body is not worth waiting for; whatever arrived is enough.
    let _ = timeout(ERROR_BODY_TIMEOUT, read).await;
    out
}

/// Resolves names as usual but keeps only addresses outside loopback, private and
/// link-local ranges, so a provider name cannot lead yakuba into the city's own network.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !domain::validate::is_internal_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                let e = std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to internal addresses"),
                );
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("1"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(1)));
        h.insert("retry-after", HeaderValue::from_static("3600"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn bad_base_urls_are_config_errors() {
        for url in ["", "api.openai.com/v1", "ftp://x", "http://"] {
            let cfg = ProviderConfig::new(ProviderKind::OpenAi, url, "k");
            let e = Client::new(cfg).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Config, "{url}");
        }
    }

    #[test]
    fn bad_proxy_is_config_error_without_echoing_it() {
        let mut cfg = ProviderConfig::new(ProviderKind::OpenAi, "https://api.openai.com/v1", "k");
        cfg.proxy = Some("http://user:s3cret@[bad".into());
        let e = Client::new(cfg).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn proxy_without_scheme_is_accepted() {
        let mut cfg = ProviderConfig::new(ProviderKind::OpenAi, "https://api.openai.com/v1", "k");
        cfg.proxy = Some("proxy.city.local:8080".into());
        Client::new(cfg).unwrap();
    }

    #[test]
    fn key_with_newline_is_config_error_without_echoing_it() {
        let cfg = ProviderConfig::new(
            ProviderKind::Anthropic,
            "https://api.anthropic.com",
            "sk-ant-abc\ndef",
        );
        let e = Client::new(cfg).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(!e.detail.contains("sk-ant-abc"));
    }

    #[test]
    fn client_debug_hides_key() {
        let cfg = ProviderConfig::new(
            ProviderKind::Gemini,
            "https://generativelanguage.googleapis.com",
            "AIzaSecretKey123456",
        );
        let c = Client::new(cfg).unwrap();
        assert!(!format!("{c:?}").contains("AIzaSecretKey123456"));
    }

    #[test]
    fn request_urls_per_provider() {
        let req = ChatRequest {
            model: "m-1".into(),
            system: None,
            messages: vec![],
            max_tokens: None,
            temperature: None,
        };
        let cases = [
            (ProviderKind::OpenAi, "https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
            (ProviderKind::OpenAi, "http://localhost:11434/v1", "http://localhost:11434/v1/chat/completions"),
            (
                ProviderKind::AzureOpenAi,
                "https://res.openai.azure.com/openai",
                "https://res.openai.azure.com/openai/deployments/m-1/chat/completions?api-version=2024-10-21",
            ),
            (ProviderKind::Anthropic, "https://api.anthropic.com/v1", "https://api.anthropic.com/v1/messages"),
            (
                ProviderKind::Gemini,
                "https://generativelanguage.googleapis.com",
                "https://generativelanguage.googleapis.com/v1beta/models/m-1:streamGenerateContent?alt=sse",
            ),
        ];
        for (kind, base, want) in cases {
            let c = Client::new(ProviderConfig::new(kind, base, "k")).unwrap();
            assert_eq!(c.prepare(&req).unwrap().0.as_str(), want, "{kind} {base}");
        }
    }
}
