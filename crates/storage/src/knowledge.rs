//! Knowledge (M8): collections, their documents, pages and passages, and the durable
//! ingestion jobs. A job is claimed with a lease (`locked_until`) that a worker renews as it
//! goes; a job whose worker died is claimed again when the lease runs out (or at start-up
//! on SQLite, where one process is the only worker). A document becomes `ready` in the same
//! transaction that stores its passages, so it is never ready half-indexed.

use crate::audit::{append, AuditEvent};
use crate::index_log::log_change;
use crate::{
    conflict_on_unique, exec, get_i64, get_opt_i64, get_opt_str, get_str, Result, StorageError,
    Store,
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Collection {
    pub id: String,
    pub tenant_id: String,
    pub department_id: Option<String>,
    pub department_path: Option<String>,
    pub name: String,
    pub description: String,
    pub classification: i64,
    pub restricted: bool,
    pub member_ids: Vec<String>,
    pub documents: i64,
    pub bytes: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug)]
pub struct CollectionInput {
    pub department_id: Option<String>,
    pub name: String,
    pub description: String,
    pub classification: i64,
    pub restricted: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KbDocument {
    pub id: String,
    pub tenant_id: String,
    pub collection_id: String,
    pub name: String,
    pub kind: String,
    pub bytes: i64,
    pub sha256: String,
    /// `queued`, `processing`, `ready`, `needs_ocr` or `failed`.
    pub status: String,
    pub pages: Option<i64>,
    pub pages_done: i64,
    pub ocr_pages: Vec<i64>,
    pub error: Option<String>,
    pub uploaded_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug)]
pub struct NewDocument {
    pub tenant_id: String,
    pub collection_id: String,
    pub name: String,
    pub kind: String,
    pub bytes: i64,
    pub sha256: String,
    pub uploaded_by: String,
    pub now: i64,
}

#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub tenant_id: String,
    pub kind: String,
    pub target_id: String,
    pub attempts: i64,
}

#[derive(Clone, Debug)]
pub struct NewPage {
    pub page: i64,
    pub ocr: bool,
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct NewChunk {
    pub id: String,
    pub seq: i64,
    pub page: i64,
    pub heading: Option<String>,
    pub text: String,
    /// The passage's embedding (quantised, see `search::vectors`), when one was made.
    pub vector: Option<Vec<u8>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Passage {
    pub chunk_id: String,
    pub document_id: String,
    pub document_name: String,
    pub collection_id: String,
    pub page: i64,
    pub heading: Option<String>,
    pub text: String,
}

const COLLECTION_COLS: &str =
    "c.id, c.tenant_id, c.department_id, d.path AS department_path, c.name, c.description, \
    c.classification, c.restricted, c.created_at, \
    (SELECT COUNT(*) FROM kb_documents k WHERE k.collection_id = c.id) AS documents, \
    (SELECT CAST(COALESCE(SUM(k.bytes), 0) AS BIGINT) FROM kb_documents k WHERE k.collection_id = c.id) AS bytes";

const DOCUMENT_COLS: &str =
    "id, tenant_id, collection_id, name, kind, bytes, sha256, status, pages, pages_done, \
    ocr_pages, error, uploaded_by, created_at, updated_at";

fn document_from(r: &sqlx::any::AnyRow) -> Result<KbDocument> {
    Ok(KbDocument {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        collection_id: get_str(r, "collection_id")?,
        name: get_str(r, "name")?,
        kind: get_str(r, "kind")?,
        bytes: get_i64(r, "bytes")?,
        sha256: get_str(r, "sha256")?,
        status: get_str(r, "status")?,
        pages: get_opt_i64(r, "pages")?,
        pages_done: get_i64(r, "pages_done")?,
        ocr_pages: serde_json::from_str(&get_str(r, "ocr_pages")?).unwrap_or_default(),
        error: get_opt_str(r, "error")?,
        uploaded_by: get_str(r, "uploaded_by")?,
        created_at: get_i64(r, "created_at")?,
        updated_at: get_i64(r, "updated_at")?,
    })
}

impl Store {
    async fn members_of(&self, collection_id: &str) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT user_id FROM collection_members WHERE collection_id = $1 ORDER BY user_id",
        )
        .bind(collection_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| get_str(r, "user_id"))
        .collect()
    }

    fn collection_from(&self, r: &sqlx::any::AnyRow) -> Result<Collection> {
        Ok(Collection {
            id: get_str(r, "id")?,
            tenant_id: get_str(r, "tenant_id")?,
            department_id: get_opt_str(r, "department_id")?,
            department_path: get_opt_str(r, "department_path")?,
            name: get_str(r, "name")?,
            description: get_str(r, "description")?,
            classification: get_i64(r, "classification")?,
            restricted: get_i64(r, "restricted")? != 0,
            member_ids: Vec::new(),
            documents: get_i64(r, "documents")?,
            bytes: get_i64(r, "bytes")?,
            created_at: get_i64(r, "created_at")?,
        })
    }

    /// Every collection of the tenant with its members; callers filter through the policy.
    pub async fn collections(&self, tenant_id: &str) -> Result<Vec<Collection>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLLECTION_COLS} FROM collections c LEFT JOIN departments d ON d.id = c.department_id \
             WHERE c.tenant_id = $1 ORDER BY c.name"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let mut c = self.collection_from(r)?;
            if c.restricted {
                c.member_ids = self.members_of(&c.id).await?;
            }
            out.push(c);
        }
        Ok(out)
    }

    pub async fn collection(&self, tenant_id: &str, id: &str) -> Result<Collection> {
        let r = sqlx::query(&format!(
            "SELECT {COLLECTION_COLS} FROM collections c LEFT JOIN departments d ON d.id = c.department_id \
             WHERE c.tenant_id = $1 AND c.id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        let mut c = self.collection_from(&r)?;
        c.member_ids = self.members_of(&c.id).await?;
        Ok(c)
    }

    pub async fn create_collection(
        &self,
        tenant_id: &str,
        input: &CollectionInput,
        audit: AuditEvent,
    ) -> Result<String> {
        let id = domain::ids::new_id();
        let now = audit.at_ms;
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO collections (id, tenant_id, department_id, name, description, classification, restricted, created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(&input.department_id)
        .bind(&input.name)
        .bind(&input.description)
        .bind(input.classification)
        .bind(i64::from(input.restricted))
        .bind(&audit.actor_login)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_unique(e, "同じ名前のナレッジがすでにあります。"))?;
        append(
            &mut tx,
            &audit.with(
                "collection.create",
                format!("collection:{id}"),
                serde_json::json!({"name": input.name, "department_id": input.department_id, "classification": input.classification, "restricted": input.restricted}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn update_collection(
        &self,
        tenant_id: &str,
        id: &str,
        input: &CollectionInput,
        members: &[String],
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query(
            "UPDATE collections SET name = $1, description = $2, classification = $3, restricted = $4, updated_at = $5 \
             WHERE tenant_id = $6 AND id = $7",
        )
        .bind(&input.name)
        .bind(&input.description)
        .bind(input.classification)
        .bind(i64::from(input.restricted))
        .bind(audit.at_ms)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_unique(e, "同じ名前のナレッジがすでにあります。"))?
        .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        sqlx::query("DELETE FROM collection_members WHERE collection_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for m in members {
            sqlx::query(
                "INSERT INTO collection_members (collection_id, user_id, tenant_id) \
                 SELECT $1, id, tenant_id FROM users WHERE tenant_id = $2 AND id = $3",
            )
            .bind(id)
            .bind(tenant_id)
            .bind(m)
            .execute(&mut *tx)
            .await?;
        }
        append(
            &mut tx,
            &audit.with(
                "collection.update",
                format!("collection:{id}"),
                serde_json::json!({"name": input.name, "classification": input.classification, "restricted": input.restricted, "members": members.len()}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a collection with its documents, pages and passages. Returns the documents
    /// (their files and index entries are the caller's to remove).
    pub async fn delete_collection(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<Vec<KbDocument>> {
        let docs = self.documents(tenant_id, id).await?;
        let audit_at = audit.at_ms;
        let mut tx = self.write_tx().await?;
        // Passages, pages and jobs of its documents, the documents, then the collection.
        let docs_of = "(SELECT id FROM kb_documents WHERE collection_id = $2)";
        for sql in [
            "DELETE FROM kb_chunks WHERE tenant_id = $1 AND collection_id = $2".to_string(),
            format!("DELETE FROM kb_pages WHERE tenant_id = $1 AND document_id IN {docs_of}"),
            format!("DELETE FROM jobs WHERE tenant_id = $1 AND target_id IN {docs_of}"),
            "DELETE FROM kb_documents WHERE tenant_id = $1 AND collection_id = $2".to_string(),
        ] {
            exec(&mut tx, &sql, &[tenant_id, id]).await?;
        }
        let n = exec(
            &mut tx,
            "DELETE FROM collections WHERE tenant_id = $1 AND id = $2",
            &[tenant_id, id],
        )
        .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "collection.delete",
                format!("collection:{id}"),
                serde_json::json!({"documents": docs.len()}),
            ),
        )
        .await?;
        log_change(&mut tx, tenant_id, "", id, "collection", audit_at).await?;
        tx.commit().await?;
        Ok(docs)
    }

    pub async fn documents(&self, tenant_id: &str, collection_id: &str) -> Result<Vec<KbDocument>> {
        sqlx::query(&format!(
            "SELECT {DOCUMENT_COLS} FROM kb_documents WHERE tenant_id = $1 AND collection_id = $2 ORDER BY created_at DESC, name"
        ))
        .bind(tenant_id)
        .bind(collection_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(document_from)
        .collect()
    }

    pub async fn document(&self, tenant_id: &str, id: &str) -> Result<KbDocument> {
        let r = sqlx::query(&format!(
            "SELECT {DOCUMENT_COLS} FROM kb_documents WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        document_from(&r)
    }

    /// Bytes of all documents the tenant has stored (for its storage quota).
    pub async fn knowledge_bytes(&self, tenant_id: &str) -> Result<i64> {
        let r = sqlx::query(
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS n FROM kb_documents WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_one(&self.pool)
        .await?;
        get_i64(&r, "n")
    }

    /// Is a file with this hash stored for the tenant (in any collection)?
    pub async fn blob_in_use(&self, tenant_id: &str, sha256: &str) -> Result<bool> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM kb_documents WHERE tenant_id = $1 AND sha256 = $2",
        )
        .bind(tenant_id)
        .bind(sha256)
        .fetch_one(&self.pool)
        .await?;
        Ok(get_i64(&r, "n")? > 0)
    }

    /// Registers an uploaded document and queues its ingestion, together.
    pub async fn add_document(&self, d: &NewDocument, audit: AuditEvent) -> Result<String> {
        let id = domain::ids::new_id();
        let mut tx = self.write_tx().await?;
        let same =
            sqlx::query("SELECT name FROM kb_documents WHERE collection_id = $1 AND sha256 = $2")
                .bind(&d.collection_id)
                .bind(&d.sha256)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(r) = same {
            return Err(StorageError::Conflict(format!(
                "同じ内容のファイルが「{}」として登録済みです。",
                get_str(&r, "name")?
            )));
        }
        sqlx::query(&format!(
            "INSERT INTO kb_documents ({DOCUMENT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', NULL, 0, '[]', NULL, $8, $9, $9)"
        ))
        .bind(&id)
        .bind(&d.tenant_id)
        .bind(&d.collection_id)
        .bind(&d.name)
        .bind(&d.kind)
        .bind(d.bytes)
        .bind(&d.sha256)
        .bind(&d.uploaded_by)
        .bind(d.now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, target_id, status, attempts, locked_until, last_error, created_at, updated_at) \
             VALUES ($1, $2, 'ingest', $3, 'queued', 0, NULL, NULL, $4, $4)",
        )
        .bind(domain::ids::new_id())
        .bind(&d.tenant_id)
        .bind(&id)
        .bind(d.now)
        .execute(&mut *tx)
        .await?;
        append(
            &mut tx,
            &audit.with(
                "document.upload",
                format!("document:{id}"),
                serde_json::json!({"collection_id": d.collection_id, "name": d.name, "kind": d.kind, "bytes": d.bytes, "sha256": d.sha256}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Removes a document with its pages and passages; returns it (the file and index
    /// entries are the caller's).
    pub async fn delete_document(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<KbDocument> {
        let d = self.document(tenant_id, id).await?;
        let audit_at = audit.at_ms;
        let mut tx = self.write_tx().await?;
        for sql in [
            "DELETE FROM kb_chunks WHERE tenant_id = $1 AND document_id = $2",
            "DELETE FROM kb_pages WHERE tenant_id = $1 AND document_id = $2",
            "DELETE FROM jobs WHERE tenant_id = $1 AND target_id = $2",
            "DELETE FROM kb_documents WHERE tenant_id = $1 AND id = $2",
        ] {
            exec(&mut tx, sql, &[tenant_id, id]).await?;
        }
        append(
            &mut tx,
            &audit.with(
                "document.delete",
                format!("document:{id}"),
                serde_json::json!({"collection_id": d.collection_id, "name": d.name}),
            ),
        )
        .await?;
        log_change(
            &mut tx,
            tenant_id,
            id,
            &d.collection_id,
            "document",
            audit_at,
        )
        .await?;
        tx.commit().await?;
        Ok(d)
    }

    /// Queues a document's ingestion again (re-index).
    pub async fn requeue_document(&self, tenant_id: &str, id: &str, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM jobs WHERE tenant_id = $1 AND target_id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE kb_documents SET status = 'queued', pages_done = 0, error = NULL, updated_at = $1 WHERE tenant_id = $2 AND id = $3")
            .bind(now)
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, target_id, status, attempts, locked_until, last_error, created_at, updated_at) \
             VALUES ($1, $2, 'ingest', $3, 'queued', 0, NULL, NULL, $4, $4)",
        )
        .bind(domain::ids::new_id())
        .bind(tenant_id)
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes the oldest job that is queued or whose lease ran out, for `lease_ms`.
    pub async fn claim_job(&self, now: i64, lease_ms: i64) -> Result<Option<Job>> {
        for _ in 0..5 {
            let Some(r) = sqlx::query(
                "SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND locked_until < $1) \
                 ORDER BY created_at LIMIT 1",
            )
            .bind(now)
            .fetch_optional(&self.pool)
            .await?
            else {
                return Ok(None);
            };
            let id = get_str(&r, "id")?;
            // Whoever changes the row first owns the job.
            let n = sqlx::query(
                "UPDATE jobs SET status = 'running', locked_until = $1, attempts = attempts + 1, updated_at = $2 \
                 WHERE id = $3 AND (status = 'queued' OR (status = 'running' AND locked_until < $2))",
            )
            .bind(now + lease_ms)
            .bind(now)
            .bind(&id)
            .execute(&self.writer)
            .await?
            .rows_affected();
            if n == 1 {
                let r = sqlx::query(
                    "SELECT id, tenant_id, kind, target_id, attempts FROM jobs WHERE id = $1",
                )
                .bind(&id)
                .fetch_one(&self.writer)
                .await?;
                return Ok(Some(Job {
                    id: get_str(&r, "id")?,
                    tenant_id: get_str(&r, "tenant_id")?,
                    kind: get_str(&r, "kind")?,
                    target_id: get_str(&r, "target_id")?,
                    attempts: get_i64(&r, "attempts")?,
                }));
            }
        }
        Ok(None)
    }

    /// Jobs left running by a process that is gone (SQLite: this process is the only
    /// worker, so at start-up every running job is such a job).
    pub async fn requeue_running_jobs(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET status = 'queued', locked_until = NULL WHERE status = 'running'",
        )
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    /// Progress of a document, and a renewed lease for its job.
    pub async fn ingest_progress(
        &self,
        job: &Job,
        status: &str,
        pages: Option<i64>,
        pages_done: i64,
        now: i64,
        lease_ms: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE kb_documents SET status = $1, pages = $2, pages_done = $3, updated_at = $4 WHERE id = $5")
            .bind(status)
            .bind(pages)
            .bind(pages_done)
            .bind(now)
            .bind(&job.target_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE jobs SET locked_until = $1, updated_at = $2 WHERE id = $3")
            .bind(now + lease_ms)
            .bind(now)
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a document's pages and passages and marks it ready (or `needs_ocr`), and the
    /// job done — all at once.
    #[allow(clippy::too_many_arguments)] // one transaction's worth of inputs
    pub async fn finish_ingest(
        &self,
        job: &Job,
        status: &str,
        pages: &[NewPage],
        chunks: &[NewChunk],
        vector_model: Option<&str>,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        let d = self.document(&job.tenant_id, &job.target_id).await?;
        let mut tx = self.write_tx().await?;
        for sql in [
            "DELETE FROM kb_chunks WHERE document_id = $1",
            "DELETE FROM kb_pages WHERE document_id = $1",
        ] {
            sqlx::query(sql).bind(&d.id).execute(&mut *tx).await?;
        }
        for p in pages {
            sqlx::query("INSERT INTO kb_pages (document_id, tenant_id, page, ocr, text) VALUES ($1, $2, $3, $4, $5)")
                .bind(&d.id)
                .bind(&d.tenant_id)
                .bind(p.page)
                .bind(i64::from(p.ocr))
                .bind(&p.text)
                .execute(&mut *tx)
                .await?;
        }
        for c in chunks {
            sqlx::query("INSERT INTO kb_chunks (id, tenant_id, document_id, collection_id, seq, page, heading, text) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(&c.id)
                .bind(&d.tenant_id)
                .bind(&d.id)
                .bind(&d.collection_id)
                .bind(c.seq)
                .bind(c.page)
                .bind(&c.heading)
                .bind(&c.text)
                .execute(&mut *tx)
                .await?;
            if let (Some(model), Some(v)) = (vector_model, &c.vector) {
                sqlx::query("INSERT INTO kb_vectors (chunk_id, tenant_id, document_id, collection_id, model, vector) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(&c.id)
                    .bind(&d.tenant_id)
                    .bind(&d.id)
                    .bind(&d.collection_id)
                    .bind(model)
                    .bind(crate::vectors::encode(v))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let ocr: Vec<i64> = pages.iter().filter(|p| p.ocr).map(|p| p.page).collect();
        sqlx::query(
            "UPDATE kb_documents SET status = $1, pages = $2, pages_done = $2, ocr_pages = $3, error = $4, updated_at = $5 WHERE id = $6",
        )
        .bind(status)
        .bind(pages.len() as i64)
        .bind(serde_json::to_string(&ocr).unwrap_or_else(|_| "[]".into()))
        .bind(error)
        .bind(now)
        .bind(&d.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET status = 'done', locked_until = NULL, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(&job.id)
        .execute(&mut *tx)
        .await?;
        log_change(
            &mut tx,
            &d.tenant_id,
            &d.id,
            &d.collection_id,
            "document",
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A job that failed: the document shows why; the job is retried later unless
    /// `final_failure`.
    pub async fn fail_job(
        &self,
        job: &Job,
        error: &str,
        final_failure: bool,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE jobs SET status = $1, locked_until = NULL, last_error = $2, updated_at = $3 WHERE id = $4")
            .bind(if final_failure { "failed" } else { "queued" })
            .bind(error)
            .bind(now)
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        // An `embed` job failing leaves the document as it is (searchable by BM25).
        if final_failure && job.kind == "ingest" {
            sqlx::query("UPDATE kb_documents SET status = 'failed', error = $1, updated_at = $2 WHERE id = $3")
                .bind(error)
                .bind(now)
                .bind(&job.target_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Passages by id, of ready documents only, in the order asked.
    pub async fn passages(&self, tenant_id: &str, chunk_ids: &[String]) -> Result<Vec<Passage>> {
        let mut out = Vec::new();
        for id in chunk_ids {
            if let Some(r) = sqlx::query(
                "SELECT c.id, c.document_id, d.name, c.collection_id, c.page, c.heading, c.text FROM kb_chunks c \
                 JOIN kb_documents d ON d.id = c.document_id WHERE c.tenant_id = $1 AND c.id = $2 AND d.status IN ('ready', 'needs_ocr')",
            )
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            {
                out.push(Passage {
                    chunk_id: get_str(&r, "id")?,
                    document_id: get_str(&r, "document_id")?,
                    document_name: get_str(&r, "name")?,
                    collection_id: get_str(&r, "collection_id")?,
                    page: get_i64(&r, "page")?,
                    heading: get_opt_str(&r, "heading")?,
                    text: get_str(&r, "text")?,
                });
            }
        }
        Ok(out)
    }

    /// A page of a document: its text and whether OCR read it.
    pub async fn document_page(
        &self,
        tenant_id: &str,
        document_id: &str,
        page: i64,
    ) -> Result<(String, bool)> {
        let r = sqlx::query("SELECT text, ocr FROM kb_pages WHERE tenant_id = $1 AND document_id = $2 AND page = $3")
            .bind(tenant_id)
            .bind(document_id)
            .bind(page)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        Ok((get_str(&r, "text")?, get_i64(&r, "ocr")? != 0))
    }

    /// All passages of ready documents of the tenant, for rebuilding its index: (chunk,
    /// document, collection, heading, text, document name).
    pub async fn all_passages(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<(String, String, String, Option<String>, String, String)>> {
        sqlx::query(
            "SELECT c.id, c.document_id, c.collection_id, c.heading, c.text, d.name FROM kb_chunks c \
             JOIN kb_documents d ON d.id = c.document_id WHERE c.tenant_id = $1 AND d.status IN ('ready', 'needs_ocr') ORDER BY c.document_id, c.seq",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok((
                get_str(r, "id")?,
                get_str(r, "document_id")?,
                get_str(r, "collection_id")?,
                get_opt_str(r, "heading")?,
                get_str(r, "text")?,
                get_str(r, "name")?,
            ))
        })
        .collect()
    }
}
