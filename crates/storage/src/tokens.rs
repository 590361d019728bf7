//! API tokens for a city's own systems: kept only as a digest, with scopes (`logs:read`),
//! an expiry, the time of last use, and revocation.

use crate::audit::{append, AuditEvent};
use crate::{get_i64, get_opt_i64, get_str, Result, StorageError, Store};
use sqlx::any::AnyRow;

#[derive(Clone, Debug, serde::Serialize)]
pub struct ApiToken {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl ApiToken {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

const COLS: &str =
    "id, tenant_id, name, scopes, created_by, created_at, expires_at, last_used_at, revoked_at";

fn from_row(r: &AnyRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        name: get_str(r, "name")?,
        scopes: get_str(r, "scopes")?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        created_by: get_str(r, "created_by")?,
        created_at: get_i64(r, "created_at")?,
        expires_at: get_i64(r, "expires_at")?,
        last_used_at: get_opt_i64(r, "last_used_at")?,
        revoked_at: get_opt_i64(r, "revoked_at")?,
    })
}

impl Store {
    #[allow(clippy::too_many_arguments)]
    pub async fn create_api_token(
        &self,
        tenant_id: &str,
        name: &str,
        scopes: &[String],
        digest: &str,
        created_by: &str,
        now: i64,
        expires_at: i64,
        audit: AuditEvent,
    ) -> Result<String> {
        let id = domain::ids::new_id();
        let mut tx = self.write_tx().await?;
        sqlx::query(&format!(
            "INSERT INTO api_tokens ({COLS}, token_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, $8)"
        ))
        .bind(&id)
        .bind(tenant_id)
        .bind(name)
        .bind(scopes.join(" "))
        .bind(created_by)
        .bind(now)
        .bind(expires_at)
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        append(
            &mut tx,
            &audit.with(
                "api_token.create",
                format!("api_token:{id}"),
                serde_json::json!({"name": name, "scopes": scopes, "expires_at": expires_at}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn list_api_tokens(&self, tenant_id: &str) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM api_tokens WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn revoke_api_token(
        &self,
        tenant_id: &str,
        id: &str,
        now: i64,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "api_token.revoke",
                format!("api_token:{id}"),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The token with this digest, whatever its state (the caller checks expiry,
    /// revocation, tenant and scope).
    pub async fn api_token_by_digest(&self, digest: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM api_tokens WHERE token_digest = $1"
        ))
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn touch_api_token(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}
