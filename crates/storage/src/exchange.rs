//! A tenant's rows in and out (S18: export for migration at contract end; moving a tenant
//! between yakuba installations). Rows travel as JSON objects (column → text, integer or
//! null), read from one snapshot and written in one transaction.
//!
//! Left out on purpose: password hashes, provider API keys and API tokens (secrets that
//! must not leave in a file; staff get new temporary passwords and admins re-enter keys),
//! sessions, sign-in attempts and pending imports (short-lived working state).

use crate::{Backend, Result, StorageError, Store};
use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::{Column, Row};

pub struct ExportTable {
    pub name: &'static str,
    order: &'static str,
    /// Columns not exported; an import fills them with `''`.
    omit: &'static [&'static str],
}

/// In the order an import inserts them: every row after the rows it refers to.
pub const EXPORT_TABLES: &[ExportTable] = &[
    t("tenants", "id", &[]),
    // A parent's path is a prefix of its children's, so it sorts first.
    t("departments", "path", &[]),
    t("users", "id", &["password_hash"]),
    t("llm_providers", "id", &["api_key"]),
    t("llm_models", "id", &[]),
    t("llm_model_departments", "model_id, department_id", &[]),
    t("conversations", "id", &[]),
    t("messages", "id", &[]),
    t("failures", "id", &[]),
    t("usage_events", "id", &[]),
    t("usage_counters", "month, scope", &[]),
    t("usage_allocations", "department_id", &[]),
    t("usage_user_caps", "user_id", &[]),
    t("prompt_templates", "id", &[]),
    t("template_favourites", "user_id, template_ref", &[]),
    t("template_uses", "template_ref", &[]),
    t("legal_holds", "id", &[]),
    t("collections", "id", &[]),
    t("collection_members", "collection_id, user_id", &[]),
    t("kb_documents", "id", &[]),
    t("kb_pages", "document_id, page", &[]),
    t("kb_chunks", "id", &[]),
    t("kb_vectors", "chunk_id", &[]),
    t("kb_embedders", "tenant_id", &[]),
    t("audit_heads", "tenant_id", &[]),
    t("audit_log", "seq", &[]),
    t("disposals", "id", &[]),
    t("alerts", "id", &[]),
    t("alert_cursors", "tenant_id", &[]),
];

const fn t(name: &'static str, order: &'static str, omit: &'static [&'static str]) -> ExportTable {
    ExportTable { name, order, omit }
}

/// Sent by an import's reader after the last row; without it nothing is kept.
pub const IMPORT_END: &str = "$end";

/// What the export sends, in order: a table, then its rows.
pub enum ExportItem {
    Table(&'static str),
    Row(Map<String, Value>),
}

fn row_json(r: &sqlx::any::AnyRow, omit: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for (i, c) in r.columns().iter().enumerate() {
        if omit.contains(&c.name()) {
            continue;
        }
        let v = if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else if let Ok(v) = r.try_get::<Option<String>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        m.insert(c.name().to_string(), v);
    }
    m
}

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl Store {
    /// Sends every exported row of the tenant to `tx`, from one consistent snapshot.
    pub async fn export_tenant_rows(
        &self,
        tenant_id: &str,
        tx: tokio::sync::mpsc::Sender<ExportItem>,
    ) -> Result<()> {
        let mut db = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *db)
                .await?;
        }
        let closed = || StorageError::Conflict("書き出しが中断されました。".into());
        for table in EXPORT_TABLES {
            tx.send(ExportItem::Table(table.name))
                .await
                .map_err(|_| closed())?;
            let key = if table.name == "tenants" {
                "id"
            } else {
                "tenant_id"
            };
            let sql = format!(
                "SELECT * FROM {} WHERE {key} = $1 ORDER BY {}",
                table.name, table.order
            );
            let mut rows = sqlx::query(&sql).bind(tenant_id).fetch(&mut *db);
            while let Some(r) = rows.try_next().await? {
                tx.send(ExportItem::Row(row_json(&r, table.omit)))
                    .await
                    .map_err(|_| closed())?;
            }
        }
        db.rollback().await?;
        Ok(())
    }

    /// Inserts a tenant's rows as they arrive on `rx` (table name, row), in one
    /// transaction: all of them or none. Every row must belong to `tenant_id`, which must
    /// not exist here yet, nor its identifier (`slug`). Returns the rows per table.
    pub async fn import_tenant_rows(
        &self,
        tenant_id: &str,
        slug: &str,
        mut rx: tokio::sync::mpsc::Receiver<(String, Map<String, Value>)>,
    ) -> Result<Vec<(String, u64)>> {
        let mut db = self.write_tx().await?;
        let taken = sqlx::query("SELECT id FROM tenants WHERE id = $1 OR slug = $2")
            .bind(tenant_id)
            .bind(slug)
            .fetch_optional(&mut *db)
            .await?;
        if taken.is_some() {
            return Err(StorageError::Conflict(format!(
                "自治体「{slug}」（またはその内部ID）はこの yakuba にすでにあります。取り込みは行いませんでした。"
            )));
        }
        let mut counts: Vec<(String, u64)> = Vec::new();
        let mut complete = false;
        while let Some((table, row)) = rx.recv().await {
            if table == IMPORT_END {
                complete = true;
                break;
            }
            let Some(spec) = EXPORT_TABLES.iter().find(|t| t.name == table) else {
                return Err(StorageError::Conflict(format!(
                    "表「{table}」は取り込めません。"
                )));
            };
            let owner = if table == "tenants" {
                "id"
            } else {
                "tenant_id"
            };
            if row.get(owner).and_then(Value::as_str) != Some(tenant_id) {
                return Err(StorageError::Conflict(format!(
                    "{table} に別の自治体の行があります。取り込みは行いませんでした。"
                )));
            }
            let mut cols = Vec::new();
            let mut vals = Vec::new();
            for (k, v) in &row {
                if !identifier(k) {
                    return Err(StorageError::Conflict(format!("列名「{k}」は使えません。")));
                }
                if v.is_null() {
                    continue; // the column's default (NULL); a typed NULL is not needed
                }
                cols.push(k.as_str());
                vals.push(v);
            }
            for o in spec.omit {
                if !row.contains_key(*o) {
                    cols.push(o);
                    vals.push(&Value::Null);
                }
            }
            let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                cols.join(", "),
                marks.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for v in vals {
                q = match v {
                    Value::Number(n) => match n.as_i64() {
                        Some(i) => q.bind(i),
                        None => q.bind(n.to_string()),
                    },
                    Value::String(s) => q.bind(s.clone()),
                    Value::Bool(b) => q.bind(i64::from(*b)),
                    // An omitted secret: empty, so nothing can sign in or call out with it.
                    Value::Null => q.bind(String::new()),
                    other => q.bind(other.to_string()),
                };
            }
            q.execute(&mut *db).await.map_err(|e| {
                StorageError::Conflict(format!(
                    "{table} の行を取り込めません（{}）。取り込みは行いませんでした。",
                    e.as_database_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string())
                ))
            })?;
            match counts.last_mut() {
                Some((t, n)) if *t == table => *n += 1,
                _ => counts.push((table, 1)),
            }
        }
        if !complete {
            // The reader stopped early: keep nothing.
            return Err(StorageError::Conflict(
                "取り込むファイルを最後まで読めませんでした。取り込みは行いませんでした。".into(),
            ));
        }
        db.commit().await?;
        Ok(counts)
    }
}
