//! The audit trail's hash chain (policy S8). Each tenant has its own chain: record `n`
//! carries the hash of record `n-1`, and its own hash covers every field plus that link,
//! so changing, deleting or reordering any record breaks the chain at that point.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub tenant_id: String,
    /// 1, 2, 3… within the tenant, without gaps.
    pub seq: i64,
    pub at_ms: i64,
    pub actor_id: Option<String>,
    /// The login id of the actor, or what was typed at a failed sign-in, or `system`/`cli`.
    pub actor_login: String,
    pub ip: String,
    pub user_agent: String,
    /// e.g. `auth.login`, `user.create`.
    pub action: String,
    /// What the action was done to, e.g. `user:0190…`.
    pub target: String,
    /// `success`, `failure` or `denied`.
    pub result: String,
    /// JSON object with the details (never a password or a token).
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let canonical = serde_json::json!([
            self.tenant_id,
            self.seq,
            self.at_ms,
            self.actor_id,
            self.actor_login,
            self.ip,
            self.user_agent,
            self.action,
            self.target,
            self.result,
            self.detail,
            self.prev_hash,
        ]);
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub tenant_id: String,
    /// The first record that does not verify (or the position where one is missing).
    pub seq: i64,
    pub reason: String,
}

/// Verifies a chain one record at a time, so a log of any length is checked in constant
/// memory.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    tenant_id: String,
    expected_seq: i64,
    prev: String,
    count: u64,
}

impl ChainVerifier {
    pub fn new(tenant_id: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_string(),
            expected_seq: 1,
            prev: GENESIS.to_string(),
            count: 0,
        }
    }

    fn broken(&self, seq: i64, reason: String) -> Broken {
        Broken {
            tenant_id: self.tenant_id.clone(),
            seq,
            reason,
        }
    }

    /// The next record in storage order.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), Broken> {
        if r.seq != self.expected_seq {
            return Err(self.broken(
                self.expected_seq,
                format!(
                    "連番 {} の記録がありません（次は {}）",
                    self.expected_seq, r.seq
                ),
            ));
        }
        if r.prev_hash != self.prev {
            return Err(self.broken(
                r.seq,
                "直前の記録のハッシュと一致しません（削除・並べ替え・改ざん）".into(),
            ));
        }
        if r.compute_hash() != r.hash {
            return Err(self.broken(r.seq, "記録の内容がハッシュと一致しません（改ざん）".into()));
        }
        self.prev = r.hash.clone();
        self.expected_seq += 1;
        self.count += 1;
        Ok(())
    }

    /// Checks the end of the chain against the head the store keeps (last seq and hash),
    /// which catches a truncated tail. Returns the number of records.
    pub fn finish(self, head: Option<(i64, &str)>) -> Result<u64, Broken> {
        if let Some((last_seq, last_hash)) = head {
            if last_seq != self.expected_seq - 1 || (last_seq > 0 && last_hash != self.prev) {
                return Err(self.broken(
                    self.expected_seq,
                    format!("末尾の記録が失われているか、管理情報が改ざんされています（最終連番 {last_seq}）"),
                ));
            }
        }
        Ok(self.count)
    }
}

/// Checks a whole chain held in memory.
pub fn verify_chain<'a>(
    tenant_id: &str,
    records: impl IntoIterator<Item = &'a AuditRecord>,
    head: Option<(i64, &str)>,
) -> Result<u64, Broken> {
    let mut v = ChainVerifier::new(tenant_id);
    for r in records {
        v.push(r)?;
    }
    v.finish(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    tenant_id: "t".into(),
                    seq,
                    at_ms: seq * 1000,
                    actor_id: None,
                    actor_login: "cli".into(),
                    ip: "127.0.0.1".into(),
                    user_agent: String::new(),
                    action: "test".into(),
                    target: format!("x:{seq}"),
                    result: "success".into(),
                    detail: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = r.compute_hash();
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn head(c: &[AuditRecord]) -> Option<(i64, &str)> {
        c.last().map(|r| (r.seq, r.hash.as_str()))
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        assert_eq!(verify_chain("t", &c, head(&c)), Ok(5));
    }

    #[test]
    fn detects_content_change_deletion_reorder_and_truncation() {
        let c = chain(5);
        let mut changed = c.clone();
        changed[2].target = "x:other".into();
        assert_eq!(verify_chain("t", &changed, head(&c)).unwrap_err().seq, 3);

        let mut deleted = c.clone();
        deleted.remove(1);
        assert_eq!(verify_chain("t", &deleted, head(&c)).unwrap_err().seq, 2);

        let mut swapped = c.clone();
        swapped.swap(1, 2);
        assert_eq!(verify_chain("t", &swapped, head(&c)).unwrap_err().seq, 2);

        let truncated = &c[..4];
        assert_eq!(verify_chain("t", truncated, head(&c)).unwrap_err().seq, 5);
    }
}
