//! End-to-end behaviour of `llm::Client` against the fake providers: the real wire format
//! of each flavour, retries, time-outs, broken streams and cancellation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use fakes::{error_body, FakeProvider, Flavor, Script};
use llm::{
    ChatMessage, ChatRequest, Client, ErrorKind, LlmError, ProviderConfig, ProviderKind, StreamEnd,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const KEY: &str = "sk-test-0123456789abcdef";
const SYSTEM: &str = "あなたは市役所の職員を支援するアシスタントです。";

fn kind(f: Flavor) -> ProviderKind {
    match f {
        Flavor::OpenAi => ProviderKind::OpenAi,
        Flavor::Azure => ProviderKind::AzureOpenAi,
        Flavor::Anthropic => ProviderKind::Anthropic,
        Flavor::Gemini => ProviderKind::Gemini,
    }
}

fn config(fake: &FakeProvider) -> ProviderConfig {
    let mut cfg = ProviderConfig::new(kind(fake.flavor), fake.base_url.clone(), KEY);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.first_token_timeout = Duration::from_secs(5);
    cfg.idle_timeout = Duration::from_secs(5);
    cfg
}

fn client(fake: &FakeProvider) -> Client {
    Client::new(config(fake)).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "test-model".into(),
        system: Some(SYSTEM.into()),
        messages: vec![
            ChatMessage::user("住民票の写しはどこで取れますか？"),
            ChatMessage::assistant("市民課の窓口で取得できます。"),
            ChatMessage::user("必要なものは？"),
        ],
        max_tokens: Some(256),
        temperature: Some(0.2),
    }
}

struct Run {
    result: Result<StreamEnd, LlmError>,
    deltas: Vec<String>,
    elapsed: Duration,
}

async fn run(client: &Client, req: &ChatRequest) -> Run {
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(d) = rx.recv().await {
            v.push(d);
        }
        v
    });
    let start = Instant::now();
    let result = client.stream(req, tx).await;
    let elapsed = start.elapsed();
    Run {
        result,
        deltas: collector.await.unwrap(),
        elapsed,
    }
}

fn expect_err(run: &Run, kind: ErrorKind) -> &LlmError {
    match &run.result {
        Err(e) => {
            assert_eq!(e.kind, kind, "unexpected error: {e}");
            e
        }
        Ok(end) => panic!("expected {kind}, got success {end:?} with {:?}", run.deltas),
    }
}

async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "{what} not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn expected_finish(f: Flavor) -> &'static str {
    match f {
        Flavor::OpenAi | Flavor::Azure => "stop",
        Flavor::Anthropic => "end_turn",
        Flavor::Gemini => "STOP",
    }
}

fn chunks(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The request is in the provider's real shape: endpoint, auth header, system prompt
/// placement, roles and generation parameters.
fn assert_real_format(f: Flavor, r: &fakes::RecordedRequest) {
    assert_eq!(r.method, "POST");
    let b = &r.body;
    let openai_messages = json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "住民票の写しはどこで取れますか？"},
        {"role": "assistant", "content": "市民課の窓口で取得できます。"},
        {"role": "user", "content": "必要なものは？"},
    ]);
    match f {
        Flavor::OpenAi => {
            assert_eq!(r.path, "/v1/chat/completions");
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {KEY}").as_str())
            );
            assert_eq!(r.header("api-key"), None);
            assert_eq!(b["model"], "test-model");
            assert_eq!(b["messages"], openai_messages);
            assert_eq!(b["stream"], true);
            assert_eq!(b["stream_options"], json!({"include_usage": true}));
            assert_eq!(b["max_tokens"], 256);
            assert_eq!(
                b["temperature"].as_f64().map(|t| (t * 100.0).round()),
                Some(20.0)
            );
        }
        Flavor::Azure => {
            assert_eq!(
                r.path,
                "/openai/deployments/test-model/chat/completions?api-version=2024-10-21"
            );
            assert_eq!(r.header("api-key"), Some(KEY));
            assert_eq!(r.header("authorization"), None);
            assert_eq!(b["messages"], openai_messages);
            assert_eq!(b["stream"], true);
            assert_eq!(b["stream_options"], json!({"include_usage": true}));
            assert_eq!(b["max_completion_tokens"], 256);
        }
        Flavor::Anthropic => {
            assert_eq!(r.path, "/v1/messages");
            assert_eq!(r.header("x-api-key"), Some(KEY));
            assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
            assert_eq!(r.header("authorization"), None);
            assert_eq!(b["model"], "test-model");
            assert_eq!(b["system"], SYSTEM);
            assert_eq!(b["max_tokens"], 256);
            assert_eq!(b["stream"], true);
            assert_eq!(
                b["messages"],
                json!([
                    {"role": "user", "content": "住民票の写しはどこで取れますか？"},
                    {"role": "assistant", "content": "市民課の窓口で取得できます。"},
                    {"role": "user", "content": "必要なものは？"},
                ])
            );
        }
        Flavor::Gemini => {
            assert_eq!(
                r.path,
                "/v1beta/models/test-model:streamGenerateContent?alt=sse"
            );
            assert_eq!(r.header("x-goog-api-key"), Some(KEY));
            assert_eq!(r.header("authorization"), None);
            assert_eq!(b["systemInstruction"], json!({"parts": [{"text": SYSTEM}]}));
            assert_eq!(
                b["contents"],
                json!([
                    {"role": "user", "parts": [{"text": "住民票の写しはどこで取れますか？"}]},
                    {"role": "model", "parts": [{"text": "市民課の窓口で取得できます。"}]},
                    {"role": "user", "parts": [{"text": "必要なものは？"}]},
                ])
            );
            assert_eq!(b["generationConfig"]["maxOutputTokens"], 256);
            assert!(b["generationConfig"]["temperature"].is_number());
            assert_eq!(b.get("model"), None);
        }
    }
}

// ---- scenarios run for every flavour ----

async fn normal_answer(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    let r = run(&client(&fake), &request()).await;
    let end = r.result.unwrap();
    assert_eq!(r.deltas, ["こんにちは", "。"]);
    assert_eq!(end.finish_reason.as_deref(), Some(expected_finish(f)));
    assert_eq!(end.input_tokens, Some(12));
    assert_eq!(end.output_tokens, Some(2));
    assert!(!end.hit_max_tokens());
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_real_format(f, &reqs[0]);
    // The fake counts a stream closed once its handler has unwound, a moment after the
    // client read the end (on a loaded machine, not always before the next line).
    wait_until("stream closed", Duration::from_secs(1), || {
        fake.open_streams() == 0
    })
    .await;
    fake.stop().await;
}

async fn server_error_then_success(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::status(500));
    let r = run(&client(&fake), &request()).await;
    r.result.unwrap();
    assert_eq!(r.deltas, ["こんにちは", "。"], "the answer arrives once");
    assert_eq!(fake.requests().len(), 2);
    fake.stop().await;
}

async fn rate_limited_honours_retry_after(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::Status {
        code: 429,
        retry_after: Some(1),
        body: String::new(),
    });
    let r = run(&client(&fake), &request()).await;
    r.result.unwrap();
    assert_eq!(r.deltas, ["こんにちは", "。"]);
    assert_eq!(fake.requests().len(), 2);
    // The default first back-off is 250 ms; waiting about a second shows Retry-After won.
    assert!(r.elapsed >= Duration::from_millis(950), "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    fake.stop().await;
}

async fn unauthorized_is_auth_error(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    // Some providers repeat the key they were given; it must not reach our error.
    let message = format!("Incorrect API key provided: {KEY}");
    fake.push(Script::Status {
        code: 401,
        retry_after: None,
        body: error_body(f, 401, &message),
    });
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::Auth);
    assert_eq!(e.status, Some(401));
    assert_eq!(e.code(), "auth");
    assert!(
        e.detail.contains("Incorrect API key provided"),
        "{}",
        e.detail
    );
    assert!(!e.detail.contains(KEY), "{}", e.detail);
    assert!(!e.to_string().contains(KEY));
    assert!(!format!("{e:?}").contains(KEY));
    assert_eq!(
        e.message_ja(),
        "AIサービスの認証に失敗しました。管理者にAPIキーの設定を確認するよう依頼してください。"
    );
    assert!(!e.retryable());
    assert!(r.deltas.is_empty());
    assert_eq!(fake.requests().len(), 1, "401 is not retried");
    fake.stop().await;
}

async fn hang_is_first_token_timeout(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::Hang);
    let mut cfg = config(&fake);
    cfg.first_token_timeout = Duration::from_millis(300);
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let e = expect_err(&r, ErrorKind::FirstTokenTimeout);
    assert!(e.retryable());
    assert!(r.elapsed >= Duration::from_millis(290), "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(2), "{:?}", r.elapsed);
    assert_eq!(
        fake.requests().len(),
        1,
        "a time-out after sending is not retried"
    );
    wait_until("hung response closed", Duration::from_secs(1), || {
        fake.open_streams() == 0
    })
    .await;
    fake.stop().await;
}

async fn cut_stream_is_bad_response(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::CutAfter {
        chunks: chunks(&["前半", "の途中"]),
    });
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::BadResponse);
    assert!(e.detail.contains("cut"), "{}", e.detail);
    assert_eq!(
        r.deltas,
        ["前半", "の途中"],
        "text before the cut was delivered"
    );
    fake.stop().await;
}

async fn no_retry_after_first_delta(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::CutAfter {
        chunks: chunks(&["途中まで"]),
    });
    fake.push(Script::answer(["別の", "回答"], 0));
    let r = run(&client(&fake), &request()).await;
    expect_err(&r, ErrorKind::BadResponse);
    assert_eq!(r.deltas, ["途中まで"], "nothing is appended by a retry");
    assert_eq!(fake.requests().len(), 1);
    fake.stop().await;
}

async fn slow_drip_within_idle_timeout(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::answer(["一", "二", "三", "四"], 150));
    let mut cfg = config(&fake);
    cfg.idle_timeout = Duration::from_millis(600);
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let end = r.result.unwrap();
    assert_eq!(r.deltas, ["一", "二", "三", "四"]);
    assert_eq!(end.output_tokens, Some(4));
    assert!(r.elapsed >= Duration::from_millis(440), "{:?}", r.elapsed);
    fake.stop().await;
}

async fn gap_longer_than_idle_timeout(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::answer(["一", "二"], 1500));
    let mut cfg = config(&fake);
    cfg.idle_timeout = Duration::from_millis(300);
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    expect_err(&r, ErrorKind::IdleTimeout);
    assert_eq!(r.deltas, ["一"]);
    assert!(r.elapsed < Duration::from_millis(1200), "{:?}", r.elapsed);
    assert_eq!(fake.requests().len(), 1);
    wait_until("idle response closed", Duration::from_secs(1), || {
        fake.open_streams() == 0
    })
    .await;
    fake.stop().await;
}

async fn huge_chunk_is_bad_response(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    let size = 10 * 1024 * 1024;
    fake.push(Script::HugeChunk { bytes: size });
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::BadResponse);
    assert!(e.detail.contains("larger than"), "{}", e.detail);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    assert_eq!(fake.requests().len(), 1);
    wait_until("huge response closed", Duration::from_secs(2), || {
        fake.open_streams() == 0
    })
    .await;
    fake.stop().await;
}

async fn invalid_json_is_bad_response(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::InvalidJson);
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::BadResponse);
    assert!(e.detail.contains("invalid JSON"), "{}", e.detail);
    assert!(r.deltas.is_empty());
    fake.stop().await;
}

async fn dropping_receiver_cancels_endless_stream(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::Endless { delay_ms: 50 });
    let c = client(&fake);
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(async move { c.stream(&request(), tx).await });
    assert_eq!(rx.recv().await.as_deref(), Some("x"));
    assert_eq!(rx.recv().await.as_deref(), Some("x"));
    assert_eq!(fake.open_streams(), 1);
    drop(rx);
    let res = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("stream did not return within 1 s of the cancellation")
        .unwrap();
    assert_eq!(res.unwrap_err().kind, ErrorKind::Cancelled);
    wait_until("upstream closed", Duration::from_secs(1), || {
        fake.open_streams() == 0
    })
    .await;
    let sent = fake.deltas_sent();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(fake.deltas_sent(), sent, "the fake stopped writing");
    assert_eq!(fake.requests().len(), 1);
    fake.stop().await;
}

async fn dropping_receiver_cancels_while_upstream_is_silent(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    fake.push(Script::Hang);
    let c = client(&fake);
    let (tx, rx) = mpsc::channel::<String>(8);
    let task = tokio::spawn(async move { c.stream(&request(), tx).await });
    wait_until("request arrived", Duration::from_secs(2), || {
        fake.open_streams() == 1
    })
    .await;
    drop(rx);
    let res = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("stream did not return within 1 s of the cancellation")
        .unwrap();
    assert_eq!(res.unwrap_err().kind, ErrorKind::Cancelled);
    wait_until("upstream closed", Duration::from_secs(1), || {
        fake.open_streams() == 0
    })
    .await;
    fake.stop().await;
}

async fn test_connection_works_and_reports_not_found(f: Flavor) {
    let fake = FakeProvider::start(f).await;
    let c = client(&fake);
    c.test_connection("test-model").await.unwrap();
    let body = &fake.requests()[0].body;
    let limit = match f {
        Flavor::OpenAi => body["max_tokens"].clone(),
        Flavor::Azure => body["max_completion_tokens"].clone(),
        Flavor::Anthropic => body["max_tokens"].clone(),
        Flavor::Gemini => body["generationConfig"]["maxOutputTokens"].clone(),
    };
    assert_eq!(limit, json!(8));
    assert!(body.to_string().contains("ping"));

    fake.push(Script::status(404));
    let e = c.test_connection("missing-model").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.detail.contains("model not found"), "{}", e.detail);
    assert!(!e.retryable());
    fake.stop().await;
}

macro_rules! flavor_tests {
    ($flavor:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test($flavor).await
            }
        )*
    };
}

macro_rules! all_scenarios {
    ($flavor:expr) => {
        flavor_tests!($flavor;
            normal_answer,
            server_error_then_success,
            rate_limited_honours_retry_after,
            unauthorized_is_auth_error,
            hang_is_first_token_timeout,
            cut_stream_is_bad_response,
            no_retry_after_first_delta,
            slow_drip_within_idle_timeout,
            gap_longer_than_idle_timeout,
            huge_chunk_is_bad_response,
            invalid_json_is_bad_response,
            dropping_receiver_cancels_endless_stream,
            dropping_receiver_cancels_while_upstream_is_silent,
            test_connection_works_and_reports_not_found,
        );
    };
}

mod openai {
    all_scenarios!(fakes::Flavor::OpenAi);
}
mod azure {
    all_scenarios!(fakes::Flavor::Azure);
}
mod anthropic {
    all_scenarios!(fakes::Flavor::Anthropic);
}
mod gemini {
    all_scenarios!(fakes::Flavor::Gemini);
}

// ---- single-flavour cases ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_after_max_retries() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    fake.set_default(Script::status(503));
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::Upstream);
    assert_eq!(e.status, Some(503));
    assert!(e.retryable());
    assert_eq!(
        fake.requests().len(),
        3,
        "one attempt and max_retries = 2 retries"
    );
    // 250 ms then 500 ms of back-off.
    assert!(r.elapsed >= Duration::from_millis(700), "{:?}", r.elapsed);
    fake.stop().await;
}

/// The parser's unit test shows the client never buffers more than 1 MiB of a line; this
/// shows it also stops reading: of a 256 MB line only the first MiB plus what fits in the
/// kernel's socket buffers (a few MB) ever leaves the fake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_line_is_abandoned_not_read_to_the_end() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    fake.push(Script::HugeChunk {
        bytes: 256 * 1024 * 1024,
    });
    let r = run(&client(&fake), &request()).await;
    expect_err(&r, ErrorKind::BadResponse);
    wait_until("huge response closed", Duration::from_secs(2), || {
        fake.open_streams() == 0
    })
    .await;
    assert!(
        fake.bytes_sent() < 64 * 1024 * 1024,
        "sent {}",
        fake.bytes_sent()
    );
    fake.stop().await;
}

/// With a proxy set, the request goes to the proxy (here the fake, which accepts the
/// absolute-form request line) even though the provider host does not resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_carries_the_traffic() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    let mut cfg = ProviderConfig::new(ProviderKind::OpenAi, "http://llm.example.invalid/v1", KEY);
    cfg.proxy = Some(fake.addr.to_string());
    cfg.max_retries = 0;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    r.result.unwrap();
    assert_eq!(r.deltas, ["こんにちは", "。"]);
    assert_eq!(
        fake.requests()[0].header("host"),
        Some("llm.example.invalid")
    );
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_is_not_retried() {
    let fake = FakeProvider::start(Flavor::Anthropic).await;
    fake.push(Script::Status {
        code: 400,
        retry_after: None,
        body: error_body(
            Flavor::Anthropic,
            400,
            "prompt is too long: 210000 tokens > 200000 maximum",
        ),
    });
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::BadRequest);
    assert!(e.detail.contains("prompt is too long"), "{}", e.detail);
    assert_eq!(fake.requests().len(), 1);
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_during_back_off_is_prompt() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    fake.set_default(Script::Status {
        code: 429,
        retry_after: Some(5),
        body: String::new(),
    });
    let c = client(&fake);
    let (tx, rx) = mpsc::channel::<String>(8);
    let task = tokio::spawn(async move { c.stream(&request(), tx).await });
    wait_until("first attempt", Duration::from_secs(2), || {
        fake.requests().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(rx);
    let res = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err().kind, ErrorKind::Cancelled);
    assert_eq!(fake.requests().len(), 1);
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_is_rejected_by_the_fake_as_auth() {
    let fake = FakeProvider::start(Flavor::Gemini).await;
    let mut cfg = config(&fake);
    cfg.api_key = String::new();
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let e = expect_err(&r, ErrorKind::Auth);
    assert!(e.detail.contains("API Key"), "{}", e.detail);
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut cfg = ProviderConfig::new(ProviderKind::OpenAi, format!("http://{addr}/v1"), KEY);
    cfg.max_retries = 1;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let e = expect_err(&r, ErrorKind::Connect);
    assert!(e.retryable());
    assert!(
        !e.detail.contains(&addr.to_string()),
        "no URL in the detail: {}",
        e.detail
    );
    // One back-off of 250 ms shows the connect failure was retried.
    assert!(r.elapsed >= Duration::from_millis(240), "{:?}", r.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_error_event_before_text_is_retried_then_reported() {
    let fake = FakeProvider::start(Flavor::Anthropic).await;
    let overloaded = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    fake.set_default(Script::Raw {
        body: overloaded.into(),
    });
    let mut cfg = config(&fake);
    cfg.max_retries = 1;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let e = expect_err(&r, ErrorKind::Upstream);
    assert!(
        e.detail.contains("overloaded_error: Overloaded"),
        "{}",
        e.detail
    );
    assert_eq!(fake.requests().len(), 2);

    let rate = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n";
    fake.set_default(Script::Raw { body: rate.into() });
    let mut cfg = config(&fake);
    cfg.max_retries = 0;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    expect_err(&r, ErrorKind::RateLimited);
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_default_max_tokens_and_empty_messages() {
    let fake = FakeProvider::start(Flavor::Anthropic).await;
    let mut req = request();
    req.max_tokens = None;
    req.system = None;
    req.messages.insert(1, ChatMessage::assistant(""));
    run(&client(&fake), &req).await.result.unwrap();
    let body = &fake.requests()[0].body;
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body.get("system"), None);
    assert_eq!(
        body["messages"].as_array().unwrap().len(),
        3,
        "empty text is not sent"
    );
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_in_stream_error_and_length_finish() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    let err = "data: {\"error\":{\"message\":\"This model's maximum context length is 8192 tokens\",\"type\":\"BadRequestError\",\"code\":400}}\n\n";
    fake.push(Script::Raw { body: err.into() });
    let r = run(&client(&fake), &request()).await;
    let e = expect_err(&r, ErrorKind::BadRequest);
    assert!(e.detail.contains("maximum context length"), "{}", e.detail);

    let length = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"途中\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}],\"usage\":null}\n\n",
        ": comment lines are ignored\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n",
        "data: [DONE]\n\n",
    );
    fake.push(Script::Raw {
        body: length.into(),
    });
    let r = run(&client(&fake), &request()).await;
    let end = r.result.unwrap();
    assert!(end.hit_max_tokens());
    assert_eq!(end.input_tokens, Some(5));
    assert_eq!(r.deltas, ["途中"]);
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_skips_thoughts_and_reports_blocked_prompt() {
    let fake = FakeProvider::start(Flavor::Gemini).await;
    let body = concat!(
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"考え中\",\"thought\":true},{\"text\":\"答え\"}],\"role\":\"model\"}}]}\r\n\r\n",
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"です\"}],\"role\":\"model\"},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2}}\r\n\r\n",
    );
    fake.push(Script::Raw { body: body.into() });
    let r = run(&client(&fake), &request()).await;
    let end = r.result.unwrap();
    assert_eq!(r.deltas, ["答え", "です"]);
    assert_eq!(end.output_tokens, Some(2));

    let blocked = "data: {\"promptFeedback\":{\"blockReason\":\"SAFETY\"},\"usageMetadata\":{\"promptTokenCount\":3}}\r\n\r\n";
    fake.push(Script::Raw {
        body: blocked.into(),
    });
    let r = run(&client(&fake), &request()).await;
    assert_eq!(r.result.unwrap().finish_reason.as_deref(), Some("SAFETY"));
    assert!(r.deltas.is_empty());
    fake.stop().await;
}

#[test]
fn provider_config_debug_does_not_contain_the_key() {
    let cfg = ProviderConfig::new(ProviderKind::Anthropic, "https://api.anthropic.com", KEY);
    assert!(!format!("{cfg:?}").contains(KEY));
    assert!(!format!("{cfg:#?}").contains(KEY));
    let client = Client::new(cfg).unwrap();
    assert!(!format!("{client:?}").contains(KEY));
}

#[test]
fn error_json_of_the_fakes_is_parseable() {
    for f in [
        Flavor::OpenAi,
        Flavor::Azure,
        Flavor::Anthropic,
        Flavor::Gemini,
    ] {
        let v: Value = serde_json::from_str(&error_body(f, 429, "busy")).unwrap();
        assert!(v.to_string().contains("busy"));
    }
}

/// With internal addresses blocked, a name that resolves to loopback is refused when
/// connecting (so DNS rebinding cannot get round the admin-time check), a literal internal
/// address is refused at once, and redirects are never followed.
#[tokio::test]
async fn internal_targets_are_refused_at_connect_and_redirects_not_followed() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    let port = fake
        .base_url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut cfg = config(&fake);
    cfg.base_url = format!("http://localhost:{port}/v1");
    cfg.block_internal = true;
    cfg.max_retries = 0;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    let e = r.result.unwrap_err();
    assert!(e.to_string().contains("internal"), "{e}");
    assert!(
        fake.requests().is_empty(),
        "nothing reached the internal server"
    );

    let mut cfg = config(&fake);
    cfg.block_internal = true;
    let e = Client::new(cfg).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Config);

    // Allowed (a closed network's own server), it works as before.
    let r = run(&client(&fake), &request()).await;
    assert!(r.result.is_ok());

    // A redirect is an error, not a second request somewhere else.
    let before = fake.requests().len();
    fake.push(Script::Redirect {
        location: format!("{}/chat/completions", fake.base_url),
    });
    let mut cfg = config(&fake);
    cfg.max_retries = 0;
    let r = run(&Client::new(cfg).unwrap(), &request()).await;
    assert!(r.result.is_err());
    assert_eq!(
        fake.requests().len(),
        before + 1,
        "the redirect was not followed"
    );
    fake.stop().await;
}

// ------------------------------------------------------------------ embeddings

#[tokio::test]
async fn embeddings_over_openai_and_azure() {
    for f in [Flavor::OpenAi, Flavor::Azure] {
        let fake = FakeProvider::start(f).await;
        let c = client(&fake);
        let inputs = vec![
            "転居届の提出".to_string(),
            "引っ越しの手続き".to_string(),
            "予算".to_string(),
        ];
        let e = c.embed("emb-model", &inputs).await.unwrap();
        assert_eq!(e.vectors.len(), 3, "{f:?}");
        assert_eq!(
            e.vectors[0],
            fakes::toy_embedding("転居届の提出", fakes::EMBEDDING_DIMS)
        );
        assert!(e.tokens.is_some());
        let r = &fake.requests()[0];
        assert_eq!(r.body["input"], json!(inputs));
        assert_eq!(r.body["encoding_format"], "float");
        match f {
            Flavor::OpenAi => {
                assert_eq!(r.path, "/v1/embeddings");
                assert_eq!(
                    r.header("authorization"),
                    Some(format!("Bearer {KEY}").as_str())
                );
            }
            _ => {
                assert!(
                    r.path
                        .starts_with("/openai/deployments/emb-model/embeddings?api-version="),
                    "{}",
                    r.path
                );
                assert_eq!(r.header("api-key"), Some(KEY));
            }
        }
        // Nothing to embed: no request.
        assert!(c.embed("emb-model", &[]).await.unwrap().vectors.is_empty());
        assert_eq!(fake.requests().len(), 1);
    }
}

#[tokio::test]
async fn embeddings_failures_are_classified() {
    let fake = FakeProvider::start(Flavor::OpenAi).await;
    let c = client(&fake);
    let one = vec!["住民票".to_string()];
    // 503 then success: retried.
    fake.push(Script::status(503));
    assert_eq!(c.embed("m", &one).await.unwrap().vectors.len(), 1);
    // 401: not retried, classified.
    fake.push(Script::status(401));
    let before = fake.requests().len();
    assert_eq!(c.embed("m", &one).await.unwrap_err().kind, ErrorKind::Auth);
    assert_eq!(fake.requests().len(), before + 1);
    // Not JSON of the right shape.
    fake.push(Script::Status {
        code: 200,
        retry_after: None,
        body: "<html>proxy</html>".into(),
    });
    assert_eq!(
        c.embed("m", &one).await.unwrap_err().kind,
        ErrorKind::BadResponse
    );
    // Hangs: the request's deadline.
    let mut cfg = config(&fake);
    cfg.first_token_timeout = Duration::from_millis(300);
    cfg.max_retries = 0;
    fake.push(Script::Hang);
    let e = Client::new(cfg)
        .unwrap()
        .embed("m", &one)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::FirstTokenTimeout);
    // A provider without an embeddings endpoint here.
    let anthropic = FakeProvider::start(Flavor::Anthropic).await;
    assert_eq!(
        client(&anthropic).embed("m", &one).await.unwrap_err().kind,
        ErrorKind::Config
    );
}
