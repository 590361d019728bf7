//! The blob store: uploaded files at rest, encrypted per tenant (S15), by envelope
//! encryption.
//!
//! - Each tenant has a **data key** (256 random bits) made on its first file and kept in
//!   `tenant_keys` **wrapped** by the installation's **master key** ([`MasterKey`]), which
//!   the operator holds outside the database and its backups.
//! - Each file is **sealed** with the tenant's current data key in segments
//!   ([`format`]: header, then XChaCha20-Poly1305 STREAM segments of 64 KiB), while it
//!   streams from the uploaded file to the store; reading opens it segment by segment. A
//!   100 MB file is never held whole, and a changed, cut or reordered file fails with
//!   [`StorageError::Integrity`] instead of yielding garbage.
//! - Files keep their names: the SHA-256 of the plaintext, checked while sealing, so two
//!   uploads of the same content share one file.
//! - Deleting a tenant's key rows (tenant disposal) makes all its files unreadable at once,
//!   whichever copies of them exist (crypto-shredding).
//! - Files written before encryption (plaintext, no header) still open
//!   ([`format::Opened::Legacy`]); [`BlobStore::seal_legacy`] seals them in place.
//!
//! Where the sealed bytes live is an [`ObjectStore`]: a directory ([`FsObjects`]) now; an
//! S3-compatible bucket can implement the same operations (PUT of a whole object, GET,
//! HEAD, DELETE, listing and deleting by prefix), since the store only ever writes whole
//! objects from a stream and reads them front to back.
//!
//! Limits: reads and writes block, so the `*_sync` methods belong on blocking threads; the
//! async ones move there themselves. The decrypted copies that OCR needs are the caller's
//! to make and remove.

mod format;
mod fs;
mod keys;

pub use format::{is_sealed, Opened, Opener, HEADER_LEN, SEGMENT};
pub use fs::FsObjects;
pub use keys::{MasterKey, TenantKeys};

use crate::{AuditEvent, Result, StorageError, Store};
use domain::Clock;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

/// Where sealed objects are kept, by tenant and name. Every method blocks.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores all that `body` yields as the object, whole or not at all: when `body` or the
    /// store fails, nothing is left in its place and an object already there is unchanged.
    fn put(&self, tenant: &str, name: &str, body: &mut dyn Read) -> io::Result<u64>;
    fn get(&self, tenant: &str, name: &str) -> io::Result<Box<dyn Read + Send>>;
    fn exists(&self, tenant: &str, name: &str) -> io::Result<bool>;
    /// Removes the object; one that is not there is not an error.
    fn delete(&self, tenant: &str, name: &str) -> io::Result<()>;
    /// Removes every object of the tenant.
    fn delete_tenant(&self, tenant: &str) -> io::Result<()>;
    /// The names of the tenant's objects, sorted.
    fn list(&self, tenant: &str) -> io::Result<Vec<String>>;
}

impl From<io::Error> for StorageError {
    /// A failed integrity check travels through `std::io::Read` as `InvalidData`; it comes
    /// back out as itself.
    fn from(e: io::Error) -> StorageError {
        if e.get_ref().is_some_and(|i| i.is::<StorageError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(s) = inner.downcast::<StorageError>() {
                    return *s;
                }
            }
            return StorageError::Integrity(format::TAMPERED.into());
        }
        StorageError::Io(e)
    }
}

/// A stored file being read (sealed or legacy): plaintext through `Read`.
pub type BlobReader = Opened<Box<dyn Read + Send>>;

/// What [`BlobStore::seal_legacy`] did for one tenant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SealReport {
    /// Plaintext files sealed now.
    pub sealed: u64,
    /// Files that were sealed already.
    pub already: u64,
    /// Files that could not be sealed, with why (left as they were).
    pub failed: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct BlobStore {
    objects: Arc<dyn ObjectStore>,
    master: Arc<MasterKey>,
    store: Store,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("objects", &self.objects)
            .field("master", &self.master)
            .finish()
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> StorageError {
    StorageError::Io(io::Error::other(e.to_string()))
}

impl BlobStore {
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        master: MasterKey,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> BlobStore {
        BlobStore {
            objects,
            master: Arc::new(master),
            store,
            clock,
        }
    }

    pub fn objects(&self) -> &dyn ObjectStore {
        &*self.objects
    }

    /// The master key's fingerprint (safe to log).
    pub fn master_key_id(&self) -> &str {
        self.master.id()
    }

    /// The tenant's keys, for reading (possibly none).
    pub async fn keys(&self, tenant_id: &str) -> Result<TenantKeys> {
        self.store.tenant_keys(tenant_id, &self.master).await
    }

    /// The tenant's keys, for writing: its first key is made now if it has none, audited
    /// with `audit` when given.
    pub async fn keys_for_writing(
        &self,
        tenant_id: &str,
        audit: Option<AuditEvent>,
    ) -> Result<TenantKeys> {
        self.store
            .ensure_tenant_key(tenant_id, &self.master, self.clock.now_ms(), audit)
            .await
    }

    /// Seals what `plain` yields and stores it as `name`, which must be its SHA-256 (the
    /// file is not stored when it is not). Blocks.
    pub fn put_sync(&self, keys: &TenantKeys, name: &str, plain: &mut dyn Read) -> Result<u64> {
        let expected = format::content_hash(name)?;
        let (key_id, key) = keys
            .current()
            .ok_or_else(|| StorageError::Key("この自治体の暗号鍵がありません。".into()))?;
        let mut sealer = format::Sealer::new(plain, key, key_id, keys.tenant_id(), name, expected);
        Ok(self.objects.put(keys.tenant_id(), name, &mut sealer)?)
    }

    /// Opens a stored file for reading. Blocks.
    pub fn open_sync(&self, keys: &TenantKeys, name: &str) -> Result<BlobReader> {
        let raw = self.objects.get(keys.tenant_id(), name)?;
        format::open(raw, keys, keys.tenant_id(), name)
    }

    /// Seals the file at `src` into the store as `name` (its SHA-256) for the tenant, unless
    /// the tenant has it already in a form its keys open. `by` is who stores it, for the
    /// record of a key made now. Returns whether it was written.
    pub async fn put_file(
        &self,
        tenant_id: &str,
        name: &str,
        src: &Path,
        by: AuditEvent,
    ) -> Result<bool> {
        let keys = self.keys_for_writing(tenant_id, Some(by)).await?;
        let (this, n, src) = (self.clone(), name.to_string(), src.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<bool> {
            if this.objects.exists(keys.tenant_id(), &n)? {
                // The same content is there. A copy sealed with a key that is gone (left
                // behind by a disposal that could not remove it) is replaced, not reused.
                match this.open_sync(&keys, &n) {
                    Ok(_) => return Ok(false),
                    Err(StorageError::Integrity(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let mut f = std::fs::File::open(&src)?;
            this.put_sync(&keys, &n, &mut f)?;
            Ok(true)
        })
        .await
        .map_err(blocking_failed)?
    }

    /// The whole plaintext of a stored file (for extraction, which needs it in memory).
    pub async fn read(&self, tenant_id: &str, name: &str) -> Result<Vec<u8>> {
        let keys = self.keys(tenant_id).await?;
        let (this, n) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut r = this.open_sync(&keys, &n)?;
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .map_err(blocking_failed)?
    }

    pub async fn exists(&self, tenant_id: &str, name: &str) -> Result<bool> {
        let (objects, t, n) = (
            self.objects.clone(),
            tenant_id.to_string(),
            name.to_string(),
        );
        Ok(tokio::task::spawn_blocking(move || objects.exists(&t, &n))
            .await
            .map_err(blocking_failed)??)
    }

    pub async fn remove(&self, tenant_id: &str, name: &str) -> Result<()> {
        let (objects, t, n) = (
            self.objects.clone(),
            tenant_id.to_string(),
            name.to_string(),
        );
        Ok(tokio::task::spawn_blocking(move || objects.delete(&t, &n))
            .await
            .map_err(blocking_failed)??)
    }

    /// Removes every file of the tenant (its keys go with the tenant's rows).
    pub async fn remove_tenant(&self, tenant_id: &str) -> Result<()> {
        let (objects, t) = (self.objects.clone(), tenant_id.to_string());
        Ok(
            tokio::task::spawn_blocking(move || objects.delete_tenant(&t))
                .await
                .map_err(blocking_failed)??,
        )
    }

    /// Seals the tenant's files that an earlier version stored in plaintext, each in place
    /// (sealed to a temporary file, checked against its name, renamed over the plaintext),
    /// so a crash leaves every file either as it was or sealed. `by` records the key if one
    /// is made. Safe to run while the service runs and to run again.
    ///
    /// A file deleted while it is being sealed can come back sealed; it is then a file no
    /// document refers to, which the next deletion of the same content removes.
    pub async fn seal_legacy(&self, tenant_id: &str, by: AuditEvent) -> Result<SealReport> {
        let (objects, t) = (self.objects.clone(), tenant_id.to_string());
        let scan = tokio::task::spawn_blocking(move || -> io::Result<(Vec<String>, u64)> {
            let mut plain = Vec::new();
            let mut sealed = 0;
            for name in objects.list(&t)? {
                let mut head = Vec::with_capacity(format::MAGIC.len());
                objects
                    .get(&t, &name)?
                    .take(format::MAGIC.len() as u64)
                    .read_to_end(&mut head)?;
                if is_sealed(&head) {
                    sealed += 1;
                } else {
                    plain.push(name);
                }
            }
            Ok((plain, sealed))
        });
        let (plain, already) = scan.await.map_err(blocking_failed)??;
        let mut report = SealReport {
            already,
            ..Default::default()
        };
        if plain.is_empty() {
            return Ok(report);
        }
        let keys = self.keys_for_writing(tenant_id, Some(by)).await?;
        for name in plain {
            let (this, keys, n) = (self.clone(), keys.clone(), name.clone());
            // Some(sealed now), or None when the file went away since the scan.
            let done = tokio::task::spawn_blocking(move || -> Result<Option<bool>> {
                // Opened again: it may have been sealed (or removed) since the scan.
                let mut r = match this.open_sync(&keys, &n) {
                    Ok(r) => r,
                    Err(StorageError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                        return Ok(None)
                    }
                    Err(e) => return Err(e),
                };
                if !r.is_legacy() {
                    return Ok(Some(false));
                }
                this.put_sync(&keys, &n, &mut r)?;
                Ok(Some(true))
            })
            .await
            .map_err(blocking_failed)?;
            match done {
                Ok(Some(true)) => report.sealed += 1,
                Ok(Some(false)) => report.already += 1,
                Ok(None) => {}
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
