//! Consistent copies of a running SQLite database (M7, S17): `VACUUM INTO` writes a
//! snapshot of one read transaction to a new file while the service keeps writing, and
//! the copy is compact (no free pages, so nothing already deleted travels with it).
//! PostgreSQL is backed up with its own tools (pg_dump, base backups with WAL archiving).

use crate::{get_i64, get_str, Backend, Result, StorageError, Store};
use std::path::Path;

impl Store {
    /// Writes a consistent copy of the database to `path` (which must not exist).
    pub async fn backup_into(&self, path: &Path) -> Result<()> {
        if self.backend != Backend::Sqlite {
            return Err(StorageError::Conflict(
                "PostgreSQL のバックアップは pg_dump またはベースバックアップ（WAL アーカイブによるポイントインタイムリカバリ）で行ってください（README の「バックアップと復元」を参照）。".into(),
            ));
        }
        let target = path.to_str().ok_or_else(|| {
            StorageError::Conflict("保存先のパスに使えない文字が含まれています。".into())
        })?;
        // VACUUM INTO takes an expression; a bound parameter keeps quotes in the path harmless.
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest migration applied.
    pub async fn schema_version(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        get_i64(&r, "v")
    }

    /// SQLite's own check of every page and index: `ok` or what is wrong.
    pub async fn integrity_check(&self) -> Result<String> {
        if self.backend != Backend::Sqlite {
            return Ok("ok".into());
        }
        let rows = sqlx::query("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await?;
        let lines: Vec<String> = rows
            .iter()
            .map(|r| get_str(r, "integrity_check"))
            .collect::<Result<_>>()?;
        Ok(lines.join("; "))
    }
}
