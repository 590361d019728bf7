//! Schema migrations, one SQL file per version and backend, applied in order inside a
//! transaction each. On PostgreSQL an advisory lock keeps several app nodes that start at
//! once from migrating twice.

use crate::{Backend, Result, StorageError, Store};
use sqlx::{Executor, Row};

struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: include_str!("../migrations/sqlite/0001_foundation.sql"),
        postgres: include_str!("../migrations/postgres/0001_foundation.sql"),
    },
    Migration {
        version: 2,
        sqlite: include_str!("../migrations/sqlite/0002_chat.sql"),
        postgres: include_str!("../migrations/postgres/0002_chat.sql"),
    },
    Migration {
        version: 3,
        sqlite: include_str!("../migrations/sqlite/0003_attachments.sql"),
        postgres: include_str!("../migrations/postgres/0003_attachments.sql"),
    },
    Migration {
        version: 4,
        sqlite: include_str!("../migrations/sqlite/0004_usage.sql"),
        postgres: include_str!("../migrations/postgres/0004_usage.sql"),
    },
    Migration {
        version: 5,
        sqlite: include_str!("../migrations/sqlite/0005_templates.sql"),
        postgres: include_str!("../migrations/postgres/0005_templates.sql"),
    },
    Migration {
        version: 6,
        sqlite: include_str!("../migrations/sqlite/0006_chat_logs.sql"),
        postgres: include_str!("../migrations/postgres/0006_chat_logs.sql"),
    },
    Migration {
        version: 7,
        sqlite: include_str!("../migrations/sqlite/0007_api_tokens.sql"),
        postgres: include_str!("../migrations/postgres/0007_api_tokens.sql"),
    },
    Migration {
        version: 8,
        sqlite: include_str!("../migrations/sqlite/0008_retention.sql"),
        postgres: include_str!("../migrations/postgres/0008_retention.sql"),
    },
    Migration {
        version: 9,
        sqlite: include_str!("../migrations/sqlite/0009_records.sql"),
        postgres: include_str!("../migrations/postgres/0009_records.sql"),
    },
    Migration {
        version: 10,
        sqlite: include_str!("../migrations/sqlite/0010_knowledge.sql"),
        postgres: include_str!("../migrations/postgres/0010_knowledge.sql"),
    },
    Migration {
        version: 11,
        sqlite: include_str!("../migrations/sqlite/0011_vectors.sql"),
        postgres: include_str!("../migrations/postgres/0011_vectors.sql"),
    },
    Migration {
        version: 12,
        sqlite: include_str!("../migrations/sqlite/0012_tenant_keys.sql"),
        postgres: include_str!("../migrations/postgres/0012_tenant_keys.sql"),
    },
];

/// The newest schema this binary knows.
pub const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

const LOCK_KEY: i64 = 0x7961_6b75_6261; // "yakuba"

pub(crate) async fn run(store: &Store) -> Result<Vec<i64>> {
    let mut conn = store.pool.acquire().await?;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    let result = apply(store.backend, &mut conn).await;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    result
}

async fn apply(backend: Backend, conn: &mut sqlx::AnyConnection) -> Result<Vec<i64>> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let rows = sqlx::query("SELECT version FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await?;
    let mut applied = Vec::new();
    for r in rows {
        applied.push(r.try_get::<i64, _>("version")?);
    }
    if let Some(max) = applied.iter().max() {
        if *max > MIGRATIONS.last().map(|m| m.version).unwrap_or(0) {
            return Err(StorageError::Migration(format!(
                "the database has schema version {max}, newer than this binary knows; upgrade yakuba"
            )));
        }
    }
    let mut done = Vec::new();
    for m in MIGRATIONS {
        if applied.contains(&m.version) {
            continue;
        }
        let sql = match backend {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| StorageError::Migration(format!("version {}: {e}", m.version)))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(m.version)
            .bind(chrono_now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        done.push(m.version);
    }
    Ok(done)
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
