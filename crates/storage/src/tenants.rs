//! Tenants: one city (or town, or village) each, with its security settings.

use crate::audit::{append, AuditEvent};
use crate::{conflict_on_unique, get_i64, get_opt_str, get_str, Result, StorageError, Store};
use domain::settings::TenantSettings;
use sqlx::any::AnyRow;

#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: String,
    /// Short name used in URLs and the CLI, e.g. `sample-city`.
    pub slug: String,
    /// e.g. `サンプル市`.
    pub name: String,
    /// The host name staff reach this tenant under, when several share one deployment.
    pub host: Option<String>,
    pub settings: TenantSettings,
    pub created_at: i64,
}

fn tenant_from(row: &AnyRow) -> Result<Tenant> {
    let raw = get_str(row, "settings")?;
    // Settings saved by an older version may lack newer keys: defaults fill them in.
    let settings: TenantSettings = serde_json::from_str(&raw)
        .map_err(|e| StorageError::Corrupt(format!("tenant settings: {e}")))?;
    Ok(Tenant {
        id: get_str(row, "id")?,
        slug: get_str(row, "slug")?,
        name: get_str(row, "name")?,
        host: get_opt_str(row, "host")?,
        settings,
        created_at: get_i64(row, "created_at")?,
    })
}

const COLUMNS: &str = "id, slug, name, host, settings, created_at";

impl Store {
    pub async fn create_tenant(
        &self,
        slug: &str,
        name: &str,
        host: Option<&str>,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Tenant> {
        let t = Tenant {
            id: domain::ids::new_id(),
            slug: slug.to_string(),
            name: name.to_string(),
            host: host.map(str::to_string),
            settings: TenantSettings::default(),
            created_at: now,
        };
        let settings =
            serde_json::to_string(&t.settings).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO tenants (id, slug, name, host, settings, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&t.id)
            .bind(&t.slug)
            .bind(&t.name)
            .bind(&t.host)
            .bind(&settings)
            .bind(t.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_on_unique(e, "同じ識別名またはホスト名の自治体が既にあります。"))?;
        let mut ev = audit.with(
            "tenant.create",
            format!("tenant:{}", t.id),
            serde_json::json!({"slug": slug, "name": name}),
        );
        ev.tenant_id = t.id.clone();
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(t)
    }

    pub async fn tenant_by_id(&self, id: &str) -> Result<Tenant> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        tenant_from(&row)
    }

    pub async fn tenant_by_slug(&self, slug: &str) -> Result<Tenant> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants WHERE slug = $1"))
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        tenant_from(&row)
    }

    pub async fn tenant_by_host(&self, host: &str) -> Result<Tenant> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants WHERE host = $1"))
            .bind(host.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        tenant_from(&row)
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants ORDER BY slug"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from).collect()
    }

    /// Saves validated settings; the audit record keeps the old and the new values.
    pub async fn update_tenant_settings(
        &self,
        tenant_id: &str,
        settings: &TenantSettings,
        audit: AuditEvent,
    ) -> Result<()> {
        let old = self.tenant_by_id(tenant_id).await?;
        let json =
            serde_json::to_string(settings).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE tenants SET settings = $1 WHERE id = $2")
            .bind(&json)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        let ev = audit.with(
            "settings.update",
            format!("tenant:{tenant_id}"),
            serde_json::json!({"before": old.settings, "after": settings}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(())
    }
}
