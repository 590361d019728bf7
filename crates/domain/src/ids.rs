//! Identifiers. Every object id is a UUIDv7 in text form: sortable by creation time,
//! unguessable enough to carry no meaning, and portable between SQLite and PostgreSQL.

use rand::RngCore;

/// A new object id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A random secret of `bytes` bytes, hex encoded (session tokens, CSRF tokens).
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// SHA-256 of a token, hex encoded: what the database keeps instead of the token itself.
pub fn token_digest(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Object ids are 32 lowercase hex characters; anything else cannot name an object.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
