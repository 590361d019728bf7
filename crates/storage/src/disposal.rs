//! Disposal on demand (M12, S16): all records of a user, of a department (with the ones
//! below it) or of a whole tenant are removed in one transaction, and a disposal record
//! says when, by whom, with whose approval, what and how many. A tenant disposal is
//! requested by one admin and carried out only when another approves it.
//!
//! Irrecoverable on SQLite: every connection runs with `secure_delete`, so freed pages and
//! cells are overwritten with zeros, and [`Store::scrub`] then checkpoints and truncates the
//! write-ahead log, which may still hold old copies of the pages. On PostgreSQL the rows go
//! and `VACUUM` releases their space; what the disks keep below that is the storage's
//! encryption and disposal, which the certificate's method states.
//!
//! The audit log is kept for a user or department disposal (it holds who did what, never
//! the text of a chat); a tenant disposal removes it too and starts a new chain whose first
//! record is the disposal itself.

use crate::audit::{append, AuditEvent};
use crate::{
    count, exec, get_i64, get_opt_i64, get_opt_str, get_str, Backend, Result, StorageError, Store,
};
use sqlx::AnyConnection;

/// How long a tenant disposal request waits for its second admin.
pub const REQUEST_VALID_MS: i64 = 7 * 24 * 3_600_000;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Disposal {
    pub id: String,
    pub tenant_id: String,
    pub tenant_name: String,
    /// `user`, `department` or `tenant`.
    pub scope: String,
    pub target_id: String,
    pub target_label: String,
    pub reason: String,
    /// `pending` (a tenant disposal waiting for approval), `done` or `cancelled`.
    pub status: String,
    pub requested_by: String,
    pub requested_by_id: String,
    pub requested_at: i64,
    pub approved_by: Option<String>,
    pub approved_at: Option<i64>,
    pub executed_at: Option<i64>,
    /// What was removed, in the order the certificate lists it.
    pub counts: Vec<(String, u64)>,
    pub method: String,
}

impl Disposal {
    pub fn scope_label(&self) -> &'static str {
        match self.scope.as_str() {
            "user" => "職員",
            "department" => "部署（下位の部署を含む）",
            _ => "自治体（テナント全体）",
        }
    }

    pub fn status_label(&self) -> &'static str {
        match self.status.as_str() {
            "pending" => "承認待ち",
            "done" => "実施済み",
            _ => "取消し",
        }
    }
}

/// Who carries out or approves a disposal.
#[derive(Clone, Debug)]
pub struct Operator {
    pub id: String,
    /// 「氏名（ログインID）」
    pub label: String,
}

/// Counts of removed items by label, summed over users.
#[derive(Default)]
struct Tally(Vec<(String, u64)>);

impl Tally {
    fn add(&mut self, label: &str, n: u64) {
        match self.0.iter_mut().find(|(l, _)| l == label) {
            Some((_, c)) => *c += n,
            None => self.0.push((label.to_string(), n)),
        }
    }
}

const SELECT: &str = "SELECT id, tenant_id, tenant_name, scope, target_id, target_label, reason, status, \
    requested_by, requested_by_id, requested_at, approved_by, approved_at, executed_at, counts, method FROM disposals";

fn row_to_disposal(r: &sqlx::any::AnyRow) -> Result<Disposal> {
    let counts: Vec<(String, u64)> = serde_json::from_str(&get_str(r, "counts")?)
        .map_err(|e| StorageError::Corrupt(format!("disposal counts: {e}")))?;
    Ok(Disposal {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        tenant_name: get_str(r, "tenant_name")?,
        scope: get_str(r, "scope")?,
        target_id: get_str(r, "target_id")?,
        target_label: get_str(r, "target_label")?,
        reason: get_str(r, "reason")?,
        status: get_str(r, "status")?,
        requested_by: get_str(r, "requested_by")?,
        requested_by_id: get_str(r, "requested_by_id")?,
        requested_at: get_i64(r, "requested_at")?,
        approved_by: get_opt_str(r, "approved_by")?,
        approved_at: get_opt_i64(r, "approved_at")?,
        executed_at: get_opt_i64(r, "executed_at")?,
        counts,
        method: get_str(r, "method")?,
    })
}

/// Removes everything of one user but the audit log. Usage rows stay for the tenant's
/// totals, with the name and login id erased.
async fn purge_user(
    conn: &mut AnyConnection,
    tenant: &str,
    user: &str,
    login: &str,
    t: &mut Tally,
) -> Result<()> {
    let own_conversations = "(SELECT id FROM conversations WHERE tenant_id = $1 AND user_id = $2)";
    t.add(
        "メッセージ（質問・回答・添付ファイルの本文）",
        exec(conn, &format!("DELETE FROM messages WHERE tenant_id = $1 AND conversation_id IN {own_conversations}"), &[tenant, user]).await?,
    );
    t.add(
        "会話",
        exec(
            conn,
            "DELETE FROM conversations WHERE tenant_id = $1 AND user_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "エラーの記録",
        exec(
            conn,
            "DELETE FROM failures WHERE tenant_id = $1 AND user_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "個人テンプレート",
        exec(
            conn,
            "DELETE FROM prompt_templates WHERE tenant_id = $1 AND owner_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "テンプレートのお気に入り",
        exec(
            conn,
            "DELETE FROM template_favourites WHERE tenant_id = $1 AND user_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "セッション",
        exec(
            conn,
            "DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "ログイン試行の記録",
        exec(
            conn,
            "DELETE FROM login_attempts WHERE tenant_id = $1 AND (user_id = $2 OR login_id = $3)",
            &[tenant, user, login],
        )
        .await?,
    );
    let scope = format!("u:{user}");
    let caps = exec(
        conn,
        "DELETE FROM usage_user_caps WHERE tenant_id = $1 AND user_id = $2",
        &[tenant, user],
    )
    .await?
        + exec(
            conn,
            "DELETE FROM usage_counters WHERE tenant_id = $1 AND scope = $2",
            &[tenant, &scope],
        )
        .await?;
    t.add("利用量の個人上限・集計", caps);
    t.add(
        "利用記録（氏名・ログインIDを消去。文字数は自治体の集計のため残す）",
        exec(
            conn,
            "UPDATE usage_events SET user_id = 'disposed', user_login = '(廃棄済み)', user_name = '(廃棄済み)', message_id = NULL \
             WHERE tenant_id = $1 AND user_id = $2",
            &[tenant, user],
        )
        .await?,
    );
    t.add(
        "アカウント",
        exec(
            conn,
            "DELETE FROM users WHERE tenant_id = $1 AND id = $2",
            &[tenant, user],
        )
        .await?,
    );
    Ok(())
}

/// Is this user under a legal hold, directly or through a department above them?
pub(crate) async fn held(conn: &mut AnyConnection, tenant: &str, user: &str) -> Result<bool> {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM users WHERE tenant_id = $1 AND id = $2 AND id IN {}",
        crate::retention::HELD_USERS
    );
    Ok(count(conn, &sql, &[tenant, user]).await? > 0)
}

impl Store {
    /// How records are destroyed on this backend, as the certificate states it.
    pub fn disposal_method(&self) -> String {
        match self.backend {
            Backend::Sqlite => "データベース（SQLite）から行を削除。削除した領域はゼロで上書き（secure_delete）し、\
                先行書き込みログをチェックポイントのうえ切り詰め。バックアップに含まれる写しは、バックアップの保存期間の満了により消去されます。"
                .into(),
            Backend::Postgres => "データベース（PostgreSQL）から行を削除し、VACUUM で領域を回収。\
                ストレージ上の残存データは、ストレージの暗号化とその廃棄手順により消去されます。バックアップに含まれる写しは、バックアップの保存期間の満了により消去されます。"
                .into(),
        }
    }

    pub async fn disposals(&self, tenant_id: &str) -> Result<Vec<Disposal>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE tenant_id = $1 ORDER BY requested_at DESC, id"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_disposal).collect()
    }

    pub async fn disposal(&self, tenant_id: &str, id: &str) -> Result<Disposal> {
        let r = sqlx::query(&format!("{SELECT} WHERE tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        row_to_disposal(&r)
    }

    /// A done disposal by its id and the digest of the key shown to its approver, while the
    /// key is valid.
    pub async fn disposal_by_key(&self, id: &str, key_digest: &str, now: i64) -> Result<Disposal> {
        let r = sqlx::query(&format!(
            "{SELECT} WHERE id = $1 AND key_digest = $2 AND key_expires_at > $3 AND status = 'done'"
        ))
        .bind(id)
        .bind(key_digest)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        row_to_disposal(&r)
    }

    #[allow(clippy::too_many_arguments)] // one record's worth of inputs
    async fn insert_disposal(
        &self,
        conn: &mut AnyConnection,
        tenant_id: &str,
        scope: &str,
        target_id: &str,
        target_label: &str,
        reason: &str,
        status: &str,
        by: &Operator,
        now: i64,
    ) -> Result<String> {
        let id = domain::ids::new_id();
        let tenant_name = sqlx::query("SELECT name FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO disposals (id, tenant_id, tenant_name, scope, target_id, target_label, reason, status, \
             requested_by, requested_by_id, requested_at, counts, method) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, '[]', $12)",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(get_str(&tenant_name, "name")?)
        .bind(scope)
        .bind(target_id)
        .bind(target_label)
        .bind(reason)
        .bind(status)
        .bind(&by.label)
        .bind(&by.id)
        .bind(now)
        .bind(self.disposal_method())
        .execute(&mut *conn)
        .await?;
        Ok(id)
    }

    async fn finish_disposal(
        &self,
        conn: &mut AnyConnection,
        id: &str,
        tally: &Tally,
        approver: Option<&Operator>,
        key: Option<(&str, i64)>,
        now: i64,
    ) -> Result<()> {
        let counts =
            serde_json::to_string(&tally.0).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        sqlx::query(
            "UPDATE disposals SET status = 'done', executed_at = $1, counts = $2, approved_by = $3, approved_at = $4, \
             key_digest = $5, key_expires_at = $6 WHERE id = $7",
        )
        .bind(now)
        .bind(counts)
        .bind(approver.map(|a| a.label.clone()))
        .bind(approver.map(|_| now))
        .bind(key.map(|k| k.0.to_string()))
        .bind(key.map(|k| k.1))
        .bind(id)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Removes all records of one user (not the caller) at once. Refused while the user is
    /// under a legal hold.
    pub async fn dispose_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        reason: &str,
        by: &Operator,
        audit: AuditEvent,
    ) -> Result<Disposal> {
        if user_id == by.id {
            return Err(StorageError::Conflict(
                "自分自身のアカウントは廃棄できません。".into(),
            ));
        }
        let u = self.user_by_id(tenant_id, user_id).await?;
        let now = audit.at_ms;
        let mut tx = self.write_tx().await?;
        if held(&mut tx, tenant_id, user_id).await? {
            return Err(StorageError::Conflict(
                "この職員の記録は保全（リーガルホールド）中のため廃棄できません。保存期間の画面で保全を解除してから行ってください。".into(),
            ));
        }
        let label = format!(
            "{}（{}）／{}",
            u.display_name, u.login_id, u.department_path
        );
        let id = self
            .insert_disposal(
                &mut tx, tenant_id, "user", user_id, &label, reason, "pending", by, now,
            )
            .await?;
        let mut tally = Tally::default();
        purge_user(&mut tx, tenant_id, user_id, &u.login_id, &mut tally).await?;
        self.finish_disposal(&mut tx, &id, &tally, None, None, now)
            .await?;
        append(
            &mut tx,
            &audit.with(
                "disposal.user",
                format!("disposal:{id}"),
                serde_json::json!({"user_id": user_id, "login_id": u.login_id, "reason": reason, "removed": tally.0}),
            ),
        )
        .await?;
        tx.commit().await?;
        self.scrub().await;
        self.disposal(tenant_id, &id).await
    }

    /// Removes a department, the ones below it, their accounts with all their records, and
    /// their templates, allocations and model permissions. Refused while anything in it is
    /// under a legal hold, and for the caller's own department.
    pub async fn dispose_department(
        &self,
        tenant_id: &str,
        department_id: &str,
        reason: &str,
        by: &Operator,
        audit: AuditEvent,
    ) -> Result<Disposal> {
        let now = audit.at_ms;
        let mut tx = self.write_tx().await?;
        let root = sqlx::query("SELECT path FROM departments WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(department_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StorageError::NotFound)?;
        let path = get_str(&root, "path")?;
        let pattern = format!("{}/%", crate::like_escape(&path));
        let mut depts: Vec<(String, String)> = sqlx::query(
            "SELECT id, path FROM departments WHERE tenant_id = $1 AND (path = $2 OR path LIKE $3 ESCAPE '\\')",
        )
        .bind(tenant_id)
        .bind(&path)
        .bind(&pattern)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((get_str(r, "id")?, get_str(r, "path")?)))
        .collect::<Result<_>>()?;
        // Deepest first, so no department is removed before the ones below it.
        depts.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(b.1.cmp(&a.1)));
        let mut users = Vec::new();
        for (d, _) in &depts {
            if count(
                &mut tx,
                "SELECT COUNT(*) AS n FROM legal_holds WHERE tenant_id = $1 AND department_id = $2",
                &[tenant_id, d],
            )
            .await?
                > 0
            {
                return Err(StorageError::Conflict(
                    "この部署（または下位の部署）は保全（リーガルホールド）中のため廃棄できません。".into(),
                ));
            }
            for r in sqlx::query(
                "SELECT id, login_id FROM users WHERE tenant_id = $1 AND department_id = $2",
            )
            .bind(tenant_id)
            .bind(d)
            .fetch_all(&mut *tx)
            .await?
            {
                users.push((get_str(&r, "id")?, get_str(&r, "login_id")?));
            }
        }
        if users.iter().any(|(u, _)| *u == by.id) {
            return Err(StorageError::Conflict(
                "自分が所属する部署は廃棄できません。".into(),
            ));
        }
        for (u, _) in &users {
            if held(&mut tx, tenant_id, u).await? {
                return Err(StorageError::Conflict(
                    "この部署の職員に保全（リーガルホールド）中の記録があるため廃棄できません。"
                        .into(),
                ));
            }
        }
        let id = self
            .insert_disposal(
                &mut tx,
                tenant_id,
                "department",
                department_id,
                &format!("{path}（下位の部署を含む）"),
                reason,
                "pending",
                by,
                now,
            )
            .await?;
        let mut tally = Tally::default();
        for (u, login) in &users {
            purge_user(&mut tx, tenant_id, u, login, &mut tally).await?;
        }
        for (d, _) in &depts {
            purge_department_knowledge(&mut tx, tenant_id, d, now, &mut tally).await?;
        }
        for (d, _) in &depts {
            let scope = format!("d:{d}");
            t_add_dept(&mut tx, tenant_id, d, &scope, &mut tally).await?;
        }
        self.finish_disposal(&mut tx, &id, &tally, None, None, now)
            .await?;
        append(
            &mut tx,
            &audit.with(
                "disposal.department",
                format!("disposal:{id}"),
                serde_json::json!({"department_id": department_id, "path": path, "reason": reason, "removed": tally.0}),
            ),
        )
        .await?;
        tx.commit().await?;
        self.scrub().await;
        self.disposal(tenant_id, &id).await
    }

    /// The first admin's half of a tenant disposal. One request may wait at a time.
    pub async fn request_tenant_disposal(
        &self,
        tenant_id: &str,
        reason: &str,
        by: &Operator,
        audit: AuditEvent,
    ) -> Result<Disposal> {
        let now = audit.at_ms;
        let mut tx = self.write_tx().await?;
        let waiting = count(
            &mut tx,
            "SELECT COUNT(*) AS n FROM disposals WHERE tenant_id = $1 AND scope = 'tenant' AND status = 'pending'",
            &[tenant_id],
        )
        .await?;
        if waiting > 0 {
            return Err(StorageError::Conflict(
                "承認待ちの廃棄依頼がすでにあります。承認するか取り消してから依頼してください。"
                    .into(),
            ));
        }
        let t = sqlx::query("SELECT name, slug FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
        let label = format!(
            "{}（{}）の全データ",
            get_str(&t, "name")?,
            get_str(&t, "slug")?
        );
        let id = self
            .insert_disposal(
                &mut tx, tenant_id, "tenant", tenant_id, &label, reason, "pending", by, now,
            )
            .await?;
        append(
            &mut tx,
            &audit.with(
                "disposal.request",
                format!("disposal:{id}"),
                serde_json::json!({"reason": reason}),
            ),
        )
        .await?;
        tx.commit().await?;
        self.disposal(tenant_id, &id).await
    }

    pub async fn cancel_disposal(
        &self,
        tenant_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let n = exec(
            &mut tx,
            "UPDATE disposals SET status = 'cancelled' WHERE tenant_id = $1 AND id = $2 AND status = 'pending'",
            &[tenant_id, id],
        )
        .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "disposal.cancel",
                format!("disposal:{id}"),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The second admin's half: removes every record of the tenant but its registration
    /// (name, identifier, host), whose settings go back to the defaults. The audit log is
    /// removed too and a new chain begins with this disposal. `key` is the digest of the
    /// certificate key and when it expires.
    pub async fn approve_tenant_disposal(
        &self,
        tenant_id: &str,
        id: &str,
        approver: &Operator,
        key: (&str, i64),
        audit: AuditEvent,
    ) -> Result<Disposal> {
        let now = audit.at_ms;
        let d = self.disposal(tenant_id, id).await?;
        if d.scope != "tenant" || d.status != "pending" {
            return Err(StorageError::NotFound);
        }
        if d.requested_by_id == approver.id {
            return Err(StorageError::Conflict(
                "廃棄を依頼した本人は承認できません。別の管理者が承認してください。".into(),
            ));
        }
        if now - d.requested_at > REQUEST_VALID_MS {
            return Err(StorageError::Conflict(
                "この依頼は7日の承認期限を過ぎています。取り消して、改めて依頼してください。"
                    .into(),
            ));
        }
        let mut tx = self.write_tx().await?;
        if count(
            &mut tx,
            "SELECT COUNT(*) AS n FROM legal_holds WHERE tenant_id = $1",
            &[tenant_id],
        )
        .await?
            > 0
        {
            return Err(StorageError::Conflict(
                "保全（リーガルホールド）が設定されているため廃棄できません。保存期間の画面で保全を解除してから行ってください。".into(),
            ));
        }
        let mut tally = Tally::default();
        let own_conversations = "(SELECT id FROM conversations WHERE tenant_id = $1)";
        let steps: &[(&str, String)] = &[
            ("メッセージ（質問・回答・添付ファイルの本文）", format!("DELETE FROM messages WHERE tenant_id = $1 OR conversation_id IN {own_conversations}")),
            ("会話", "DELETE FROM conversations WHERE tenant_id = $1".into()),
            ("エラーの記録", "DELETE FROM failures WHERE tenant_id = $1".into()),
            ("利用記録", "DELETE FROM usage_events WHERE tenant_id = $1".into()),
            ("利用量の集計", "DELETE FROM usage_counters WHERE tenant_id = $1".into()),
            ("利用量の割当て・上限", "DELETE FROM usage_allocations WHERE tenant_id = $1".into()),
            ("利用量の割当て・上限", "DELETE FROM usage_user_caps WHERE tenant_id = $1".into()),
            ("テンプレートのお気に入り・利用回数", "DELETE FROM template_favourites WHERE tenant_id = $1".into()),
            ("テンプレートのお気に入り・利用回数", "DELETE FROM template_uses WHERE tenant_id = $1".into()),
            ("テンプレート", "DELETE FROM prompt_templates WHERE tenant_id = $1".into()),
            ("API キー", "DELETE FROM api_tokens WHERE tenant_id = $1".into()),
            ("セッション", "DELETE FROM sessions WHERE tenant_id = $1".into()),
            ("ログイン試行の記録", "DELETE FROM login_attempts WHERE tenant_id = $1".into()),
            ("取込み中の職員一覧", "DELETE FROM pending_imports WHERE tenant_id = $1".into()),
            ("モデル・接続先の設定", "DELETE FROM kb_embedders WHERE tenant_id = $1".into()),
            ("モデル・接続先の設定", "DELETE FROM llm_model_departments WHERE tenant_id = $1".into()),
            ("モデル・接続先の設定", "DELETE FROM llm_models WHERE tenant_id = $1".into()),
            ("モデル・接続先の設定", "DELETE FROM llm_providers WHERE tenant_id = $1".into()),
            ("アラート", "DELETE FROM alerts WHERE tenant_id = $1".into()),
            ("ナレッジの検索用ベクトル", "DELETE FROM kb_vectors WHERE tenant_id = $1".into()),
            ("ナレッジの検索用ベクトル", "DELETE FROM kb_index_log WHERE tenant_id = $1".into()),
            ("ナレッジの文書の本文と区切り", "DELETE FROM kb_chunks WHERE tenant_id = $1".into()),
            ("ナレッジの文書の本文と区切り", "DELETE FROM kb_pages WHERE tenant_id = $1".into()),
            ("ナレッジの処理待ち", "DELETE FROM jobs WHERE tenant_id = $1".into()),
            ("ナレッジの文書", "DELETE FROM kb_documents WHERE tenant_id = $1".into()),
            ("ナレッジ", "DELETE FROM collection_members WHERE tenant_id = $1".into()),
            ("ナレッジ", "DELETE FROM collections WHERE tenant_id = $1".into()),
            // Crypto-shredding: without its keys no copy of the tenant's files opens again.
            ("ナレッジのファイルの暗号鍵（暗号化消去: 鍵の削除により、ファイルの写しも復号できなくなります）", "DELETE FROM tenant_keys WHERE tenant_id = $1".into()),
            ("アラート", "DELETE FROM alert_cursors WHERE tenant_id = $1".into()),
            ("アカウント", "DELETE FROM users WHERE tenant_id = $1".into()),
            ("部署", "DELETE FROM departments WHERE tenant_id = $1".into()),
            ("監査ログ", "DELETE FROM audit_log WHERE tenant_id = $1".into()),
        ];
        for (label, sql) in steps {
            tally.add(label, exec(&mut tx, sql, &[tenant_id]).await?);
        }
        exec(
            &mut tx,
            "DELETE FROM audit_heads WHERE tenant_id = $1",
            &[tenant_id],
        )
        .await?;
        let defaults = serde_json::to_string(&domain::settings::TenantSettings::default())
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        sqlx::query("UPDATE tenants SET settings = $1 WHERE id = $2")
            .bind(defaults)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        // Every node's copy of the search index goes too (they follow the index log).
        crate::index_log::log_change(&mut tx, tenant_id, "", "", "disposed", now).await?;
        self.finish_disposal(&mut tx, id, &tally, Some(approver), Some(key), now)
            .await?;
        append(
            &mut tx,
            &audit.with(
                "disposal.tenant",
                format!("disposal:{id}"),
                serde_json::json!({"requested_by": d.requested_by, "reason": d.reason, "removed": tally.0}),
            ),
        )
        .await?;
        tx.commit().await?;
        self.scrub().await;
        self.disposal(tenant_id, id).await
    }

    /// After removals: on SQLite, checkpoint and truncate the write-ahead log, which may
    /// hold old copies of the removed pages (retried while readers hold old snapshots); on
    /// PostgreSQL, VACUUM the tables that hold text. Failures are logged, not raised: the
    /// rows are gone either way.
    pub async fn scrub(&self) {
        match self.backend {
            Backend::Sqlite => {
                for _ in 0..50 {
                    match sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .fetch_one(&self.writer)
                        .await
                    {
                        Ok(r) if get_i64(&r, "busy").unwrap_or(1) == 0 => return,
                        Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "checkpoint after disposal failed");
                            return;
                        }
                    }
                }
                tracing::warn!("write-ahead log still busy after disposal; it is truncated at the next checkpoint");
            }
            Backend::Postgres => {
                for t in [
                    "messages",
                    "conversations",
                    "failures",
                    "usage_events",
                    "prompt_templates",
                    "users",
                    "audit_log",
                    "tenant_keys",
                ] {
                    if let Err(e) = sqlx::query(&format!("VACUUM {t}"))
                        .execute(&self.pool)
                        .await
                    {
                        tracing::warn!(error = %e, table = t, "vacuum after disposal failed");
                    }
                }
            }
        }
    }
}

/// A department's knowledge collections with their documents, pages, passages, vectors
/// and jobs (the files go after commit, with each node's index entries, which follow the
/// index log).
async fn purge_department_knowledge(
    conn: &mut AnyConnection,
    tenant: &str,
    dept: &str,
    now: i64,
    t: &mut Tally,
) -> Result<()> {
    let ids: Vec<String> =
        sqlx::query("SELECT id FROM collections WHERE tenant_id = $1 AND department_id = $2")
            .bind(tenant)
            .bind(dept)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| get_str(r, "id"))
            .collect::<Result<_>>()?;
    let docs_of = "(SELECT id FROM kb_documents WHERE collection_id = $2)";
    for c in &ids {
        for (label, sql) in [
            (
                "ナレッジの検索用ベクトル",
                "DELETE FROM kb_vectors WHERE tenant_id = $1 AND collection_id = $2".to_string(),
            ),
            (
                "ナレッジの文書の本文と区切り",
                "DELETE FROM kb_chunks WHERE tenant_id = $1 AND collection_id = $2".to_string(),
            ),
            (
                "ナレッジの文書の本文と区切り",
                format!("DELETE FROM kb_pages WHERE tenant_id = $1 AND document_id IN {docs_of}"),
            ),
            (
                "ナレッジの処理待ち",
                format!("DELETE FROM jobs WHERE tenant_id = $1 AND target_id IN {docs_of}"),
            ),
            (
                "ナレッジの文書",
                "DELETE FROM kb_documents WHERE tenant_id = $1 AND collection_id = $2".to_string(),
            ),
            (
                "ナレッジ",
                "DELETE FROM collection_members WHERE tenant_id = $1 AND collection_id = $2"
                    .to_string(),
            ),
            (
                "ナレッジ",
                "DELETE FROM collections WHERE tenant_id = $1 AND id = $2".to_string(),
            ),
        ] {
            t.add(label, exec(conn, &sql, &[tenant, c]).await?);
        }
        crate::index_log::log_change(conn, tenant, "", c, "collection", now).await?;
    }
    Ok(())
}

async fn t_add_dept(
    conn: &mut AnyConnection,
    tenant: &str,
    dept: &str,
    scope: &str,
    t: &mut Tally,
) -> Result<()> {
    t.add(
        "部署のテンプレート",
        exec(
            conn,
            "DELETE FROM prompt_templates WHERE tenant_id = $1 AND department_id = $2",
            &[tenant, dept],
        )
        .await?,
    );
    t.add(
        "利用量の割当て・集計",
        exec(
            conn,
            "DELETE FROM usage_allocations WHERE tenant_id = $1 AND department_id = $2",
            &[tenant, dept],
        )
        .await?
            + exec(
                conn,
                "DELETE FROM usage_counters WHERE tenant_id = $1 AND scope = $2",
                &[tenant, scope],
            )
            .await?,
    );
    t.add(
        "モデルの利用部署の設定",
        exec(
            conn,
            "DELETE FROM llm_model_departments WHERE tenant_id = $1 AND department_id = $2",
            &[tenant, dept],
        )
        .await?,
    );
    t.add(
        "部署",
        exec(
            conn,
            "DELETE FROM departments WHERE tenant_id = $1 AND id = $2",
            &[tenant, dept],
        )
        .await?,
    );
    Ok(())
}
