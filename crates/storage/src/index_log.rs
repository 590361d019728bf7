//! The index log (`kb_index_log`): every change to a tenant's passages or vectors appends
//! a row in the same transaction as the change, so each app node can bring its own search
//! index (a cache of the database) in step by reading what it has not applied yet. With
//! PostgreSQL, sequence numbers are handed out before commit, so a row may become visible
//! after a higher one: readers also look back over a short window and skip what they have
//! already applied (see the server's index follower).

use crate::{get_i64, get_str, Result, Store};

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexChange {
    pub seq: i64,
    pub document_id: String,
    pub collection_id: String,
    /// `document`, `collection`, `embedder` or `disposed`.
    pub op: String,
    pub at: i64,
}

/// Appends a change inside the caller's transaction.
pub(crate) async fn log_change(
    tx: &mut sqlx::AnyConnection,
    tenant_id: &str,
    document_id: &str,
    collection_id: &str,
    op: &str,
    at: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO kb_index_log (tenant_id, document_id, collection_id, op, at) VALUES ($1, $2, $3, $4, $5)")
        .bind(tenant_id)
        .bind(document_id)
        .bind(collection_id)
        .bind(op)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Rows read at most per call.
const LIMIT: i64 = 1_000;

impl Store {
    /// Changes of the tenant after `after` or at/after `since_ms` (the look-back window),
    /// oldest first, at most 1,000.
    pub async fn index_changes(
        &self,
        tenant_id: &str,
        after: i64,
        since_ms: i64,
    ) -> Result<Vec<IndexChange>> {
        sqlx::query(
            "SELECT seq, document_id, collection_id, op, at FROM kb_index_log \
             WHERE tenant_id = $1 AND (seq > $2 OR at >= $3) ORDER BY seq LIMIT $4",
        )
        .bind(tenant_id)
        .bind(after)
        .bind(since_ms)
        .bind(LIMIT)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(IndexChange {
                seq: get_i64(r, "seq")?,
                document_id: get_str(r, "document_id")?,
                collection_id: get_str(r, "collection_id")?,
                op: get_str(r, "op")?,
                at: get_i64(r, "at")?,
            })
        })
        .collect()
    }

    /// (changes since `since_ms`, newest change) over all tenants: while it stays the
    /// same, no node has anything new to apply, so one query stands for all tenants.
    pub async fn index_signature(&self, since_ms: i64) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, (SELECT COALESCE(MAX(seq), 0) FROM kb_index_log) AS top \
             FROM kb_index_log WHERE at >= $1",
        )
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok((get_i64(&r, "n")?, get_i64(&r, "top")?))
    }

    /// The newest change of the tenant (0 when none): where an index rebuilt from the
    /// database now starts following.
    pub async fn index_head(&self, tenant_id: &str) -> Result<i64> {
        let r =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) AS n FROM kb_index_log WHERE tenant_id = $1")
                .bind(tenant_id)
                .fetch_one(&self.pool)
                .await?;
        get_i64(&r, "n")
    }

    /// The oldest change still kept (0 when none): an index that applied less than this
    /// must be rebuilt.
    pub async fn index_tail(&self, tenant_id: &str) -> Result<i64> {
        let r =
            sqlx::query("SELECT COALESCE(MIN(seq), 0) AS n FROM kb_index_log WHERE tenant_id = $1")
                .bind(tenant_id)
                .fetch_one(&self.pool)
                .await?;
        get_i64(&r, "n")
    }

    /// Forgets changes older than `before_ms` but each tenant's newest (housekeeping; a
    /// node away for longer rebuilds its index).
    pub async fn prune_index_log(&self, before_ms: i64) -> Result<u64> {
        // Each tenant's newest change stays: it tells a node that comes back whether the
        // log still reaches back to where it got.
        Ok(sqlx::query(
            "DELETE FROM kb_index_log WHERE at < $1 AND seq < \
             (SELECT MAX(l.seq) FROM kb_index_log l WHERE l.tenant_id = kb_index_log.tenant_id)",
        )
        .bind(before_ms)
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    /// Records a change outside any other write (a tenant disposed of).
    pub async fn log_index_change(&self, tenant_id: &str, op: &str, at: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        log_change(&mut tx, tenant_id, "", "", op, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A document's passages for its index entries (none unless it is ready):
    /// (chunk id, collection id, heading, text) with the document's name.
    pub async fn document_passages(
        &self,
        tenant_id: &str,
        document_id: &str,
    ) -> Result<(String, Vec<(String, String, Option<String>, String)>)> {
        let rows = sqlx::query(
            "SELECT c.id, c.collection_id, c.heading, c.text, d.name FROM kb_chunks c \
             JOIN kb_documents d ON d.id = c.document_id \
             WHERE c.tenant_id = $1 AND c.document_id = $2 AND d.status IN ('ready', 'needs_ocr') ORDER BY c.seq",
        )
        .bind(tenant_id)
        .bind(document_id)
        .fetch_all(&self.pool)
        .await?;
        let name = match rows.first() {
            Some(r) => get_str(r, "name")?,
            None => String::new(),
        };
        let out = rows
            .iter()
            .map(|r| {
                Ok((
                    get_str(r, "id")?,
                    get_str(r, "collection_id")?,
                    crate::get_opt_str(r, "heading")?,
                    get_str(r, "text")?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((name, out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn changes_in_order_per_tenant_and_pruning_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(
            (
                store.index_head("t1").await.unwrap(),
                store.index_tail("t1").await.unwrap()
            ),
            (0, 0)
        );
        for (t, op, at) in [
            ("t1", "embedder", 1_000),
            ("t2", "embedder", 1_500),
            ("t1", "disposed", 2_000),
            ("t1", "embedder", 9_000),
        ] {
            store.log_index_change(t, op, at).await.unwrap();
        }
        let all = store.index_changes("t1", 0, i64::MAX).await.unwrap();
        assert_eq!(
            all.iter().map(|c| c.op.as_str()).collect::<Vec<_>>(),
            ["embedder", "disposed", "embedder"]
        );
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        // After the second, and the look-back window reaching the first again.
        let after = store
            .index_changes("t1", all[1].seq, i64::MAX)
            .await
            .unwrap();
        assert_eq!(after.len(), 1);
        let window = store.index_changes("t1", all[2].seq, 1_000).await.unwrap();
        assert_eq!(window.len(), 3);
        assert_eq!(store.index_head("t1").await.unwrap(), all[2].seq);
        assert_eq!(store.index_tail("t1").await.unwrap(), all[0].seq);
        let sig = store.index_signature(0).await.unwrap();
        assert_eq!(sig, (4, all[2].seq));
        // Everything is old, but each tenant keeps its newest change.
        assert_eq!(store.prune_index_log(100_000).await.unwrap(), 2);
        assert_eq!(store.index_tail("t1").await.unwrap(), all[2].seq);
        assert_eq!(
            store.index_changes("t2", 0, i64::MAX).await.unwrap().len(),
            1
        );
        store.close().await;
    }
}
