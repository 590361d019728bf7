//! The file format on real files: sizes around the segment boundary, and every way a
//! stored file can be wrong failing with a clear error rather than yielding bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::format::{self, HEADER_LEN, SEGMENT};
use super::keys::TenantKeys;
use super::{FsObjects, ObjectStore};
use crate::StorageError;
use sha2::{Digest, Sha256};
use std::io::Read;

const TENANT: &str = "0190aaaa-tenant";

fn keys(tenant: &str, seed: u8) -> TenantKeys {
    TenantKeys::for_test(tenant, &[([seed; 16], [seed.wrapping_add(1); 32])])
}

fn name_of(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic, not repetitive within a segment (so a swapped segment is a real change).
fn data(len: usize) -> Vec<u8> {
    let mut x: u32 = 2_463_534_242;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn seal(objects: &FsObjects, keys: &TenantKeys, plain: &[u8]) -> String {
    let name = name_of(plain);
    let (id, key) = keys.current().unwrap();
    let mut s = format::Sealer::new(
        plain,
        key,
        id,
        keys.tenant_id(),
        &name,
        format::content_hash(&name).unwrap(),
    );
    objects.put(keys.tenant_id(), &name, &mut s).unwrap();
    name
}

fn open_all(
    objects: &FsObjects,
    keys: &TenantKeys,
    tenant: &str,
    name: &str,
) -> Result<Vec<u8>, StorageError> {
    let raw = objects.get(tenant, name)?;
    let mut r = format::open(raw, keys, tenant, name)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

fn segments(len: usize) -> usize {
    len.div_ceil(SEGMENT).max(1)
}

#[test]
fn files_round_trip_around_the_segment_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let objects = FsObjects::new(dir.path().join("files"));
    let k = keys(TENANT, 1);
    for len in [
        0,
        1,
        100,
        SEGMENT - 1,
        SEGMENT,
        SEGMENT + 1,
        2 * SEGMENT,
        3 * SEGMENT + 7,
    ] {
        let plain = data(len);
        let name = seal(&objects, &k, &plain);
        let path = objects.path(TENANT, &name);
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(
            stored.len(),
            HEADER_LEN + len + 16 * segments(len),
            "{len} bytes"
        );
        assert!(format::is_sealed(&stored));
        assert_eq!(
            open_all(&objects, &k, TENANT, &name).unwrap(),
            plain,
            "{len}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }
    // Nothing is left behind in the work area.
    assert_eq!(std::fs::read_dir(objects.tmp_dir()).unwrap().count(), 0);
    // A Japanese phrase does not appear in what is stored.
    let phrase = "住民票の写しの交付手数料は三百円とする。".repeat(50);
    let name = seal(&objects, &k, phrase.as_bytes());
    let stored = std::fs::read(objects.path(TENANT, &name)).unwrap();
    assert!(!stored
        .windows("住民票".len())
        .any(|w| w == "住民票".as_bytes()));
}

/// Stores `plain`, lets `damage` change the stored bytes, and returns the error on reading.
fn damaged(plain: &[u8], damage: impl FnOnce(&mut Vec<u8>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let objects = FsObjects::new(dir.path());
    let k = keys(TENANT, 1);
    let name = seal(&objects, &k, plain);
    let path = objects.path(TENANT, &name);
    let mut bytes = std::fs::read(&path).unwrap();
    damage(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    match open_all(&objects, &k, TENANT, &name) {
        Ok(_) => panic!("a damaged file opened"),
        Err(e @ StorageError::Integrity(_)) => e.to_string(),
        Err(e) => panic!("not an integrity error: {e:?}"),
    }
}

#[test]
fn tampered_truncated_and_reordered_files_fail_clearly() {
    let plain = data(3 * SEGMENT + 100);
    let seg = SEGMENT + 16;
    // One changed byte: in the first segment, the last one, a tag, the header.
    for at in [
        HEADER_LEN + 5,
        HEADER_LEN + 3 * seg + 50,
        HEADER_LEN + seg - 1,
        30,
    ] {
        let e = damaged(&plain, |b| b[at] ^= 0x01);
        assert!(e.contains("改ざん"), "{at}: {e}");
    }
    // Cut at a segment boundary (the previous segment is not marked last), inside a
    // segment, right after the header, inside the header.
    for len in [HEADER_LEN + seg, HEADER_LEN + seg + 10, HEADER_LEN] {
        let e = damaged(&plain, |b| b.truncate(len));
        assert!(e.contains("改ざん") || e.contains("切れて"), "{len}: {e}");
    }
    let e = damaged(&plain, |b| b.truncate(HEADER_LEN - 3));
    assert!(e.contains("切れて"), "{e}");
    // Two segments swapped; one repeated; bytes appended.
    let e = damaged(&plain, |b| {
        let (first, second) = (
            HEADER_LEN..HEADER_LEN + seg,
            HEADER_LEN + seg..HEADER_LEN + 2 * seg,
        );
        let a = b[first.clone()].to_vec();
        let c = b[second.clone()].to_vec();
        b[first].copy_from_slice(&c);
        b[second].copy_from_slice(&a);
    });
    assert!(e.contains("改ざん"), "{e}");
    let e = damaged(&plain, |b| {
        let s = b[HEADER_LEN..HEADER_LEN + seg].to_vec();
        b.splice(HEADER_LEN + seg..HEADER_LEN + seg, s);
    });
    assert!(e.contains("改ざん"), "{e}");
    let e = damaged(&plain, |b| b.extend_from_slice(b"extra"));
    assert!(e.contains("改ざん"), "{e}");
    // An empty file's only segment is its tag; without it nothing opens.
    let e = damaged(b"", |b| b.truncate(HEADER_LEN));
    assert!(e.contains("改ざん"), "{e}");
    // A format from a newer version is named as such.
    let e = damaged(b"x", |b| b[6] = 9);
    assert!(e.contains("新しい版"), "{e}");
}

#[test]
fn a_file_opens_only_for_its_tenant_key_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let objects = FsObjects::new(dir.path());
    let mine = keys(TENANT, 1);
    let plain = "会議録（非公開）".as_bytes().to_vec();
    let name = seal(&objects, &mine, &plain);
    // Another tenant's keys do not have the file's key.
    let theirs = keys("0190bbbb-other", 7);
    let e = open_all(&objects, &theirs, TENANT, &name).unwrap_err();
    assert!(
        matches!(&e, StorageError::Integrity(m) if m.contains("この自治体の暗号鍵")),
        "{e:?}"
    );
    // A key with the same id but other bits (a forged or damaged key row) fails the check.
    let forged = TenantKeys::for_test(TENANT, &[([1; 16], [9; 32])]);
    assert!(matches!(
        open_all(&objects, &forged, TENANT, &name),
        Err(StorageError::Integrity(_))
    ));
    // Copied under another tenant or another name, the file does not open.
    let other_tenant = "0190cccc-copy";
    let elsewhere = objects.path(other_tenant, &name);
    std::fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    std::fs::copy(objects.path(TENANT, &name), &elsewhere).unwrap();
    let moved = TenantKeys::for_test(other_tenant, &[([1; 16], [2; 32])]);
    assert!(matches!(
        open_all(&objects, &moved, other_tenant, &name),
        Err(StorageError::Integrity(_))
    ));
    let other_name = name_of(b"another file");
    let renamed = objects.path(TENANT, &other_name);
    std::fs::create_dir_all(renamed.parent().unwrap()).unwrap();
    std::fs::copy(objects.path(TENANT, &name), &renamed).unwrap();
    assert!(matches!(
        open_all(&objects, &mine, TENANT, &other_name),
        Err(StorageError::Integrity(_))
    ));
    // An older key keeps opening the files sealed with it once a newer one exists.
    let rotated = TenantKeys::for_test(TENANT, &[([3; 16], [4; 32]), ([1; 16], [2; 32])]);
    assert_eq!(open_all(&objects, &rotated, TENANT, &name).unwrap(), plain);
}

#[test]
fn content_that_is_not_its_name_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let objects = FsObjects::new(dir.path());
    let k = keys(TENANT, 1);
    let name = name_of(b"what the upload said");
    let (id, key) = k.current().unwrap();
    let plain = data(2 * SEGMENT);
    let mut s = format::Sealer::new(
        &plain[..],
        key,
        id,
        TENANT,
        &name,
        format::content_hash(&name).unwrap(),
    );
    let e = StorageError::from(objects.put(TENANT, &name, &mut s).unwrap_err());
    assert!(
        matches!(&e, StorageError::Integrity(m) if m.contains("ハッシュ")),
        "{e:?}"
    );
    assert!(!objects.exists(TENANT, &name).unwrap());
    assert_eq!(std::fs::read_dir(objects.tmp_dir()).unwrap().count(), 0);
    assert!(format::content_hash("../../etc/passwd").is_err());
    assert!(format::content_hash(&name.to_uppercase()).is_err());
}

#[test]
fn plaintext_from_before_encryption_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let objects = FsObjects::new(dir.path());
    let k = keys(TENANT, 1);
    for plain in [
        b"".to_vec(),
        b"YKB".to_vec(),
        "旧版で保存した文書".as_bytes().to_vec(),
        data(SEGMENT + 3),
    ] {
        let name = name_of(&plain);
        let path = objects.path(TENANT, &name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &plain).unwrap();
        let r = format::open(objects.get(TENANT, &name).unwrap(), &k, TENANT, &name).unwrap();
        assert!(r.is_legacy());
        assert_eq!(open_all(&objects, &k, TENANT, &name).unwrap(), plain);
    }
    // Even for a tenant without keys.
    let none = TenantKeys::for_test(TENANT, &[]);
    let name = name_of(b"YKB");
    assert_eq!(open_all(&objects, &none, TENANT, &name).unwrap(), b"YKB");
    assert_eq!(objects.list(TENANT).unwrap().len(), 4);
    objects.delete_tenant(TENANT).unwrap();
    assert!(objects.list(TENANT).unwrap().is_empty());
}
