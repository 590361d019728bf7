//! Keys for files at rest: the installation's master key (held by the operator, outside
//! the database) and each tenant's data keys, kept in `tenant_keys` wrapped by it.
//!
//! A data key is 256 random bits; it is wrapped with XChaCha20-Poly1305 under the master
//! key, authenticated together with its tenant and key id, so a row copied to another
//! tenant, or read with another master key, does not unwrap. Keys are read from the
//! database on every use (one indexed row) and not cached: a tenant disposal that deletes
//! them takes effect on every node at once.

use crate::audit::{append, AuditEvent};
use crate::{count, get_i64, get_str, Result, StorageError, Store};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroizing;

use super::format::KEY_ID_LEN;

const WRONG_MASTER: &str = "マスターキーが、データベースに保存されている自治体の暗号鍵と合いません。バックアップから復元した場合や別のサーバーへ移した場合は、元の環境と同じマスターキー（storage.master_key_file で指定したファイル、または data_dir/keys/master.key）を使ってください。";

/// The key that wraps the tenants' data keys. Never stored in the database; shown to no
/// one (its `Debug` prints only its fingerprint).
pub struct MasterKey {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    fn from_bytes(key: Zeroizing<[u8; 32]>) -> MasterKey {
        // A fingerprint, not the key: SHA-256 of the key under a label of its own, cut to
        // 64 bits — enough to tell keys apart in a log, useless for finding the key.
        let mut h = Sha256::new();
        h.update(b"yakuba master key fingerprint v1\0");
        h.update(&key[..]);
        let id = hex::encode(&h.finalize()[..8]);
        MasterKey { key, id }
    }

    /// 256 fresh random bits.
    pub fn generate() -> MasterKey {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut key[..]);
        MasterKey::from_bytes(key)
    }

    /// 32 bytes written as 64 hexadecimal digits or in base64 (as `openssl rand -hex 32`
    /// or `openssl rand -base64 32` print them); surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<MasterKey> {
        let text = text.trim();
        let mut key = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
            return Ok(MasterKey::from_bytes(key));
        }
        use base64::Engine;
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap_or_default(),
        );
        if decoded.len() == 32 {
            key.copy_from_slice(&decoded);
            return Ok(MasterKey::from_bytes(key));
        }
        Err(StorageError::Key(
            "マスターキーの形式が正しくありません。32 バイトの乱数を16進数64桁（openssl rand -hex 32）か base64（openssl rand -base64 32）で書いてください。".into(),
        ))
    }

    /// The key as 64 hexadecimal digits, for the file it is kept in.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.key[..]))
    }

    /// Its fingerprint (16 hexadecimal digits), safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(GenericArray::from_slice(&self.key[..]))
    }
}

/// One data key, unwrapped.
#[derive(Clone)]
pub(crate) struct DataKey {
    version: i64,
    id: [u8; KEY_ID_LEN],
    key: Zeroizing<[u8; 32]>,
}

/// A tenant's data keys, newest first. Files name the key they were sealed with, so older
/// keys keep opening older files once a newer one exists.
#[derive(Clone)]
pub struct TenantKeys {
    tenant_id: String,
    keys: Vec<DataKey>,
}

impl fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<i64> = self.keys.iter().map(|k| k.version).collect();
        write!(f, "TenantKeys({}, versions {versions:?})", self.tenant_id)
    }
}

impl TenantKeys {
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// No key yet: nothing of the tenant has been sealed (or its keys were disposed of).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key new files are sealed with.
    pub(crate) fn current(&self) -> Option<(&[u8; KEY_ID_LEN], &[u8; 32])> {
        self.keys.first().map(|k| (&k.id, &*k.key))
    }

    pub(crate) fn by_id(&self, id: &[u8]) -> Option<&[u8; 32]> {
        self.keys.iter().find(|k| k.id[..] == *id).map(|k| &*k.key)
    }

    #[cfg(test)]
    pub(crate) fn for_test(tenant_id: &str, keys: &[([u8; KEY_ID_LEN], [u8; 32])]) -> TenantKeys {
        TenantKeys {
            tenant_id: tenant_id.to_string(),
            keys: keys
                .iter()
                .enumerate()
                .map(|(i, (id, key))| DataKey {
                    version: (keys.len() - i) as i64,
                    id: *id,
                    key: Zeroizing::new(*key),
                })
                .collect(),
        }
    }
}

fn wrap_aad(tenant_id: &str, key_id: &str) -> Vec<u8> {
    let mut v = b"yakuba tenant key v1\0".to_vec();
    v.extend_from_slice(tenant_id.as_bytes());
    v.push(0);
    v.extend_from_slice(key_id.as_bytes());
    v
}

fn wrap(master: &MasterKey, tenant_id: &str, key_id: &str, key: &[u8; 32]) -> Result<String> {
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = wrap_aad(tenant_id, key_id);
    let sealed = master
        .cipher()
        .encrypt(
            GenericArray::from_slice(&nonce),
            Payload {
                msg: &key[..],
                aad: &aad,
            },
        )
        .map_err(|_| StorageError::Key("暗号鍵を保護できませんでした。".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(hex::encode(out))
}

fn unwrap_row(master: &MasterKey, r: &sqlx::any::AnyRow) -> Result<DataKey> {
    let tenant_id = get_str(r, "tenant_id")?;
    let key_id_hex = get_str(r, "key_id")?;
    let wrapped = hex::decode(get_str(r, "wrapped")?)
        .map_err(|_| StorageError::Corrupt("tenant_keys.wrapped is not hex".into()))?;
    let mut id = [0u8; KEY_ID_LEN];
    hex::decode_to_slice(&key_id_hex, &mut id)
        .map_err(|_| StorageError::Corrupt("tenant_keys.key_id is not a key id".into()))?;
    if wrapped.len() < 24 {
        return Err(StorageError::Corrupt(
            "tenant_keys.wrapped is too short".into(),
        ));
    }
    let (nonce, sealed) = wrapped.split_at(24);
    let aad = wrap_aad(&tenant_id, &key_id_hex);
    let plain = Zeroizing::new(
        master
            .cipher()
            .decrypt(
                GenericArray::from_slice(nonce),
                Payload { msg: sealed, aad: &aad },
            )
            .map_err(|_| {
                let wrapped_by = get_str(r, "master_key_id").unwrap_or_default();
                StorageError::Key(if wrapped_by != master.id() {
                    format!(
                        "{WRONG_MASTER}（鍵は指紋 {wrapped_by} のマスターキーで保護されています。使用中のマスターキーの指紋は {} です）",
                        master.id()
                    )
                } else {
                    // Same master key, yet the row does not open: it was changed.
                    "データベースの暗号鍵の行が書き換えられているため、開けません。".into()
                })
            })?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(StorageError::Corrupt("a tenant key is not 32 bytes".into()));
    }
    key.copy_from_slice(&plain);
    Ok(DataKey {
        version: get_i64(r, "version")?,
        id,
        key,
    })
}

impl Store {
    /// The tenant's data keys (none when nothing has been sealed for it yet).
    pub async fn tenant_keys(&self, tenant_id: &str, master: &MasterKey) -> Result<TenantKeys> {
        let rows = sqlx::query(
            "SELECT tenant_id, version, key_id, wrapped, master_key_id FROM tenant_keys \
             WHERE tenant_id = $1 ORDER BY version DESC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(TenantKeys {
            tenant_id: tenant_id.to_string(),
            keys: rows
                .iter()
                .map(|r| unwrap_row(master, r))
                .collect::<Result<_>>()?,
        })
    }

    /// The tenant's keys, creating its first data key when it has none. The creation is
    /// audited with `audit` (as `tenant_key.create`) in the same transaction; without one
    /// (an import, which adds nothing of its own to the tenant's records) it is only logged.
    pub async fn ensure_tenant_key(
        &self,
        tenant_id: &str,
        master: &MasterKey,
        now: i64,
        audit: Option<AuditEvent>,
    ) -> Result<TenantKeys> {
        let keys = self.tenant_keys(tenant_id, master).await?;
        if !keys.is_empty() {
            return Ok(keys);
        }
        let mut tx = self.write_tx().await?;
        // Another request (or node) may have made it since the read above.
        let made = count(
            &mut tx,
            "SELECT COUNT(*) AS n FROM tenant_keys WHERE tenant_id = $1",
            &[tenant_id],
        )
        .await?;
        if made == 0 {
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(&mut key[..]);
            let mut id = [0u8; KEY_ID_LEN];
            rand::rngs::OsRng.fill_bytes(&mut id);
            let key_id = hex::encode(id);
            let wrapped = wrap(master, tenant_id, &key_id, &key)?;
            let inserted = sqlx::query(
                "INSERT INTO tenant_keys (tenant_id, version, key_id, wrapped, master_key_id, created_at) \
                 VALUES ($1, 1, $2, $3, $4, $5)",
            )
            .bind(tenant_id)
            .bind(&key_id)
            .bind(&wrapped)
            .bind(master.id())
            .bind(now)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {
                    if let Some(ev) = audit {
                        append(
                            &mut tx,
                            &ev.with(
                                "tenant_key.create",
                                format!("tenant:{tenant_id}"),
                                serde_json::json!({"key_id": key_id, "version": 1, "master_key_id": master.id()}),
                            ),
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    tracing::info!(tenant = %tenant_id, key_id = %key_id, "file encryption key created");
                }
                // PostgreSQL: a concurrent creation won; use its key.
                Err(e)
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) =>
                {
                    tx.rollback().await?;
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            tx.rollback().await?;
        }
        self.tenant_keys(tenant_id, master).await
    }

    /// How many tenant keys there are (whether a master key must already exist).
    pub async fn tenant_key_count(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM tenant_keys")
            .fetch_one(&self.pool)
            .await?;
        get_i64(&r, "n")
    }

    /// Unwraps every tenant key with `master`, so a start with the wrong master key stops
    /// with a clear message instead of failing on each file. Returns how many there are.
    pub async fn verify_tenant_keys(&self, master: &MasterKey) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT tenant_id, version, key_id, wrapped, master_key_id FROM tenant_keys ORDER BY tenant_id, version",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            unwrap_row(master, r)?;
        }
        Ok(rows.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn master_keys_parse_from_hex_and_base64_and_never_print() {
        let k = MasterKey::generate();
        let hex = k.to_hex();
        let again = MasterKey::parse(&format!("  {}\n", &*hex)).unwrap();
        assert_eq!(again.id(), k.id());
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(hex::decode(&*hex).unwrap());
        assert_eq!(MasterKey::parse(&b64).unwrap().id(), k.id());
        assert!(!format!("{k:?}").contains(&hex[..16]));
        assert_ne!(MasterKey::generate().id(), k.id());
        for bad in ["", "abc", &hex[..62], "zz".repeat(32).as_str()] {
            let e = MasterKey::parse(bad).unwrap_err().to_string();
            assert!(e.contains("マスターキーの形式"), "{e}");
        }
    }
}
