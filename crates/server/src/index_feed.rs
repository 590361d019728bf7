//! Each app node's search indexes follow the database (S17: several nodes over one
//! database). The database holds the passages and a log of what changed
//! (`kb_index_log`, written in the same transaction as the change); a node applies the
//! changes it has not applied yet to its own index — at once after its own writes, and
//! every [`POLL`] for the others'. The index is thus a cache that can always be rebuilt:
//! when a node has no record of how far it got (a new node, a lost or old index) or the
//! log no longer reaches back that far, it rebuilds the tenant's index from the passages.
//!
//! PostgreSQL hands out sequence numbers before commit, so a change may become visible
//! after a later one; each read also looks back [`WINDOW_MS`] and skips what was applied.
//! Applying is idempotent (a document's entries are made to match the database), so
//! applying twice does no harm.

use crate::app::Shared;
use search::{ChunkDoc, SearchIndex};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often a node looks for other nodes' changes.
pub const POLL: Duration = Duration::from_secs(2);
/// How far back each read looks for changes committed late.
pub const WINDOW_MS: i64 = 60_000;
/// Changes older than this are pruned from the log.
pub const KEEP_MS: i64 = 7 * 24 * 3_600_000;
const FEED_FILE: &str = "feed.json";

/// Where a node's index of one tenant stands.
#[derive(Default)]
pub struct Feed {
    /// The highest change applied.
    pub cursor: i64,
    /// Changes applied inside the look-back window: seq → at.
    seen: BTreeMap<i64, i64>,
}

/// One tenant's index on this node and how far it follows the log.
pub struct TenantIndex {
    pub ix: Arc<SearchIndex>,
    pub dir: PathBuf,
    pub feed: tokio::sync::Mutex<Feed>,
    /// Whether the index was found able to follow the log (or was rebuilt); until then
    /// nothing is applied or written to it.
    pub ready: tokio::sync::watch::Sender<bool>,
}

impl TenantIndex {
    pub fn new(ix: SearchIndex, dir: PathBuf) -> TenantIndex {
        TenantIndex {
            ix: Arc::new(ix),
            dir,
            feed: tokio::sync::Mutex::new(Feed::default()),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }

    fn was_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The feed, once the index is prepared: writing to an index that a rebuild is about
    /// to clear would lose the write.
    pub async fn prepared(&self) -> tokio::sync::MutexGuard<'_, Feed> {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        self.feed.lock().await
    }
}

/// The cursor saved beside the index; `None` when there is none (rebuild).
pub fn read_cursor(dir: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(dir.join(FEED_FILE)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("seq")?
        .as_i64()
}

/// Saves the cursor (written aside and renamed: never half a file).
pub fn write_cursor(dir: &Path, seq: i64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FEED_FILE}.partial"));
    std::fs::write(&tmp, serde_json::json!({ "seq": seq }).to_string())?;
    std::fs::rename(&tmp, dir.join(FEED_FILE))
}

/// The search text of a passage (document name, heading and text, normalised).
pub fn passage_doc(
    chunk_id: String,
    document_id: String,
    collection_id: String,
    name: &str,
    heading: Option<&str>,
    text: &str,
) -> ChunkDoc {
    ChunkDoc {
        chunk_id,
        document_id,
        collection_id,
        text: documents::chunk::search_text(&format!("{name}\n{}\n{text}", heading.unwrap_or(""))),
    }
}

/// Applies the tenant's changes this node has not applied yet. Returns how many were
/// applied. Without `wait`, returns at once if another call is applying already (it, or
/// the next round, will see them).
/// With `wait`, waits for an application already running instead.
pub async fn follow(
    state: &Shared,
    tenant_id: &str,
    t: &TenantIndex,
    wait: bool,
) -> Result<usize, String> {
    let mut feed = if wait {
        t.feed.lock().await
    } else {
        match t.feed.try_lock() {
            Ok(f) => f,
            Err(_) => return Ok(0),
        }
    };
    if !*t.ready.borrow() {
        return Ok(0);
    }
    let since = state.now() - WINDOW_MS;
    let changes = state
        .store
        .index_changes(tenant_id, feed.cursor, since)
        .await
        .map_err(|e| e.to_string())?;
    let fresh: Vec<storage::IndexChange> = changes
        .into_iter()
        .filter(|c| c.seq > feed.cursor || !feed.seen.contains_key(&c.seq))
        .collect();
    if fresh.is_empty() {
        feed.seen.retain(|_, at| *at >= since);
        return Ok(0);
    }
    let mut documents = BTreeSet::new();
    let mut vectors_only = BTreeSet::new();
    let mut collections = BTreeSet::new();
    let mut embedder = false;
    let mut disposed = false;
    for c in &fresh {
        match c.op.as_str() {
            "document" => {
                documents.insert(c.document_id.clone());
            }
            "vectors" => {
                vectors_only.insert(c.document_id.clone());
            }
            "collection" => {
                collections.insert(c.collection_id.clone());
            }
            "embedder" => embedder = true,
            // Once applied (or older than a rebuild) it must not erase what came after.
            "disposed" if c.seq > feed.cursor => disposed = true,
            "disposed" => {}
            other => tracing::warn!(op = other, "unknown index change; ignored"),
        }
    }
    if disposed {
        // The tenant's data is gone from the database: so goes this node's copy.
        crate::knowledge::forget_tenant(state, tenant_id).await;
        return Ok(fresh.len());
    }
    let mut add = Vec::new();
    let mut replace = Vec::new();
    for d in &documents {
        let (name, rows) = state
            .store
            .document_passages(tenant_id, d)
            .await
            .map_err(|e| e.to_string())?;
        // Passage ids are new at every ingestion: the same ids mean the same entries
        // (the node that ingested it indexed it before marking it ready).
        let mut want: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        want.sort_unstable();
        let (ix, doc) = (t.ix.clone(), d.clone());
        let have = tokio::task::spawn_blocking(move || ix.chunk_ids_of(&doc))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if have == want {
            continue;
        }
        replace.push(d.clone());
        add.extend(rows.into_iter().map(|(chunk, collection, heading, text)| {
            passage_doc(
                chunk,
                d.clone(),
                collection,
                &name,
                heading.as_deref(),
                &text,
            )
        }));
    }
    let ix = t.ix.clone();
    let (docs, cols) = (replace, collections.clone());
    tokio::task::spawn_blocking(move || -> Result<(), search::SearchError> {
        for c in &cols {
            ix.delete_collection(c)?;
        }
        for d in &docs {
            ix.delete_document(d)?;
        }
        ix.add(&add)?;
        ix.commit()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if embedder {
        state.vectors.drop_tenant(tenant_id);
    }
    for c in &collections {
        crate::knowledge_vectors::forget_collection(state, tenant_id, c);
    }
    for d in documents.iter().chain(&vectors_only) {
        crate::knowledge_vectors::sync_document(state, tenant_id, d).await;
    }
    let top = fresh.iter().map(|c| c.seq).max().unwrap_or(feed.cursor);
    for c in &fresh {
        feed.seen.insert(c.seq, c.at);
    }
    feed.seen.retain(|_, at| *at >= since);
    if top > feed.cursor {
        feed.cursor = top;
        let (dir, seq) = (t.dir.clone(), top);
        let _ = tokio::task::spawn_blocking(move || write_cursor(&dir, seq)).await;
    }
    Ok(fresh.len())
}

/// Follows every tenant index this node has open, every [`POLL`], and prunes the log
/// once an hour.
pub fn spawn(state: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut round: u64 = 0;
        let mut last = None;
        loop {
            tokio::time::sleep(POLL).await;
            round += 1;
            // Nothing new anywhere: nothing to read per tenant. (Rows of the look-back
            // window ageing out change the count too, which only costs one more round.)
            let sig = state
                .store
                .index_signature(state.now() - WINDOW_MS)
                .await
                .ok();
            let open = state.indexes.open();
            if sig.is_some() && sig == last && open.iter().all(|(_, t)| t.was_ready()) {
                continue;
            }
            let mut all_done = true;
            for (tenant, t) in open {
                if let Err(e) = follow(&state, &tenant, &t, false).await {
                    all_done = false;
                    tracing::warn!(tenant = %tenant, error = %e, "could not bring the search index in step");
                }
            }
            // A failed tenant is tried again next round even if nothing else changes.
            last = if all_done { sig } else { None };
            if round.is_multiple_of(1_800) {
                if let Err(e) = state.store.prune_index_log(state.now() - KEEP_MS).await {
                    tracing::warn!(error = %e, "could not prune the index log");
                }
            }
        }
    })
}
