//! The `yakuba` server: routes, pages, the JSON API, sessions and the command line.

pub mod admin;
pub mod alerts_web;
pub mod api;
pub mod app;
pub mod assets;
pub mod backup;
pub mod charts;
pub mod chat;
pub mod chat_web;
pub mod clamd;
pub mod cli;
pub mod config;
pub mod csvout;
pub mod disposal_web;
pub mod embedding_web;
pub mod encryption;
pub mod error;
pub mod eval;
pub mod eval_web;
pub mod form;
pub mod index_feed;
pub mod knowledge;
pub mod knowledge_vectors;
pub mod knowledge_web;
pub mod local_models;
pub mod logs_web;
pub mod markdown;
pub mod model_pull;
pub mod models_admin;
pub mod openapi;
pub mod ops;
pub mod pages;
pub mod retention_web;
pub mod templates_web;
pub mod tenant_export;
pub mod tokens_web;
pub mod usage;
pub mod usage_web;

use app::{AppState, Shared};
use config::Config;
use domain::Clock;
use std::net::SocketAddr;
use std::sync::Arc;
use storage::{AuditEvent, Store};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("データディレクトリ {0} を作成できません: {1}")]
    DataDir(String, String),
    #[error("データベースに接続できません: {0}")]
    Database(String),
    #[error("{0}")]
    Other(String),
}

/// Opens the database (creating and migrating it when needed) and makes sure the default
/// tenant exists.
pub async fn open_store(config: &Config, now: i64) -> Result<(Store, String), StartError> {
    let url = config.database_url();
    if url.starts_with("sqlite:") {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            StartError::DataDir(config.data_dir.display().to_string(), e.to_string())
        })?;
    }
    let store = Store::connect(&url, config.database_max_connections)
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    let applied = store
        .migrate()
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "database migrated");
    }
    let tenant = match store.tenant_by_slug(&config.default_tenant).await {
        Ok(t) => t,
        Err(storage::StorageError::NotFound) => {
            let ev = AuditEvent {
                at_ms: now,
                actor_login: "system".into(),
                ip: "-".into(),
                ..Default::default()
            };
            let t = store
                .create_tenant(
                    &config.default_tenant,
                    &config.default_tenant_name,
                    None,
                    now,
                    ev,
                )
                .await
                .map_err(|e| StartError::Database(e.to_string()))?;
            tracing::info!(slug = %t.slug, "default tenant created");
            t
        }
        Err(e) => return Err(StartError::Database(e.to_string())),
    };
    Ok((store, tenant.id))
}

/// Builds the shared state for a running server.
pub async fn build_state(config: Config, clock: Arc<dyn Clock>) -> Result<Shared, StartError> {
    let (store, default_tenant_id) = open_store(&config, clock.now_ms()).await?;
    let sqlite = store.backend() == storage::Backend::Sqlite;
    if sqlite {
        // One process is the only worker on SQLite: a job still "running" was cut off.
        let n = store
            .requeue_running_jobs()
            .await
            .map_err(|e| StartError::Database(e.to_string()))?;
        if n > 0 {
            tracing::warn!(
                jobs = n,
                "ingestion jobs cut off by a restart are queued again"
            );
        }
    }
    let blobs = encryption::open(&config, &store, clock.clone(), true)
        .await
        .map_err(StartError::Other)?;
    let cost = config.hash_cost();
    let dummy_hash = tokio::task::spawn_blocking(move || {
        domain::password::hash(&domain::ids::random_token(16), cost)
    })
    .await
    .map_err(|e| StartError::Other(e.to_string()))?
    .map_err(|e| StartError::Other(e.to_string()))?;
    llm::local::configure(llm::local::Settings {
        max_concurrent: config.local_model.max_concurrent,
        max_context: config.local_model.max_context,
    });
    let morph = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || knowledge::morph(&config))
            .await
            .map_err(|e| StartError::Other(e.to_string()))?
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    Ok(Arc::new(AppState {
        store,
        blobs,
        clock,
        config: Arc::new(config),
        default_tenant_id,
        hash_slots: Arc::new(tokio::sync::Semaphore::new(cores * 2)),
        dummy_hash,
        llm_clients: Default::default(),
        tenants: app::TtlCache::new(std::time::Duration::from_secs(5)),
        catalogs: app::TtlCache::new(std::time::Duration::from_secs(5)),
        meter: Arc::new(usage::Meter::new(sqlite)),
        indexes: Default::default(),
        vectors: Default::default(),
        morph,
        ingest: Default::default(),
    }))
}

/// Removes sessions past any possible time-out and stale import previews, every ten
/// minutes, for as long as the server runs. Requests check time-outs themselves; this only
/// keeps the tables small.
pub fn spawn_housekeeping(state: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
        loop {
            tick.tick().await;
            let now = state.now();
            // The longest idle and absolute limits a tenant may set (see TenantSettings::validate).
            let idle_before = now - 480 * domain::clock::MINUTE_MS;
            let created_before = now - 1440 * domain::clock::MINUTE_MS;
            match state
                .store
                .purge_sessions(idle_before, created_before)
                .await
            {
                Ok(n) if n > 0 => tracing::info!(sessions = n, "expired sessions removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "session housekeeping failed"),
            }
            if let Err(e) = alerts_web::run(&state).await {
                tracing::warn!(error = %e, "audit log analysis failed");
            }
            if let Err(e) = retention_web::run(&state).await {
                tracing::warn!(error = %e, "retention run failed");
            }
            if let Err(e) = state
                .store
                .purge_pending_imports(now - domain::clock::DAY_MS)
                .await
            {
                tracing::warn!(error = %e, "import housekeeping failed");
            }
        }
    })
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    local_models::offer_first_run(&state, &state.default_tenant_id.clone()).await;
    encryption::clear_work_area(
        &state.config,
        state.store.backend() == storage::Backend::Sqlite,
    );
    let sealing = encryption::spawn_legacy_sealing(state.clone());
    let worker = knowledge::spawn_worker(state.clone());
    let follower = index_feed::spawn(state.clone());
    let app = app::router(state);
    // Without TCP_NODELAY the first small delta after the response headers waits for the
    // client's delayed ACK (about 40 ms on Linux): streamed text must go out at once.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    worker.abort();
    follower.abort();
    sealing.abort();
    served
}
