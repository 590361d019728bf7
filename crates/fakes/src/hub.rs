//! A Hugging Face compatible hub on loopback, for `yakuba model pull`: serves one file at
//! `/{repo}/resolve/{revision}/{file}` the way the hub does (a 302 to storage, the LFS
//! SHA-256 in `X-Linked-Etag`, HTTP Range for resuming), and can cut the first download
//! short or require a token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::task::JoinHandle;

pub struct FakeHub {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    path: String,
    data: Vec<u8>,
    sha256: String,
    /// The first download stops after this many bytes (a dropped connection).
    cut_first_at: Mutex<Option<usize>>,
    token: Option<String>,
    /// `Range` headers seen on the storage side, in order.
    ranges: Mutex<Vec<Option<String>>>,
    /// Authorization headers seen on the storage side (must be none: the token stays with
    /// the hub).
    storage_auth: AtomicUsize,
    /// Storage lives on another host (127.0.0.2), as the hub's CDN does.
    storage: String,
}

/// A poisoned lock only means another request panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeHub {
    /// Serves `data` as `repo`/`file` at revision `main`; `sha256` is what the hub claims.
    pub async fn start(
        repo: &str,
        file: &str,
        data: Vec<u8>,
        sha256: &str,
        cut_first_at: Option<usize>,
        token: Option<&str>,
    ) -> std::io::Result<FakeHub> {
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = hub.local_addr()?;
        let storage = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
        let inner = Arc::new(Inner {
            path: format!("/{repo}/resolve/main/{file}"),
            data,
            sha256: sha256.to_string(),
            cut_first_at: Mutex::new(cut_first_at),
            token: token.map(str::to_string),
            ranges: Mutex::new(Vec::new()),
            storage_auth: AtomicUsize::new(0),
            storage: format!("http://{}/storage/blob", storage.local_addr()?),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let mut tasks = Vec::new();
        for l in [hub, storage] {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }));
        }
        Ok(FakeHub { addr, inner, tasks })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ranges(&self) -> Vec<Option<String>> {
        lock(&self.inner.ranges).clone()
    }

    pub fn token_leaked_to_storage(&self) -> bool {
        self.inner.storage_auth.load(Ordering::SeqCst) > 0
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn handle(State(s): State<Arc<Inner>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    if path == s.path {
        if let Some(t) = &s.token {
            let sent = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if sent != format!("Bearer {t}") {
                return (StatusCode::UNAUTHORIZED, "Access to model is restricted.")
                    .into_response();
            }
        }
        // The hub answers with a redirect to its storage on another host, and the LFS
        // metadata.
        return (
            StatusCode::FOUND,
            [
                (header::LOCATION.as_str(), s.storage.clone()),
                ("x-linked-etag", format!("\"{}\"", s.sha256)),
                ("x-linked-size", s.data.len().to_string()),
            ],
        )
            .into_response();
    }
    if path != "/storage/blob" {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    }
    if headers.contains_key(header::AUTHORIZATION) {
        s.storage_auth.fetch_add(1, Ordering::SeqCst);
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    lock(&s.ranges).push(range.clone());
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    if start >= s.data.len() && start > 0 {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let rest = s.data[start..].to_vec();
    let total = s.data.len();
    let cut = lock(&s.cut_first_at).take();
    let (status, content_range) = if start > 0 {
        (
            StatusCode::PARTIAL_CONTENT,
            format!("bytes {start}-{}/{total}", total - 1),
        )
    } else {
        (StatusCode::OK, String::new())
    };
    let mut headers = vec![
        (header::CONTENT_LENGTH, rest.len().to_string()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
    ];
    if !content_range.is_empty() {
        headers.push((header::CONTENT_RANGE, content_range));
    }
    let body = match cut {
        // Promise the whole length, send part of it, then fail the stream.
        Some(n) => {
            let part = rest[..n.min(rest.len())].to_vec();
            let stream = futures_util::stream::iter(vec![
                Ok::<_, std::io::Error>(axum::body::Bytes::from(part)),
                Err(std::io::Error::other("connection dropped")),
            ]);
            Body::from_stream(stream)
        }
        None => Body::from(rest),
    };
    (status, axum::response::AppendHeaders(headers), body).into_response()
}
