//! Passwords (policy S5): the strength rules, temporary passwords, and argon2id hashing.
//! Hashing is slow on purpose; callers run it off the async threads.

use crate::settings::PasswordPolicy;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::Rng;
use std::collections::HashSet;
use std::sync::OnceLock;

/// Longest password accepted: long enough for any passphrase, short enough that hashing a
/// hostile megabyte is refused before any work is done.
pub const MAX_LENGTH: usize = 256;

static COMMON_TEXT: &str = include_str!("../data/common-passwords.txt");

fn common() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_TEXT
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    })
}

/// How many common passwords are refused.
pub fn common_count() -> usize {
    common().len()
}

/// True when the password is a well-known one, or one with a few digits or symbols
/// tacked on (`password123!`), or a single character repeated.
pub fn is_common(password: &str) -> bool {
    let lower = password.to_lowercase();
    let set = common();
    if set.contains(lower.as_str()) {
        return true;
    }
    let stem = lower.trim_end_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
    if stem.chars().count() >= 4 && set.contains(stem) {
        return true;
    }
    let mut chars = lower.chars();
    match chars.next() {
        Some(first) => chars.all(|c| c == first),
        None => true,
    }
}

/// Checks a new password against the tenant's policy. Every problem is listed, in Japanese.
pub fn check_new(
    password: &str,
    login_id: &str,
    policy: &PasswordPolicy,
) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let n = password.chars().count();
    if n > MAX_LENGTH {
        errs.push(format!("パスワードは{MAX_LENGTH}文字以内にしてください。"));
        return Err(errs);
    }
    if n < policy.min_length as usize {
        errs.push(format!(
            "パスワードは{}文字以上にしてください（現在{n}文字）。",
            policy.min_length
        ));
    }
    if password.chars().any(|c| c.is_control()) {
        errs.push("パスワードに制御文字は使えません。".into());
    }
    if is_common(password) {
        errs.push("よく使われていて推測されやすいパスワードです。別のものにしてください。".into());
    }
    let id = login_id.to_lowercase();
    if id.chars().count() >= 3 && password.to_lowercase().contains(&id) {
        errs.push("パスワードにログインIDを含めないでください。".into());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// A random temporary password: 16 characters (or the policy's minimum, if longer) from an
/// alphabet without look-alikes (0/O, 1/l/I), so it can be read out over the phone.
pub fn generate_temporary(policy: &PasswordPolicy) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";
    let len = (policy.min_length as usize).max(16);
    let mut rng = rand::rngs::OsRng;
    loop {
        let pw: String = (0..len)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        let has = |f: fn(&char) -> bool| pw.chars().any(|c| f(&c));
        if has(char::is_ascii_uppercase)
            && has(char::is_ascii_lowercase)
            && has(char::is_ascii_digit)
        {
            return pw;
        }
    }
}

/// argon2id cost. The default follows OWASP's recommendation (19 MiB, 2 passes); tests
/// use a lighter one through configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes a password with argon2id and a fresh random salt (PHC string format).
pub fn hash(password: &str, cost: HashCost) -> Result<String, HashError> {
    let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
        .map_err(|e| HashError(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Checks a password against a stored hash (the cost is read from the hash itself).
pub fn verify(password: &str, stored: &str) -> bool {
    if password.len() > MAX_LENGTH * 4 {
        return false;
    }
    match PasswordHash::new(stored) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PasswordPolicy {
        PasswordPolicy::default()
    }

    #[test]
    fn ships_a_long_list_of_common_passwords() {
        assert!(common_count() >= 10_000);
        assert!(is_common("Password"));
        assert!(is_common("password123!"));
        assert!(is_common("aaaaaaaaaaaaaaaa"));
        assert!(!is_common("とても長い合言葉ですね2026"));
    }

    #[test]
    fn strength_rules() {
        assert!(check_new("short", "tanaka", &policy()).is_err());
        assert!(check_new("qwertyuiop123", "tanaka", &policy()).is_err());
        assert!(check_new("mytanaka-horse-battery", "tanaka", &policy()).is_err());
        assert!(check_new("correct-horse-battery", "tanaka", &policy()).is_ok());
        assert!(check_new(&"x9Y".repeat(22), "tanaka", &policy()).is_ok());
        assert!(check_new(&"長".repeat(257), "tanaka", &policy()).is_err());
    }

    #[test]
    fn temporary_passwords_pass_the_policy() {
        for _ in 0..20 {
            let t = generate_temporary(&policy());
            assert_eq!(t.len(), 16);
            assert_eq!(check_new(&t, "tanaka", &policy()), Ok(()));
        }
    }

    #[test]
    fn hash_and_verify() {
        let cost = HashCost {
            memory_kib: 1024,
            iterations: 1,
        };
        let h = hash("correct-horse-battery", cost).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct-horse-battery", &h));
        assert!(!verify("correct-horse-batterY", &h));
        assert!(!verify("x", "not a hash"));
    }
}
