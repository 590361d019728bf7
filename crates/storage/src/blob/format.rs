//! The sealed file format. A file is a header, then the plaintext in segments of
//! [`SEGMENT`] bytes, each encrypted and authenticated on its own: XChaCha20-Poly1305 in
//! the STREAM construction (aead's `StreamBE32`), whose per-segment nonce is the file's
//! random prefix, the segment's position and a flag on the last segment. A changed byte, a
//! dropped, repeated or reordered segment, and a file cut short all fail to open; memory
//! stays at one segment whatever the size of the file.
//!
//! ```text
//! offset  size  field
//! 0       6     magic "YKBENC"
//! 6       1     format version (1)
//! 7       16    id of the tenant key the file is sealed with
//! 23      19    nonce prefix, random per file
//! 42      …     segments of SEGMENT bytes of plaintext + a 16-byte tag; the last one
//!               shorter (only its tag, for an empty file)
//! ```
//!
//! Every segment is authenticated together with the header and the file's place (tenant
//! and name): a file moved under another name or tenant, or given another key id, does not
//! open. A file that does not begin with the magic was written before files were encrypted
//! and is read as it is ([`Opened::Legacy`]).

use super::keys::TenantKeys;
use crate::StorageError;
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
pub(crate) const MAGIC: [u8; 6] = *b"YKBENC";
const VERSION: u8 = 1;
pub(crate) const KEY_ID_LEN: usize = 16;
const NONCE_PREFIX: usize = 19;
/// Bytes before the first segment.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + KEY_ID_LEN + NONCE_PREFIX;

pub(crate) const TAMPERED: &str = "保存されたファイルが改ざんされているか、途中で切れているか、壊れています（暗号の検証に失敗しました）。バックアップから戻すか、文書を登録し直してください。";
const SHORT_HEADER: &str = "保存されたファイルが途中で切れています（暗号化の見出しが不完全です）。バックアップから戻すか、文書を登録し直してください。";
const NOT_THIS_TENANT: &str = "保存されたファイルは、この自治体の暗号鍵で暗号化されたものではありません（別の自治体のファイルか、鍵が削除されています）。";
const WRONG_CONTENT: &str =
    "ファイルの内容が、名前に使うハッシュ（SHA-256）と一致しません。保存は行いませんでした。";

/// An integrity failure carried through `std::io::Read`; turned back into
/// [`StorageError::Integrity`] by `From<io::Error>`.
pub(crate) fn integrity(message: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        StorageError::Integrity(message.to_string()),
    )
}

fn aad(header: &[u8], tenant: &str, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(header.len() + tenant.len() + name.len() + 1);
    v.extend_from_slice(header);
    v.extend_from_slice(tenant.as_bytes());
    v.push(0);
    v.extend_from_slice(name.as_bytes());
    v
}

/// Reads `size`-byte segments and tells the last one by looking one byte ahead, so that a
/// file of exactly n segments ends with a full last segment rather than an empty one.
struct Segments<R> {
    inner: R,
    size: usize,
    carry: Option<u8>,
}

impl<R: Read> Segments<R> {
    /// Fills `buf` with the next segment; true when it is the last.
    fn next(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.clear();
        if let Some(b) = self.carry.take() {
            buf.push(b);
        }
        let want = self.size - buf.len();
        (&mut self.inner).take(want as u64).read_to_end(buf)?;
        if buf.len() < self.size {
            return Ok(true);
        }
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    self.carry = Some(one[0]);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn serve(out: &[u8], pos: &mut usize, buf: &mut [u8]) -> usize {
    let n = buf.len().min(out.len() - *pos);
    buf[..n].copy_from_slice(&out[*pos..*pos + n]);
    *pos += n;
    n
}

/// Reads plaintext from `inner` and yields the sealed file. At the end it checks that the
/// plaintext's SHA-256 is `expected` (the name the file is stored under) and fails instead
/// of yielding the last segment when it is not, so a store that writes what it reads to a
/// temporary file never puts a wrong file in place.
pub(crate) struct Sealer<R> {
    segments: Segments<R>,
    enc: Option<EncryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    hash: Sha256,
    expected: [u8; 32],
    done: bool,
    /// A read failed: every later one fails too, rather than look like the end.
    failed: bool,
}

impl<R: Read> Sealer<R> {
    pub(crate) fn new(
        inner: R,
        key: &[u8; 32],
        key_id: &[u8; KEY_ID_LEN],
        tenant: &str,
        name: &str,
        expected: [u8; 32],
    ) -> Self {
        let mut prefix = [0u8; NONCE_PREFIX];
        rand::rngs::OsRng.fill_bytes(&mut prefix);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&MAGIC);
        header.push(VERSION);
        header.extend_from_slice(key_id);
        header.extend_from_slice(&prefix);
        let cipher = XChaCha20Poly1305::new(GenericArray::from_slice(key));
        let enc = EncryptorBE32::from_aead(cipher, GenericArray::from_slice(&prefix));
        Sealer {
            segments: Segments {
                inner,
                size: SEGMENT,
                carry: None,
            },
            enc: Some(enc),
            aad: aad(&header, tenant, name),
            out: header,
            pos: 0,
            hash: Sha256::new(),
            expected,
            done: false,
            failed: false,
        }
    }

    fn next_segment(&mut self) -> io::Result<()> {
        let mut seg = std::mem::take(&mut self.out);
        self.pos = 0;
        let last = self.segments.next(&mut seg)?;
        self.hash.update(&seg);
        let sealed = if last {
            self.done = true;
            let got: [u8; 32] = std::mem::take(&mut self.hash).finalize().into();
            if got != self.expected {
                return Err(integrity(WRONG_CONTENT));
            }
            match self.enc.take() {
                Some(enc) => enc.encrypt_last_in_place(&self.aad, &mut seg),
                None => return Err(io::Error::other("sealed twice")),
            }
        } else {
            match self.enc.as_mut() {
                Some(enc) => enc.encrypt_next_in_place(&self.aad, &mut seg),
                None => return Err(io::Error::other("sealed twice")),
            }
        };
        // Only a counter overflow (2^32 segments, 256 TiB) fails here.
        sealed.map_err(|_| io::Error::other("file too large to seal"))?;
        self.out = seg;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for Sealer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other("sealing failed earlier"));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_segment() {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(serve(&self.out, &mut self.pos, buf))
    }
}

/// Yields the plaintext of a sealed file, one segment at a time, each checked before any
/// of it is returned. A read that fails the check returns `InvalidData` carrying
/// [`StorageError::Integrity`]; the caller must discard what it has read.
pub struct Opener<R> {
    segments: Segments<R>,
    dec: Option<DecryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    done: bool,
    failed: bool,
}

impl<R: Read> Opener<R> {
    fn next_segment(&mut self) -> io::Result<()> {
        let mut seg = std::mem::take(&mut self.out);
        self.pos = 0;
        let last = self.segments.next(&mut seg)?;
        let opened = if last {
            self.done = true;
            match self.dec.take() {
                Some(dec) => dec.decrypt_last_in_place(&self.aad, &mut seg),
                None => return Err(io::Error::other("opened twice")),
            }
        } else {
            match self.dec.as_mut() {
                Some(dec) => dec.decrypt_next_in_place(&self.aad, &mut seg),
                None => return Err(io::Error::other("opened twice")),
            }
        };
        if opened.is_err() {
            return Err(integrity(TAMPERED));
        }
        self.out = seg;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(integrity(TAMPERED));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_segment() {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(serve(&self.out, &mut self.pos, buf))
    }
}

/// A stored file being read: sealed, or plaintext from a version before encryption.
pub enum Opened<R> {
    Sealed(Opener<R>),
    Legacy(io::Chain<io::Cursor<Vec<u8>>, R>),
}

impl<R> Opened<R> {
    pub fn is_legacy(&self) -> bool {
        matches!(self, Opened::Legacy(_))
    }
}

impl<R: Read> Read for Opened<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Opened::Sealed(o) => o.read(buf),
            Opened::Legacy(r) => r.read(buf),
        }
    }
}

/// Starts reading a stored file of `tenant` named `name`: checks its header and finds its
/// key among `keys`.
pub(crate) fn open<R: Read>(
    mut inner: R,
    keys: &TenantKeys,
    tenant: &str,
    name: &str,
) -> Result<Opened<R>, StorageError> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut inner)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)?;
    if !head.starts_with(&MAGIC) {
        return Ok(Opened::Legacy(io::Cursor::new(head).chain(inner)));
    }
    if head.len() < HEADER_LEN {
        return Err(StorageError::Integrity(SHORT_HEADER.into()));
    }
    let version = head[MAGIC.len()];
    if version != VERSION {
        return Err(StorageError::Integrity(format!(
            "保存されたファイルは、より新しい版の yakuba の形式（{version}）で暗号化されています。yakuba を更新してください。"
        )));
    }
    let id_at = MAGIC.len() + 1;
    let key_id = &head[id_at..id_at + KEY_ID_LEN];
    let key = keys
        .by_id(key_id)
        .ok_or_else(|| StorageError::Integrity(NOT_THIS_TENANT.into()))?;
    let prefix = &head[id_at + KEY_ID_LEN..HEADER_LEN];
    let cipher = XChaCha20Poly1305::new(GenericArray::from_slice(&key[..]));
    let dec = DecryptorBE32::from_aead(cipher, GenericArray::from_slice(prefix));
    Ok(Opened::Sealed(Opener {
        segments: Segments {
            inner,
            size: SEGMENT + TAG,
            carry: None,
        },
        dec: Some(dec),
        aad: aad(&head, tenant, name),
        out: Vec::new(),
        pos: 0,
        done: false,
        failed: false,
    }))
}

/// Does this beginning of a stored file say it is sealed?
pub fn is_sealed(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

/// The SHA-256 a stored file's name stands for (64 lowercase hex digits).
pub(crate) fn content_hash(name: &str) -> Result<[u8; 32], StorageError> {
    let bad = || {
        StorageError::Integrity(format!(
            "「{name}」はファイルの内容のハッシュ（SHA-256、16進数64桁）ではありません。"
        ))
    };
    if name.len() != 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(name, &mut out).map_err(|_| bad())?;
    Ok(out)
}
