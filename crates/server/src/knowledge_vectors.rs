//! Vector search for knowledge (M8), when the tenant admin has chosen an embedding model
//! (an OpenAI-compatible or Azure OpenAI `/embeddings` endpoint): passages are embedded as
//! they are ingested, questions when they are asked, and the nearest passages are fused
//! with BM25's by reciprocal rank.
//!
//! Classification (S14) is kept: passages of a collection above the embedder's class are
//! never sent to it (they are found by BM25 only), and a question over such a collection
//! is not sent either. The vectors live in the database with their passages; each
//! tenant's [`search::vectors::VectorSet`] is a cache filled from it on first use (in the
//! background — until then searches use BM25 alone) and kept in step per document.
//! With several app nodes, a node learns of another node's documents when it loads the
//! set; the scale-out search backend is where that is solved for good.

use crate::app::Shared;
use crate::error::{AppError, AppResult};
use search::vectors::{Quantized, VectorDoc, VectorSet};
use search::Hit;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Passages asked from each list before fusion.
pub const FUSION_DEPTH: usize = 20;
/// Passages per embedding request.
const BATCH: usize = 32;
/// A passage is cut to this many characters before embedding (passages are ≤ 800).
const MAX_CHARS: usize = 2_000;
/// A question waits this long for its embedding before BM25 answers alone.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

enum Slot {
    /// Being filled from the database; documents changed meanwhile are synced after.
    Loading {
        key: String,
        touched: Vec<String>,
    },
    Ready(Arc<VectorSet>),
}

/// The tenants' vector sets.
#[derive(Default)]
pub struct Vectors(Mutex<HashMap<String, Slot>>);

/// The tenant's embedding model with a client for its provider.
pub struct Embedding {
    pub embedder: storage::Embedder,
    pub client: llm::Client,
}

impl Embedding {
    /// Whether passages of this class may be sent to the model.
    pub fn may_receive(&self, classification: i64) -> bool {
        domain::policy::model_may_receive(self.embedder.max_class, classification)
    }
}

/// The tenant's embedding model, if one is set and its provider is enabled.
pub async fn embedding(state: &Shared, tenant_id: &str) -> AppResult<Option<Embedding>> {
    let Some(embedder) = state.store.kb_embedder(tenant_id).await? else {
        return Ok(None);
    };
    let p = state
        .store
        .provider(tenant_id, &embedder.provider_id)
        .await?;
    if !p.enabled {
        return Ok(None);
    }
    let client = crate::chat::client_for(state, &p)
        .map_err(|e| AppError::Internal(format!("embedding provider: {e}")))?;
    Ok(Some(Embedding { embedder, client }))
}

/// What is embedded for a passage: its document, heading and text.
pub fn passage_text(document: &str, heading: Option<&str>, text: &str) -> String {
    let t = format!("{document}\n{}\n{text}", heading.unwrap_or(""));
    t.chars().take(MAX_CHARS).collect()
}

/// Embeds `texts` in batches; one quantised vector (stored form) per text. The error is
/// for admins (the document's note and the log).
pub async fn embed_passages(e: &Embedding, texts: &[String]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::with_capacity(texts.len());
    let mut dims = None;
    for batch in texts.chunks(BATCH) {
        let r = e
            .client
            .embed(&e.embedder.model, batch)
            .await
            .map_err(|e| format!("{}（{}）", e.message_ja(), e.detail))?;
        for v in r.vectors {
            let q = Quantized::from_f32(&v).filter(|q| *dims.get_or_insert(q.dims()) == q.dims());
            match q {
                Some(q) => out.push(q.to_bytes()),
                None => {
                    return Err("埋め込みモデルの応答に、使えないベクトル（ゼロ、数値でない値、長さの違い）が含まれていました。".into())
                }
            }
        }
    }
    Ok(out)
}

fn docs_of(rows: Vec<storage::StoredVector>) -> Vec<VectorDoc> {
    rows.into_iter()
        .filter_map(|r| {
            Some(VectorDoc {
                vector: Quantized::from_bytes(&r.bytes)?,
                chunk_id: r.chunk_id,
                document_id: r.document_id,
                collection_id: r.collection_id,
            })
        })
        .collect()
}

impl Vectors {
    /// The tenant's set for `key`, or `None` while it loads (the load starts on the first
    /// call, and again after a change of model).
    fn set_for(&self, state: &Shared, tenant_id: &str, key: &str) -> Option<Arc<VectorSet>> {
        let mut map = self.0.lock().ok()?;
        match map.get(tenant_id) {
            Some(Slot::Ready(set)) if set.model == key => return Some(set.clone()),
            Some(Slot::Loading { key: k, .. }) if k == key => return None,
            _ => {}
        }
        map.insert(
            tenant_id.to_string(),
            Slot::Loading {
                key: key.to_string(),
                touched: Vec::new(),
            },
        );
        let (state, tenant, key) = (state.clone(), tenant_id.to_string(), key.to_string());
        tokio::spawn(async move { load(&state, &tenant, &key).await });
        None
    }

    /// Forgets a tenant's set (disposal).
    pub fn drop_tenant(&self, tenant_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(tenant_id);
        }
    }
}

async fn load(state: &Shared, tenant: &str, key: &str) {
    let set = Arc::new(VectorSet::new(key));
    let mut after = String::new();
    let started = std::time::Instant::now();
    loop {
        let page = match state.store.kb_vectors_page(tenant, key, &after).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(tenant = %tenant, error = %e, "could not load the knowledge vectors; BM25 only until the next try");
                if let Ok(mut m) = state.vectors.0.lock() {
                    m.remove(tenant);
                }
                return;
            }
        };
        let Some(last) = page.last().map(|r| r.chunk_id.clone()) else {
            break;
        };
        let docs = docs_of(page);
        let set2 = set.clone();
        let added = tokio::task::spawn_blocking(move || set2.add(&docs)).await;
        if !matches!(added, Ok(Ok(()))) {
            tracing::warn!(tenant = %tenant, "vectors of other dimensions left out (the embedding model changed)");
        }
        after = last;
    }
    let touched = match state.vectors.0.lock() {
        Ok(mut m) => {
            let touched = match m.get_mut(tenant) {
                Some(Slot::Loading { key: k, touched }) if k == key => std::mem::take(touched),
                // The model changed or the tenant went while loading: this set is stale.
                _ => return,
            };
            m.insert(tenant.to_string(), Slot::Ready(set.clone()));
            touched
        }
        Err(_) => return,
    };
    tracing::info!(tenant = %tenant, vectors = set.len(), ms = started.elapsed().as_millis() as u64, "knowledge vectors loaded");
    for d in touched {
        sync_document(state, tenant, &d).await;
    }
}

/// Brings the tenant's set in step with the database for one document (after it was
/// ingested, embedded again or deleted).
pub async fn sync_document(state: &Shared, tenant_id: &str, document_id: &str) {
    let set = {
        let Ok(mut m) = state.vectors.0.lock() else {
            return;
        };
        match m.get_mut(tenant_id) {
            Some(Slot::Ready(set)) => set.clone(),
            Some(Slot::Loading { touched, .. }) => {
                touched.push(document_id.to_string());
                return;
            }
            // Not loaded: it will be read from the database when first needed.
            None => return,
        }
    };
    let rows = match state
        .store
        .document_vectors(tenant_id, document_id, &set.model)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(tenant = %tenant_id, error = %e, "could not read a document's vectors; reloading them all");
            state.vectors.drop_tenant(tenant_id);
            return;
        }
    };
    let docs = docs_of(rows);
    let doc = document_id.to_string();
    let done = tokio::task::spawn_blocking(move || {
        set.delete_document(&doc)?;
        set.add(&docs)
    })
    .await;
    if !matches!(done, Ok(Ok(()))) {
        state.vectors.drop_tenant(tenant_id);
    }
}

/// Drops a deleted collection's vectors from the tenant's set.
pub fn forget_collection(state: &Shared, tenant_id: &str, collection_id: &str) {
    let Ok(mut m) = state.vectors.0.lock() else {
        return;
    };
    match m.get(tenant_id) {
        Some(Slot::Ready(set)) if set.delete_collection(collection_id).is_err() => {
            m.remove(tenant_id);
        }
        Some(Slot::Ready(_)) => {}
        // Loading: read again once this load is done.
        Some(Slot::Loading { .. }) => {
            m.remove(tenant_id);
        }
        None => {}
    }
}

/// The nearest passages to `question` in `collections`, or `None` when vectors cannot
/// help: no embedding model, a collection above its class, the set still loading, or the
/// model failing (logged; BM25 answers alone).
pub async fn search(
    state: &Shared,
    tenant_id: &str,
    question: &str,
    collections: &[storage::Collection],
) -> Option<Vec<Hit>> {
    let e = match embedding(state, tenant_id).await {
        Ok(Some(e)) => e,
        Ok(None) => return None,
        Err(err) => {
            tracing::warn!(tenant = %tenant_id, error = %err, "embedding model unavailable");
            return None;
        }
    };
    // The question belongs with the documents asked about: it is not sent to a model that
    // may not receive all of them.
    if collections.is_empty() || collections.iter().any(|c| !e.may_receive(c.classification)) {
        return None;
    }
    let set = state.vectors.set_for(state, tenant_id, &e.embedder.key())?;
    let input = [question.chars().take(MAX_CHARS).collect::<String>()];
    let v = match tokio::time::timeout(QUERY_TIMEOUT, e.client.embed(&e.embedder.model, &input))
        .await
    {
        Ok(Ok(r)) => r.vectors.into_iter().next()?,
        Ok(Err(err)) => {
            tracing::warn!(tenant = %tenant_id, code = err.code(), detail = %err.detail, "the question could not be embedded; BM25 only");
            return None;
        }
        Err(_) => {
            tracing::warn!(tenant = %tenant_id, "embedding the question timed out; BM25 only");
            return None;
        }
    };
    let ids: Vec<String> = collections.iter().map(|c| c.id.clone()).collect();
    let min = e.embedder.min_score_pct as f32 / 100.0;
    let hits = tokio::task::spawn_blocking(move || set.search(&v, &ids, FUSION_DEPTH))
        .await
        .ok()?;
    match hits {
        Ok(h) => Some(h.into_iter().filter(|h| h.score >= min).collect()),
        Err(err) => {
            tracing::warn!(tenant = %tenant_id, error = %err, "vector search failed; BM25 only");
            None
        }
    }
}

/// Makes the vectors of a document again (an `embed` job: the model was set or changed,
/// or embedding failed during ingestion).
pub async fn run_embed_job(state: &Shared, job: &storage::Job) -> Result<(), String> {
    let d = match state.store.document(&job.tenant_id, &job.target_id).await {
        Ok(d) => d,
        Err(storage::StorageError::NotFound) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let e = match embedding(state, &job.tenant_id)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(e) => e,
        // The model was removed meanwhile: nothing to make.
        None => {
            return state
                .store
                .finish_embed(job, "", &[], state.now())
                .await
                .map_err(|e| e.to_string())
        }
    };
    let c = state
        .store
        .collection(&job.tenant_id, &d.collection_id)
        .await
        .map_err(|e| e.to_string())?;
    if !e.may_receive(c.classification) {
        return state
            .store
            .finish_embed(job, &e.embedder.key(), &[], state.now())
            .await
            .map_err(|e| e.to_string());
    }
    let chunks = state
        .store
        .document_chunks(&job.tenant_id, &d.id)
        .await
        .map_err(|e| e.to_string())?;
    let texts: Vec<String> = chunks
        .iter()
        .map(|(_, h, t)| passage_text(&d.name, h.as_deref(), t))
        .collect();
    let vectors = embed_passages(&e, &texts).await?;
    let rows: Vec<(String, Vec<u8>)> = chunks.into_iter().map(|c| c.0).zip(vectors).collect();
    state
        .store
        .finish_embed(job, &e.embedder.key(), &rows, state.now())
        .await
        .map_err(|e| e.to_string())?;
    state.indexes.follow_now(state, &job.tenant_id).await;
    Ok(())
}
