//! Files at rest (S15): where the master key comes from, the blob store the server uses
//! (see `storage::blob` for the format and the per-tenant keys), the work area for files
//! in progress, and the sealing of files that versions before encryption stored in
//! plaintext.
//!
//! **The master key** comes from `storage.master_key_file` (or `storage.master_key`, or
//! `YAKUBA_STORAGE__MASTER_KEY_FILE`). When none is set — the embedded default, zero
//! setup — the first start makes one in `<data_dir>/keys/master.key` (0600, in a 0700
//! directory) and logs where, never the key. It is not in the database, not in
//! `yakuba backup` and not in a tenant export: keep a copy apart from the backups, because
//! a restore onto another machine (or after losing the data directory) needs it. A start
//! whose master key cannot open the tenant keys in the database stops with a message that
//! says so, and a start that has no master key while the database has tenant keys does not
//! make a new one (that would only hide the problem).
//!
//! **Upgrades**: each start seals, in the background, the files an earlier version stored
//! in plaintext; they are readable all the while. `yakuba knowledge encrypt-files` does the
//! same at once and reports, for an IT department that wants it done and confirmed (for
//! example before opening the service after the upgrade). Both are audited per tenant as
//! `files.encrypt`.
//!
//! Limits: the decrypted copy that OCR needs lies in the work area for the time of one
//! document's OCR; pdftoppm's page images go to the system's temporary directory as before.

use crate::app::Shared;
use crate::config::Config;
use domain::Clock;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage::{AuditEvent, BlobStore, FsObjects, MasterKey, SealReport, Store, Tenant};

/// The master key made at the first start when none is configured.
pub fn master_key_path(config: &Config) -> PathBuf {
    config.data_dir.join("keys").join("master.key")
}

/// Uploads being received, files being sealed, decrypted copies for OCR. Not backed up.
pub fn work_dir(config: &Config) -> PathBuf {
    config.data_dir.join("files").join("tmp")
}

fn missing(config: &Config, keys: i64) -> String {
    format!(
        "ファイルの暗号化に使うマスターキーがありません（storage.master_key_file の指定も {} もありません）。データベースには自治体の暗号鍵が {keys} 件あり、元のマスターキーがないと保存されたファイルを読めません。バックアップから復元した場合や別のサーバーへ移した場合は、元の環境のマスターキーのファイルをこの場所に置くか、storage.master_key_file で指定してください。",
        master_key_path(config).display()
    )
}

/// The master key: configured, or the one in the data directory, or — when `create` and
/// the database holds no tenant keys yet — a new one written there.
pub async fn master_key(config: &Config, store: &Store, create: bool) -> Result<MasterKey, String> {
    let configured = config.storage.master_key.expose();
    if !configured.is_empty() {
        return MasterKey::parse(configured)
            .map_err(|e| format!("storage.master_key（master_key_file）: {e}"));
    }
    let path = master_key_path(config);
    if let Some(key) = read_key_file(&path)? {
        return Ok(key);
    }
    let keys = store.tenant_key_count().await.map_err(|e| e.to_string())?;
    if keys > 0 || !create {
        return Err(missing(config, keys));
    }
    make_key_file(&path)
}

fn read_key_file(path: &Path) -> Result<Option<MasterKey>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("マスターキー {} を読めません: {e}", path.display())),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the master key file can be read by other users: chmod 600 it");
            }
        }
    }
    MasterKey::parse(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a new key to `path`, complete or not at all: to a private temporary file first,
/// then linked to its name, which fails if another process made one meanwhile (then that
/// one is used).
fn make_key_file(path: &Path) -> Result<MasterKey, String> {
    let io = |e: std::io::Error| format!("マスターキー {} を作成できません: {e}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| io(std::io::Error::other("no directory")))?;
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let key = MasterKey::generate();
    let mut tmp = tempfile::Builder::new()
        .prefix(".master.key.")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(format!("{}\n", &*key.to_hex()).as_bytes())
        .map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return read_key_file(path)?.ok_or_else(|| io(e));
        }
        Err(e) => return Err(io(e)),
    }
    drop(tmp);
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    tracing::warn!(
        path = %path.display(),
        fingerprint = %key.id(),
        "created the master key of the files at rest; keep a copy in a safe place apart from the backups (the backups do not contain it, and without it the stored files cannot be read)"
    );
    Ok(key)
}

/// The blob store over `<data_dir>/files`, after checking that the master key opens every
/// tenant key in the database.
pub async fn open(
    config: &Config,
    store: &Store,
    clock: Arc<dyn Clock>,
    create: bool,
) -> Result<BlobStore, String> {
    let key = master_key(config, store, create).await?;
    store
        .verify_tenant_keys(&key)
        .await
        .map_err(|e| e.to_string())?;
    Ok(BlobStore::new(
        Arc::new(FsObjects::new(config.data_dir.join("files"))),
        key,
        store.clone(),
        clock,
    ))
}

/// Removes what a process that stopped abruptly left in the work area: the service's own
/// staged uploads and OCR copies (plaintext) when it is the only service process (SQLite),
/// and anything older than a day. Files another command may be sealing right now
/// (`seal-…`, ciphertext) are left to age.
pub fn clear_work_area(config: &Config, only_process: bool) {
    let Ok(entries) = std::fs::read_dir(work_dir(config)) else {
        return;
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    let mut removed = 0;
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        let ours = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("upload-") || n.starts_with("ocr-"));
        if ((only_process && ours) || old) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(files = removed, "left-over work files removed");
    }
}

/// A decrypted copy of a document for a tool that reads files (pdftoppm), readable by this
/// user only (0600), in the work area; removed when the returned path is dropped, which
/// happens on every way out of the caller.
pub async fn plain_copy(
    config: &Config,
    bytes: Arc<Vec<u8>>,
) -> std::io::Result<tempfile::TempPath> {
    let dir = work_dir(config);
    tokio::task::spawn_blocking(move || -> std::io::Result<tempfile::TempPath> {
        std::fs::create_dir_all(&dir)?;
        let mut f = tempfile::Builder::new()
            .prefix("ocr-")
            .suffix(".pdf")
            .tempfile_in(&dir)?;
        f.write_all(&bytes)?;
        f.flush()?;
        Ok(f.into_temp_path())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Seals every plaintext file of `tenants`; audits `files.encrypt` with `event(tenant)` for
/// each tenant where something was sealed.
pub async fn seal_legacy(
    blobs: &BlobStore,
    store: &Store,
    tenants: &[Tenant],
    event: impl Fn(&str) -> AuditEvent,
) -> Vec<Result<SealReport, String>> {
    let mut out = Vec::new();
    for t in tenants {
        let r = match blobs.seal_legacy(&t.id, event(&t.id)).await {
            Ok(r) => r,
            Err(e) => {
                out.push(Err(e.to_string()));
                continue;
            }
        };
        if r.sealed > 0 || !r.failed.is_empty() {
            let failed: Vec<&str> = r.failed.iter().map(|(n, _)| n.as_str()).collect();
            let ev = event(&t.id).result(if r.failed.is_empty() {
                "success"
            } else {
                "partial"
            });
            if let Err(e) = store
                .append_audit(&ev.with(
                    "files.encrypt",
                    format!("tenant:{}", t.id),
                    serde_json::json!({"sealed": r.sealed, "already": r.already, "failed": failed}),
                ))
                .await
            {
                out.push(Err(e.to_string()));
                continue;
            }
        }
        out.push(Ok(r));
    }
    out
}

fn system_event(tenant_id: &str, now: i64) -> AuditEvent {
    AuditEvent {
        tenant_id: tenant_id.to_string(),
        at_ms: now,
        actor_login: "system".into(),
        ip: "-".into(),
        ..Default::default()
    }
}

/// At the start of the service: seals, in the background, what earlier versions left in
/// plaintext.
pub fn spawn_legacy_sealing(state: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tenants = match state.store.list_tenants().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "could not list tenants to seal their files");
                return;
            }
        };
        let now = state.now();
        let reports = seal_legacy(&state.blobs, &state.store, &tenants, |t| {
            system_event(t, now)
        })
        .await;
        for (t, r) in tenants.iter().zip(reports) {
            match r {
                Ok(r) if r.sealed > 0 || !r.failed.is_empty() => {
                    tracing::info!(tenant = %t.slug, sealed = r.sealed, failed = r.failed.len(), "files stored in plaintext by an earlier version were encrypted");
                    for (name, why) in &r.failed {
                        tracing::warn!(tenant = %t.slug, file = %name, reason = %why, "a stored file could not be encrypted");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(tenant = %t.slug, error = %e, "could not encrypt the stored files")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_master_key_is_made_once_privately_and_never_over_existing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let store = Store::connect(
            &format!("sqlite://{}", config.data_dir.join("y.db").display()),
            1,
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        // Not made where it must not be (a restore), made on a first start.
        assert!(master_key(&config, &store, false).await.is_err());
        let made = master_key(&config, &store, true).await.unwrap();
        let path = master_key_path(&config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
            let mode = std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        }
        assert_eq!(
            master_key(&config, &store, true).await.unwrap().id(),
            made.id()
        );
        // No temporary file is left next to it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        // A configured key wins; a malformed one is an error that names the setting.
        let mut other = config.clone();
        other.storage.master_key = crate::config::Secret("11".repeat(32));
        assert_ne!(
            master_key(&other, &store, true).await.unwrap().id(),
            made.id()
        );
        other.storage.master_key = crate::config::Secret("short".into());
        let e = master_key(&other, &store, true).await.unwrap_err();
        assert!(
            e.contains("storage.master_key") && !e.contains("short"),
            "{e}"
        );
        store.close().await;
    }

    #[test]
    fn the_work_area_loses_what_a_stopped_service_left() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let work = work_dir(&config);
        std::fs::create_dir_all(&work).unwrap();
        for n in ["upload-a1", "ocr-b2.pdf", "seal-c3"] {
            std::fs::write(work.join(n), "x").unwrap();
        }
        // Several processes (PostgreSQL): only what is old goes.
        clear_work_area(&config, false);
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 3);
        // The only process: its own plaintext goes; a sealing another command may be doing
        // now stays.
        clear_work_area(&config, true);
        let left: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["seal-c3"]);
    }
}
