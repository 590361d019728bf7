//! Streaming benchmark, run by hand (not a test):
//!
//! ```sh
//! cargo bench -p server --bench chat_stream -- 100 1000
//! ```
//!
//! For each N, two loads, each sent through a real `yakuba serve` process (release build,
//! SQLite) from a fast fake OpenAI-compatible upstream and, for the baseline, the same load
//! sent straight to the fake:
//!
//! - **steady**: answers last `STEADY_SECS` seconds and new questions arrive at an even
//!   rate of N per `STEADY_SECS`, so about N streams are open at any moment (how 1,000
//!   members of staff actually use it). Only questions sent once N streams are open are
//!   measured.
//! - **burst**: N questions sent in the same instant (the worst case; on two cores the
//!   queue of N requests is what the first-token times show).
//!
//! Reports time to first token and the delay between chunks (p50, p99) for both, what yakuba
//! adds, yakuba's CPU seconds per stream and its peak resident memory. The client and the
//! fake share the machine with yakuba, so on two cores the added latency is an upper bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEADY_SECS: u64 = 10;
const STEADY_CHUNK_DELAY_MS: u64 = 200;
const BURST_CHUNKS: usize = 20;
const BURST_CHUNK_DELAY_MS: u64 = 20;

struct Load {
    name: &'static str,
    n: usize,
    chunks: usize,
    delay_ms: u64,
    /// When each question is sent, from the start of the load.
    starts: Vec<Duration>,
    /// Questions before this index warm the load up and are not measured.
    measure_from: usize,
}

impl Load {
    async fn run(
        &self,
        fake: &fakes::FakeProvider,
        http: &reqwest::Client,
        base: &str,
        csrf: &str,
        model_id: &str,
        pid: u32,
    ) {
        fake.set_default(fakes::Script::Answer {
            chunks: (0..self.chunks).map(|i| format!("第{i}文。")).collect(),
            delay_ms: self.delay_ms,
        });
        // Conversations first, so the measured part is the streaming.
        let mut convs = Vec::new();
        for _ in 0..self.starts.len() {
            let c: Value = http
                .post(format!("{base}/api/v1/conversations"))
                .header("x-csrf-token", csrf)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            convs.push(c["id"].as_str().unwrap().to_string());
        }

        // Straight to the fake.
        let direct = reqwest::Client::builder()
            .pool_max_idle_per_host(4000)
            .build()
            .unwrap();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for at in &self.starts {
            let direct = direct.clone();
            let url = format!("{}/chat/completions", fake.base_url);
            let at = *at;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((t0 + at).into()).await;
                let sent = Instant::now();
                let r = direct
                    .post(url)
                    .bearer_auth("k")
                    .json(&json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "計測"}]}))
                    .send()
                    .await
                    .unwrap();
                measure(r, sent, "\"content\"").await
            }));
        }
        let (mut d_ttft, mut d_gaps) = (Vec::new(), Vec::new());
        for (i, t) in tasks.into_iter().enumerate() {
            let (ttft, gaps, _) = t.await.unwrap();
            if i >= self.measure_from {
                d_ttft.push(ttft);
                d_gaps.extend(gaps);
            }
        }

        // Through yakuba.
        let cpu0 = proc_cpu_seconds(pid);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (conv, at) in convs.iter().zip(&self.starts) {
            let http = http.clone();
            let url = format!("{base}/api/v1/conversations/{conv}/messages");
            let csrf = csrf.to_string();
            let model_id = model_id.to_string();
            let at = *at;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((t0 + at).into()).await;
                let sent = Instant::now();
                let r = http
                    .post(url)
                    .header("x-csrf-token", csrf)
                    .json(&json!({"content": "計測", "model_id": model_id}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let (ttft, gaps, count) = measure(r, sent, "event: delta").await;
                (status, ttft, gaps, count)
            }));
        }
        let (mut y_ttft, mut y_gaps, mut failed) = (Vec::new(), Vec::new(), 0);
        for (i, t) in tasks.into_iter().enumerate() {
            let (status, ttft, gaps, count) = t.await.unwrap();
            if !status.is_success() || count < self.chunks {
                failed += 1;
                continue;
            }
            if i >= self.measure_from {
                y_ttft.push(ttft);
                y_gaps.extend(gaps);
            }
        }
        let wall_s = t0.elapsed().as_secs_f64();
        let cpu = proc_cpu_seconds(pid) - cpu0;
        let streams = self.starts.len();
        let (dt50, dt99) = (pct(&mut d_ttft, 0.5), pct(&mut d_ttft, 0.99));
        let (yt50, yt99) = (pct(&mut y_ttft, 0.5), pct(&mut y_ttft, 0.99));
        let (dg50, dg99) = (pct(&mut d_gaps, 0.5), pct(&mut d_gaps, 0.99));
        let (yg50, yg99) = (pct(&mut y_gaps, 0.5), pct(&mut y_gaps, 0.99));
        println!(
            "{} N = {} concurrent streams: {} answers of {} chunks every {} ms, {} measured ({failed} failed or incomplete; wall {wall_s:.2} s)",
            self.name, self.n, streams, self.chunks, self.delay_ms, y_ttft.len()
        );
        println!("  time to first token   direct p50 {dt50:7.2} ms  p99 {dt99:7.2} ms | yakuba p50 {yt50:7.2} ms  p99 {yt99:7.2} ms | added p50 {:7.2} ms  p99 {:7.2} ms", yt50 - dt50, yt99 - dt99);
        println!("  delay between chunks  direct p50 {dg50:7.2} ms  p99 {dg99:7.2} ms | yakuba p50 {yg50:7.2} ms  p99 {yg99:7.2} ms | added p50 {:7.2} ms  p99 {:7.2} ms", yg50 - dg50, yg99 - dg99);
        println!(
            "  yakuba CPU {cpu:.2} s in total, {:.2} ms per stream; peak RSS {:.1} MB",
            cpu * 1000.0 / streams as f64,
            proc_peak_rss_mb(pid)
        );
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn proc_peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Reads an SSE body; returns (time to first text, gaps between text chunks), in ms.
async fn measure(
    mut r: reqwest::Response,
    started: Instant,
    marker: &str,
) -> (f64, Vec<f64>, usize) {
    let mut first = None;
    let mut last = None;
    let mut gaps = Vec::new();
    let mut count = 0;
    while let Ok(Some(chunk)) = r.chunk().await {
        let text = String::from_utf8_lossy(&chunk);
        let n = text.matches(marker).count();
        if n == 0 {
            continue;
        }
        let now = Instant::now();
        count += n;
        if first.is_none() {
            first = Some(now.duration_since(started).as_secs_f64() * 1000.0);
        }
        if let Some(prev) = last {
            gaps.push(now.duration_since(prev).as_secs_f64() * 1000.0);
        }
        last = Some(now);
    }
    (first.unwrap_or(f64::NAN), gaps, count)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![100, 1000] } else { ns };
    let fake = fakes::FakeProvider::start(fakes::Flavor::OpenAi).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_yakuba");
    let envs = [
        ("YAKUBA_SECURITY__PASSWORD_HASH_MEMORY_KIB", "1024"),
        ("YAKUBA_SECURITY__PASSWORD_HASH_ITERATIONS", "1"),
        ("YAKUBA_LLM__ALLOW_INTERNAL_PROVIDER_URLS", "true"),
        ("YAKUBA_LOG", "warn"),
    ];
    let out = Command::new(bin)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "admin",
            "create-user",
            "--login-id",
            "bench.admin",
            "--name",
            "計測",
            "--department",
            "総務部",
            "--role",
            "tenant-admin",
        ])
        .envs(envs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let temp = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("仮パスワード: "))
        .unwrap()
        .to_string();
    let port = 30000 + (std::process::id() % 20000) as u16;
    let mut child = Command::new(bin)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .envs(envs)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap();
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login: Value = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"login_id": "bench.admin", "password": temp}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csrf = login["csrf_token"].as_str().unwrap().to_string();
    let new_pw = "bench-sakura-momiji-2026";
    http.post(format!("{base}/api/v1/auth/password"))
        .header("x-csrf-token", &csrf)
        .json(&json!({"current_password": temp, "new_password": new_pw}))
        .send()
        .await
        .unwrap();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .header("x-csrf-token", &csrf)
            .json(&body)
            .send()
    };
    let p: Value = post("/api/v1/admin/providers", json!({"name": "fake", "kind": "openai", "base_url": fake.base_url, "api_key": "k", "region": "loopback", "no_training": true})).await.unwrap().json().await.unwrap();
    let m: Value = post(
        "/api/v1/admin/models",
        json!({"provider_id": p["id"], "model": "fast", "display_name": "fast"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let model_id = m["id"].as_str().unwrap().to_string();

    for n in ns {
        // Steady: about n streams open at any moment.
        let chunks = (STEADY_SECS * 1000 / STEADY_CHUNK_DELAY_MS) as usize;
        let spacing = Duration::from_secs(STEADY_SECS) / n as u32;
        let total = 2 * n;
        let starts: Vec<Duration> = (0..total).map(|i| spacing * i as u32).collect();
        let load = Load {
            name: "steady",
            n,
            chunks,
            delay_ms: STEADY_CHUNK_DELAY_MS,
            starts,
            measure_from: n,
        };
        load.run(&fake, &http, &base, &csrf, &model_id, pid).await;
        // Burst: n questions in the same instant.
        let load = Load {
            name: "burst",
            n,
            chunks: BURST_CHUNKS,
            delay_ms: BURST_CHUNK_DELAY_MS,
            starts: vec![Duration::ZERO; n],
            measure_from: 0,
        };
        load.run(&fake, &http, &base, &csrf, &model_id, pid).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    fake.stop().await;
}
