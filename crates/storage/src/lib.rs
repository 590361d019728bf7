//! Persistence for yakuba: one query layer over SQLite (the embedded default) and
//! PostgreSQL (scale-out), through sqlx's `Any` driver. SQL is written once in the portable
//! subset both engines share (`$n` placeholders, `BIGINT` times in UTC milliseconds, text
//! ids); only the migrations differ per backend.
//!
//! Every write that matters takes the [`AuditEvent`] that describes it and appends it to the
//! tenant's hash chain in the same transaction, so a change and its record land together or
//! not at all.
//!
//! Uploaded files live in the [`BlobStore`], sealed with per-tenant keys (see [`blob`]).

mod alerts;
mod audit;
mod backup;
pub mod blob;
mod chat;
mod departments;
mod disposal;
mod exchange;
mod imports;
mod index_log;
mod knowledge;
mod logs;
mod migrate;
mod retention;
mod sessions;
mod templates;
mod tenants;
mod tokens;
mod usage;
mod users;
mod vectors;

pub use alerts::AlertRecord;
pub use audit::{AuditEvent, AuditFilter, ChainReport};
pub use blob::{BlobStore, FsObjects, MasterKey, ObjectStore, SealReport, TenantKeys};
pub use chat::{
    AnswerEnd, Conversation, Message, Model, ModelInput, NewTurn, Provider, ProviderInput,
};
pub use departments::Department;
pub use disposal::{Disposal, Operator, REQUEST_VALID_MS};
pub use exchange::{ExportItem, EXPORT_TABLES, IMPORT_END};
pub use imports::{ImportOutcome, PendingImport};
pub use index_log::IndexChange;
pub use knowledge::{
    Collection, CollectionInput, Job, KbDocument, NewChunk, NewDocument, NewPage, Passage,
};
pub use logs::{LogCursor, LogFilter, LogRow};
pub use migrate::LATEST as LATEST_SCHEMA;
pub use retention::{LegalHold, Purged};
pub use sessions::{AttemptRecord, LoginAttempt, Session};
pub use templates::{PromptTemplate, TemplateInput, Viewer};
pub use tenants::Tenant;
pub use tokens::ApiToken;
pub use usage::{scopes_for, UsageFilter, UsageRecord, UsageReport, UsageTotals, UserUsage};
pub use users::{NewUser, User, UserFilter, UserStatus, UserUpdate};
pub use vectors::{Embedder, StoredVector};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, ConnectOptions, Executor, Row};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    /// A uniqueness or state rule was violated; the message is safe to show (Japanese).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid stored data: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migration(String),
    /// A stored file failed its check (changed, cut short, sealed for another tenant or
    /// with a key that is gone); the message is safe to show (Japanese).
    #[error("{0}")]
    Integrity(String),
    /// The master key is malformed or is not the one the tenant keys were wrapped with; the
    /// message is safe to show (Japanese) and says what to do.
    #[error("{0}")]
    Key(String),
    #[error("file error: {0}")]
    Io(std::io::Error),
}

impl StorageError {
    /// Stable code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::NotFound => "not_found",
            StorageError::Conflict(_) => "conflict",
            StorageError::Corrupt(_) => "corrupt",
            StorageError::Db(_) => "database",
            StorageError::Migration(_) => "migration",
            StorageError::Integrity(_) => "integrity",
            StorageError::Key(_) => "key",
            StorageError::Io(_) => "io",
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Store {
    /// Reads (and, on PostgreSQL, writes).
    pool: AnyPool,
    /// Writes. On SQLite one connection: writers queue in the pool, first come first
    /// served, instead of polling SQLite's busy handler (which sleeps up to 100 ms between
    /// tries) while holding connections the readers need. On PostgreSQL the same pool.
    writer: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects to `sqlite://…` or `postgres://…`. SQLite files are created when missing,
    /// in WAL mode with full fsync (chat and audit data must survive a power cut).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StorageError::Migration(
                "database_url must start with sqlite:// or postgres://".into(),
            ));
        };
        let url = if backend == Backend::Sqlite && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        let opts = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let pool = Self::pool_options(
            backend,
            if backend == Backend::Sqlite {
                max_connections.min(8)
            } else {
                max_connections
            },
        )
        .connect_with(opts.clone())
        .await?;
        let writer = match backend {
            Backend::Sqlite => Self::pool_options(backend, 1).connect_with(opts).await?,
            Backend::Postgres => pool.clone(),
        };
        Ok(Store {
            pool,
            writer,
            backend,
        })
    }

    fn pool_options(backend: Backend, max_connections: u32) -> AnyPoolOptions {
        AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                             PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000; \
                             PRAGMA secure_delete=ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Applies the migrations this binary knows and the database lacks.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        migrate::run(self).await
    }

    /// A transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads first and writes later cannot
    /// wait for a busy writer and fails with "database is locked" under concurrency.
    pub(crate) async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        })
    }

    /// For readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// Maps a unique-constraint violation to a [`StorageError::Conflict`] with `message`.
pub(crate) fn conflict_on_unique(e: sqlx::Error, message: &str) -> StorageError {
    if let Some(db) = e.as_database_error() {
        if db.is_unique_violation() {
            return StorageError::Conflict(message.to_string());
        }
    }
    StorageError::Db(e)
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
pub(crate) fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Runs a statement whose parameters are all text; returns the rows it touched.
pub(crate) async fn exec(conn: &mut sqlx::AnyConnection, sql: &str, binds: &[&str]) -> Result<u64> {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(*b);
    }
    Ok(q.execute(&mut *conn).await?.rows_affected())
}

/// The `n` of a `SELECT COUNT(*) AS n …` whose parameters are all text.
pub(crate) async fn count(
    conn: &mut sqlx::AnyConnection,
    sql: &str,
    binds: &[&str],
) -> Result<i64> {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(*b);
    }
    let r = q.fetch_one(&mut *conn).await?;
    get_i64(&r, "n")
}

pub(crate) fn get_str(row: &AnyRow, col: &str) -> Result<String> {
    Ok(row.try_get::<String, _>(col)?)
}

pub(crate) fn get_opt_str(row: &AnyRow, col: &str) -> Result<Option<String>> {
    Ok(row.try_get::<Option<String>, _>(col)?)
}

pub(crate) fn get_i64(row: &AnyRow, col: &str) -> Result<i64> {
    Ok(row.try_get::<i64, _>(col)?)
}

pub(crate) fn get_opt_i64(row: &AnyRow, col: &str) -> Result<Option<i64>> {
    Ok(row.try_get::<Option<i64>, _>(col)?)
}
