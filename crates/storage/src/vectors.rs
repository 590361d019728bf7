//! Vector search data (M8, S14): the tenant's embedding model for knowledge and the
//! passages' vectors. Vectors are written with their passages (in `finish_ingest`) or,
//! when the model is set or changed, by `embed` jobs that replace a document's vectors at
//! once; they go with their passages (`ON DELETE CASCADE`).

use base64::Engine as _;

use crate::audit::{append, AuditEvent};
use crate::{get_i64, get_str, Result, StorageError, Store};

/// The embedding model a tenant's knowledge search uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Embedder {
    pub provider_id: String,
    /// The provider's model id (or Azure deployment name).
    pub model: String,
    /// Collections above this class (機密性) are never sent to it.
    pub max_class: i64,
    /// A passage found by its vector alone must be at least this similar (cosine × 100)
    /// to be used: nearest neighbours always exist, relevant ones not.
    pub min_score_pct: i64,
    pub updated_at: i64,
}

impl Embedder {
    /// What vectors made by this model are tagged with.
    pub fn key(&self) -> String {
        format!("{}/{}", self.provider_id, self.model)
    }
}

/// A passage's stored vector.
#[derive(Clone, Debug)]
pub struct StoredVector {
    pub chunk_id: String,
    pub document_id: String,
    pub collection_id: String,
    pub bytes: Vec<u8>,
}

pub(crate) fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode(s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| StorageError::Corrupt(format!("kb_vectors: {e}")))
}

fn stored(r: &sqlx::any::AnyRow) -> Result<StoredVector> {
    Ok(StoredVector {
        chunk_id: get_str(r, "chunk_id")?,
        document_id: get_str(r, "document_id")?,
        collection_id: get_str(r, "collection_id")?,
        bytes: decode(&get_str(r, "vector")?)?,
    })
}

/// Rows read per query when loading a tenant's vectors (a million would not fit at once).
const PAGE: i64 = 5_000;

impl Store {
    pub async fn kb_embedder(&self, tenant_id: &str) -> Result<Option<Embedder>> {
        let r = sqlx::query(
            "SELECT provider_id, model, max_class, min_score_pct, updated_at FROM kb_embedders WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok(Embedder {
                provider_id: get_str(&r, "provider_id")?,
                model: get_str(&r, "model")?,
                max_class: get_i64(&r, "max_class")?,
                min_score_pct: get_i64(&r, "min_score_pct")?,
                updated_at: get_i64(&r, "updated_at")?,
            })
        })
        .transpose()
    }

    /// Sets (or with `None` removes) the tenant's embedding model. When the model changes,
    /// every ready document gets an `embed` job, so its vectors are made again; until then
    /// searches use BM25 for it. Returns the number of documents queued.
    pub async fn set_kb_embedder(
        &self,
        tenant_id: &str,
        e: Option<&Embedder>,
        audit: AuditEvent,
        now: i64,
    ) -> Result<u64> {
        let before = self.kb_embedder(tenant_id).await?;
        let mut tx = self.write_tx().await?;
        match e {
            Some(e) => {
                let n = sqlx::query(
                    "SELECT COUNT(*) AS n FROM llm_providers WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(&e.provider_id)
                .fetch_one(&mut *tx)
                .await?;
                if get_i64(&n, "n")? == 0 {
                    return Err(StorageError::NotFound);
                }
                sqlx::query("DELETE FROM kb_embedders WHERE tenant_id = $1")
                    .bind(tenant_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO kb_embedders (tenant_id, provider_id, model, max_class, min_score_pct, updated_at) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(tenant_id)
                    .bind(&e.provider_id)
                    .bind(&e.model)
                    .bind(e.max_class)
                    .bind(e.min_score_pct)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                sqlx::query("DELETE FROM kb_embedders WHERE tenant_id = $1")
                    .bind(tenant_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let changed = match (&before, e) {
            (Some(b), Some(e)) => b.key() != e.key() || b.max_class != e.max_class,
            (None, Some(_)) => true,
            _ => false,
        };
        let mut queued = 0;
        if changed {
            // Vectors of the old model are useless to the new one.
            sqlx::query("DELETE FROM kb_vectors WHERE tenant_id = $1")
                .bind(tenant_id)
                .execute(&mut *tx)
                .await?;
            queued = sqlx::query(
                "INSERT INTO jobs (id, tenant_id, kind, target_id, status, attempts, locked_until, last_error, created_at, updated_at) \
                 SELECT 'embed-' || id, tenant_id, 'embed', id, 'queued', 0, NULL, NULL, $2, $2 FROM kb_documents \
                 WHERE tenant_id = $1 AND status IN ('ready', 'needs_ocr') \
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = 'embed-' || kb_documents.id)",
            )
            .bind(tenant_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        } else if e.is_none() {
            sqlx::query("DELETE FROM kb_vectors WHERE tenant_id = $1")
                .bind(tenant_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM jobs WHERE tenant_id = $1 AND kind = 'embed'")
                .bind(tenant_id)
                .execute(&mut *tx)
                .await?;
        }
        let detail = match e {
            Some(e) => {
                serde_json::json!({"provider_id": e.provider_id, "model": e.model, "max_class": e.max_class, "min_score_pct": e.min_score_pct, "documents_queued": queued})
            }
            None => serde_json::json!({"removed": true}),
        };
        crate::index_log::log_change(&mut tx, tenant_id, "", "", "embedder", now).await?;
        append(
            &mut tx,
            &audit.with(
                "knowledge.embedder",
                "knowledge:embedder".to_string(),
                detail,
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Queues an `embed` job for one document (its embedding failed during ingestion).
    pub async fn queue_embed(&self, tenant_id: &str, document_id: &str, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let id = format!("embed-{document_id}");
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, target_id, status, attempts, locked_until, last_error, created_at, updated_at) \
             VALUES ($1, $2, 'embed', $3, 'queued', 0, NULL, NULL, $4, $4)",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(document_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Queues again the `embed` jobs that failed. Returns how many.
    pub async fn retry_failed_embeds(&self, tenant_id: &str, now: i64) -> Result<u64> {
        Ok(sqlx::query("UPDATE jobs SET status = 'queued', attempts = 0, last_error = NULL, updated_at = $1 WHERE tenant_id = $2 AND kind = 'embed' AND status = 'failed'")
            .bind(now)
            .bind(tenant_id)
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    /// How far the vectors are: (passages with a vector of `model`, passages of ready
    /// documents, `embed` jobs waiting, `embed` jobs failed).
    pub async fn vector_progress(
        &self,
        tenant_id: &str,
        model: &str,
    ) -> Result<(i64, i64, i64, i64)> {
        let one = |sql: &'static str, bind_model: bool| {
            let q = sqlx::query(sql).bind(tenant_id.to_string());
            let q = if bind_model {
                q.bind(model.to_string())
            } else {
                q
            };
            async move {
                let r = q.fetch_one(&self.pool).await?;
                get_i64(&r, "n")
            }
        };
        Ok((
            one("SELECT COUNT(*) AS n FROM kb_vectors WHERE tenant_id = $1 AND model = $2", true).await?,
            one("SELECT COUNT(*) AS n FROM kb_chunks c JOIN kb_documents d ON d.id = c.document_id WHERE c.tenant_id = $1 AND d.status IN ('ready', 'needs_ocr')", false).await?,
            one("SELECT COUNT(*) AS n FROM jobs WHERE tenant_id = $1 AND kind = 'embed' AND status IN ('queued', 'running')", false).await?,
            one("SELECT COUNT(*) AS n FROM jobs WHERE tenant_id = $1 AND kind = 'embed' AND status = 'failed'", false).await?,
        ))
    }

    /// Replaces a document's vectors and marks its `embed` job done, at once.
    pub async fn finish_embed(
        &self,
        job: &crate::Job,
        model: &str,
        vectors: &[(String, Vec<u8>)],
        now: i64,
    ) -> Result<()> {
        let d = self.document(&job.tenant_id, &job.target_id).await?;
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM kb_vectors WHERE document_id = $1")
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        for (chunk_id, bytes) in vectors {
            // Only passages that are still this document's (a re-ingest may have replaced them).
            sqlx::query(
                "INSERT INTO kb_vectors (chunk_id, tenant_id, document_id, collection_id, model, vector) \
                 SELECT id, tenant_id, document_id, collection_id, $1, $2 FROM kb_chunks WHERE id = $3 AND document_id = $4",
            )
            .bind(model)
            .bind(encode(bytes))
            .bind(chunk_id)
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        crate::index_log::log_change(
            &mut tx,
            &d.tenant_id,
            &d.id,
            &d.collection_id,
            "vectors",
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The vectors of ready documents made by `model`, a page at a time after `after`
    /// (a chunk id; empty for the first page), in chunk id order.
    pub async fn kb_vectors_page(
        &self,
        tenant_id: &str,
        model: &str,
        after: &str,
    ) -> Result<Vec<StoredVector>> {
        sqlx::query(
            "SELECT v.chunk_id, v.document_id, v.collection_id, v.vector FROM kb_vectors v \
             JOIN kb_documents d ON d.id = v.document_id \
             WHERE v.tenant_id = $1 AND v.model = $2 AND v.chunk_id > $3 AND d.status IN ('ready', 'needs_ocr') \
             ORDER BY v.chunk_id LIMIT $4",
        )
        .bind(tenant_id)
        .bind(model)
        .bind(after)
        .bind(PAGE)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(stored)
        .collect()
    }

    /// The vectors of one document made by `model`.
    pub async fn document_vectors(
        &self,
        tenant_id: &str,
        document_id: &str,
        model: &str,
    ) -> Result<Vec<StoredVector>> {
        sqlx::query(
            "SELECT chunk_id, document_id, collection_id, vector FROM kb_vectors \
             WHERE tenant_id = $1 AND document_id = $2 AND model = $3 ORDER BY chunk_id",
        )
        .bind(tenant_id)
        .bind(document_id)
        .bind(model)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(stored)
        .collect()
    }

    /// A document's passages (id, heading, text) in order, for embedding them.
    pub async fn document_chunks(
        &self,
        tenant_id: &str,
        document_id: &str,
    ) -> Result<Vec<(String, Option<String>, String)>> {
        sqlx::query("SELECT id, heading, text FROM kb_chunks WHERE tenant_id = $1 AND document_id = $2 ORDER BY seq")
            .bind(tenant_id)
            .bind(document_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((get_str(r, "id")?, crate::get_opt_str(r, "heading")?, get_str(r, "text")?)))
            .collect()
    }
}
