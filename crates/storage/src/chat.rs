//! LLM providers and models of a tenant, conversations and messages, and the failure log.
//! An answer is written twice: as `streaming` before the first token, then once more as
//! `complete`, `stopped` or `failed` — never `complete` unless the provider said it ended.

use crate::audit::{append, AuditEvent};
use crate::{
    conflict_on_unique, get_i64, get_opt_i64, get_opt_str, get_str, like_escape, Result,
    StorageError, Store,
};
use sqlx::any::AnyRow;

#[derive(Clone)]
pub struct Provider {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// `openai`, `azure_openai`, `anthropic`, `gemini`.
    pub kind: String,
    pub base_url: String,
    pub api_key: String,
    pub api_version: Option<String>,
    pub proxy: Option<String>,
    /// Where the provider processes the data, e.g. `Japan East` (S18).
    pub region: String,
    /// Whether the provider's terms exclude training on and retention of the data (S18).
    pub no_training: bool,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &"***")
            .finish()
    }
}

/// A provider as typed in the admin form; `api_key` empty on edit keeps the stored key.
#[derive(Clone, Default)]
pub struct ProviderInput {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key: String,
    pub api_version: Option<String>,
    pub proxy: Option<String>,
    pub region: String,
    pub no_training: bool,
    pub enabled: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Model {
    pub id: String,
    pub tenant_id: String,
    pub provider_id: String,
    pub provider_name: String,
    pub provider_enabled: bool,
    /// The provider's model id (or Azure deployment name).
    pub model: String,
    pub display_name: String,
    pub enabled: bool,
    pub is_default: bool,
    /// Usable by every department; otherwise only by `department_ids`.
    pub all_departments: bool,
    pub department_ids: Vec<String>,
    /// The highest class of information (機密性 1–3) this model may receive (S14).
    pub max_class: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug, Default)]
pub struct ModelInput {
    pub provider_id: String,
    pub model: String,
    pub display_name: String,
    pub enabled: bool,
    pub is_default: bool,
    pub all_departments: bool,
    pub department_ids: Vec<String>,
    /// 1–3 (S14); cloud models 2 by default.
    pub max_class: i64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Conversation {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub title: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub seq: i64,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    /// `complete`, `streaming`, `stopped`, `failed`.
    pub status: String,
    pub model_id: Option<String>,
    pub model_name: Option<String>,
    pub provider_name: Option<String>,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    pub attachment_name: Option<String>,
    /// The attached file's text, as sent to the model (not sent back by list APIs).
    #[serde(skip_serializing)]
    pub attachment_text: Option<String>,
    /// The passages a question was asked over (JSON), for citations and regeneration.
    pub sources: Option<String>,
    pub input_chars: i64,
    pub output_chars: i64,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub total_ms: Option<i64>,
    pub created_at: i64,
}

/// How an answer ended.
#[derive(Clone, Debug, Default)]
pub struct AnswerEnd {
    pub status: String,
    pub content: String,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub total_ms: i64,
}

/// The user's turn and the answer that will follow it.
#[derive(Clone, Debug)]
pub struct NewTurn {
    pub tenant_id: String,
    pub conversation_id: String,
    pub content: String,
    pub attachment_name: Option<String>,
    pub attachment_text: Option<String>,
    /// The passages the question was asked over (JSON).
    pub sources: Option<String>,
    /// Characters sent to the model for this answer (prompt, history, attachment).
    pub input_chars: i64,
    pub model_id: String,
    pub model_name: String,
    pub provider_name: String,
    pub now: i64,
}

fn provider_from(r: &AnyRow) -> Result<Provider> {
    Ok(Provider {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        name: get_str(r, "name")?,
        kind: get_str(r, "kind")?,
        base_url: get_str(r, "base_url")?,
        api_key: get_str(r, "api_key")?,
        api_version: get_opt_str(r, "api_version")?,
        proxy: get_opt_str(r, "proxy")?,
        region: get_str(r, "region")?,
        no_training: get_i64(r, "no_training")? != 0,
        enabled: get_i64(r, "enabled")? != 0,
        created_at: get_i64(r, "created_at")?,
        updated_at: get_i64(r, "updated_at")?,
    })
}

fn conversation_from(r: &AnyRow) -> Result<Conversation> {
    Ok(Conversation {
        id: get_str(r, "id")?,
        tenant_id: get_str(r, "tenant_id")?,
        user_id: get_str(r, "user_id")?,
        title: get_str(r, "title")?,
        created_at: get_i64(r, "created_at")?,
        updated_at: get_i64(r, "updated_at")?,
    })
}

fn message_from(r: &AnyRow) -> Result<Message> {
    Ok(Message {
        id: get_str(r, "id")?,
        conversation_id: get_str(r, "conversation_id")?,
        seq: get_i64(r, "seq")?,
        role: get_str(r, "role")?,
        content: get_str(r, "content")?,
        status: get_str(r, "status")?,
        model_id: get_opt_str(r, "model_id")?,
        model_name: get_opt_str(r, "model_name")?,
        provider_name: get_opt_str(r, "provider_name")?,
        error_code: get_opt_str(r, "error_code")?,
        error_detail: get_opt_str(r, "error_detail")?,
        attachment_name: get_opt_str(r, "attachment_name")?,
        attachment_text: get_opt_str(r, "attachment_text")?,
        sources: get_opt_str(r, "sources")?,
        input_chars: get_i64(r, "input_chars")?,
        output_chars: get_i64(r, "output_chars")?,
        input_tokens: get_opt_i64(r, "input_tokens")?,
        output_tokens: get_opt_i64(r, "output_tokens")?,
        ttft_ms: get_opt_i64(r, "ttft_ms")?,
        total_ms: get_opt_i64(r, "total_ms")?,
        created_at: get_i64(r, "created_at")?,
    })
}

const PROVIDER_COLS: &str = "id, tenant_id, name, kind, base_url, api_key, api_version, proxy, region, no_training, enabled, created_at, updated_at";
const MODEL_SELECT: &str = "SELECT m.id, m.tenant_id, m.provider_id, p.name AS provider_name, p.enabled AS provider_enabled, m.model, m.display_name, \
    m.enabled, m.is_default, m.all_departments, m.max_class, m.created_at FROM llm_models m JOIN llm_providers p ON p.id = m.provider_id";
const MESSAGE_COLS: &str = "id, conversation_id, seq, role, content, status, model_id, model_name, provider_name, error_code, error_detail, \
    attachment_name, input_chars, output_chars, input_tokens, output_tokens, ttft_ms, total_ms, created_at, attachment_text";

impl Store {
    // ------------------------------------------------------------ providers

    pub async fn list_providers(&self, tenant_id: &str) -> Result<Vec<Provider>> {
        let rows = sqlx::query(&format!(
            "SELECT {PROVIDER_COLS} FROM llm_providers WHERE tenant_id = $1 ORDER BY name"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(provider_from).collect()
    }

    pub async fn provider(&self, tenant_id: &str, id: &str) -> Result<Provider> {
        let r = sqlx::query(&format!(
            "SELECT {PROVIDER_COLS} FROM llm_providers WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        provider_from(&r)
    }

    /// Creates (`id` None) or changes a provider. The key never reaches the audit record.
    pub async fn save_provider(
        &self,
        tenant_id: &str,
        id: Option<&str>,
        p: &ProviderInput,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Provider> {
        let mut tx = self.write_tx().await?;
        let id = match id {
            None => {
                let id = domain::ids::new_id();
                sqlx::query(&format!("INSERT INTO llm_providers ({PROVIDER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)"))
                    .bind(&id)
                    .bind(tenant_id)
                    .bind(&p.name)
                    .bind(&p.kind)
                    .bind(&p.base_url)
                    .bind(&p.api_key)
                    .bind(&p.api_version)
                    .bind(&p.proxy)
                    .bind(&p.region)
                    .bind(i64::from(p.no_training))
                    .bind(i64::from(p.enabled))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| conflict_on_unique(e, "同じ名前の接続先が既にあります。"))?;
                id
            }
            Some(id) => {
                let n = sqlx::query(
                    "UPDATE llm_providers SET name = $1, kind = $2, base_url = $3, api_key = CASE WHEN $4 = '' THEN api_key ELSE $4 END, \
                     api_version = $5, proxy = $6, region = $7, no_training = $8, enabled = $9, updated_at = $10 WHERE tenant_id = $11 AND id = $12",
                )
                .bind(&p.name)
                .bind(&p.kind)
                .bind(&p.base_url)
                .bind(&p.api_key)
                .bind(&p.api_version)
                .bind(&p.proxy)
                .bind(&p.region)
                .bind(i64::from(p.no_training))
                .bind(i64::from(p.enabled))
                .bind(now)
                .bind(tenant_id)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_on_unique(e, "同じ名前の接続先が既にあります。"))?
                .rows_affected();
                if n == 0 {
                    return Err(StorageError::NotFound);
                }
                id.to_string()
            }
        };
        let ev = audit.with(
            "provider.save",
            format!("provider:{id}"),
            serde_json::json!({"name": p.name, "kind": p.kind, "base_url": p.base_url, "region": p.region, "no_training": p.no_training, "enabled": p.enabled, "key_changed": !p.api_key.is_empty()}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.provider(tenant_id, &id).await
    }

    // ------------------------------------------------------------ models

    /// model id → department ids, for every restricted model of a tenant, in one query.
    async fn model_departments(
        &self,
        tenant_id: &str,
    ) -> Result<std::collections::HashMap<String, Vec<String>>> {
        let rows = sqlx::query("SELECT model_id, department_id FROM llm_model_departments WHERE tenant_id = $1 ORDER BY department_id")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        let mut map: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for r in &rows {
            map.entry(get_str(r, "model_id")?)
                .or_default()
                .push(get_str(r, "department_id")?);
        }
        Ok(map)
    }

    fn model_from(r: &AnyRow) -> Result<Model> {
        Ok(Model {
            id: get_str(r, "id")?,
            tenant_id: get_str(r, "tenant_id")?,
            provider_id: get_str(r, "provider_id")?,
            provider_name: get_str(r, "provider_name")?,
            provider_enabled: get_i64(r, "provider_enabled")? != 0,
            model: get_str(r, "model")?,
            display_name: get_str(r, "display_name")?,
            enabled: get_i64(r, "enabled")? != 0,
            is_default: get_i64(r, "is_default")? != 0,
            all_departments: get_i64(r, "all_departments")? != 0,
            department_ids: Vec::new(),
            max_class: get_i64(r, "max_class")?,
            created_at: get_i64(r, "created_at")?,
        })
    }

    pub async fn list_models(&self, tenant_id: &str) -> Result<Vec<Model>> {
        let rows = sqlx::query(&format!(
            "{MODEL_SELECT} WHERE m.tenant_id = $1 ORDER BY m.is_default DESC, m.display_name"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        let mut models = rows
            .iter()
            .map(Self::model_from)
            .collect::<Result<Vec<_>>>()?;
        let mut depts = self.model_departments(tenant_id).await?;
        for m in &mut models {
            m.department_ids = depts.remove(&m.id).unwrap_or_default();
        }
        Ok(models)
    }

    pub async fn model(&self, tenant_id: &str, id: &str) -> Result<Model> {
        self.list_models(tenant_id)
            .await?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or(StorageError::NotFound)
    }

    /// Creates or changes a model; making it the default clears the flag on the others.
    pub async fn save_model(
        &self,
        tenant_id: &str,
        id: Option<&str>,
        m: &ModelInput,
        now: i64,
        audit: AuditEvent,
    ) -> Result<Model> {
        let provider = self.provider(tenant_id, &m.provider_id).await?;
        let mut tx = self.write_tx().await?;
        let id = match id {
            None => {
                let id = domain::ids::new_id();
                sqlx::query(
                    "INSERT INTO llm_models (id, tenant_id, provider_id, model, display_name, enabled, is_default, all_departments, created_at, max_class) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&id)
                .bind(tenant_id)
                .bind(&provider.id)
                .bind(&m.model)
                .bind(&m.display_name)
                .bind(i64::from(m.enabled))
                .bind(i64::from(m.is_default))
                .bind(i64::from(m.all_departments))
                .bind(now)
                .bind(m.max_class)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_on_unique(e, "同じ表示名のモデルが既にあります。"))?;
                id
            }
            Some(id) => {
                let n = sqlx::query(
                    "UPDATE llm_models SET provider_id = $1, model = $2, display_name = $3, enabled = $4, is_default = $5, all_departments = $6, \
                     max_class = $9 WHERE tenant_id = $7 AND id = $8",
                )
                .bind(&provider.id)
                .bind(&m.model)
                .bind(&m.display_name)
                .bind(i64::from(m.enabled))
                .bind(i64::from(m.is_default))
                .bind(i64::from(m.all_departments))
                .bind(tenant_id)
                .bind(id)
                .bind(m.max_class)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_on_unique(e, "同じ表示名のモデルが既にあります。"))?
                .rows_affected();
                if n == 0 {
                    return Err(StorageError::NotFound);
                }
                id.to_string()
            }
        };
        if m.is_default {
            sqlx::query("UPDATE llm_models SET is_default = 0 WHERE tenant_id = $1 AND id <> $2")
                .bind(tenant_id)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM llm_model_departments WHERE model_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        for d in &m.department_ids {
            let ok =
                sqlx::query("SELECT 1 AS one FROM departments WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant_id)
                    .bind(d)
                    .fetch_optional(&mut *tx)
                    .await?;
            if ok.is_none() {
                return Err(StorageError::NotFound);
            }
            sqlx::query("INSERT INTO llm_model_departments (model_id, department_id, tenant_id) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(d)
                .bind(tenant_id)
                .execute(&mut *tx)
                .await?;
        }
        let ev = audit.with(
            "model.save",
            format!("model:{id}"),
            serde_json::json!({"display_name": m.display_name, "model": m.model, "provider": provider.name, "enabled": m.enabled, "default": m.is_default, "all_departments": m.all_departments, "departments": m.department_ids.len()}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        self.model(tenant_id, &id).await
    }

    // ------------------------------------------------------------ conversations

    pub async fn create_conversation(
        &self,
        tenant_id: &str,
        user_id: &str,
        title: &str,
        now: i64,
    ) -> Result<Conversation> {
        let id = domain::ids::new_id();
        sqlx::query("INSERT INTO conversations (id, tenant_id, user_id, title, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)")
            .bind(&id)
            .bind(tenant_id)
            .bind(user_id)
            .bind(title)
            .bind(now)
            .execute(&self.writer)
            .await?;
        self.conversation(tenant_id, user_id, &id).await
    }

    /// A conversation of this user; anyone else's is "not found".
    pub async fn conversation(
        &self,
        tenant_id: &str,
        user_id: &str,
        id: &str,
    ) -> Result<Conversation> {
        let r = sqlx::query("SELECT id, tenant_id, user_id, title, created_at, updated_at FROM conversations WHERE tenant_id = $1 AND user_id = $2 AND id = $3 AND deleted_at IS NULL")
            .bind(tenant_id)
            .bind(user_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)?;
        conversation_from(&r)
    }

    /// Any conversation of the tenant, deleted by its owner or not, for the chat log:
    /// (conversation, owner as 「氏名（ログインID）」, deleted).
    pub async fn conversation_for_log(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<(Conversation, String, bool)> {
        let r = sqlx::query(
            "SELECT c.id, c.tenant_id, c.user_id, c.title, c.created_at, c.updated_at, c.deleted_at, u.login_id, u.display_name \
             FROM conversations c JOIN users u ON u.id = c.user_id WHERE c.tenant_id = $1 AND c.id = $2",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        let owner = format!(
            "{}（{}）",
            get_str(&r, "display_name")?,
            get_str(&r, "login_id")?
        );
        let deleted = get_opt_i64(&r, "deleted_at")?.is_some();
        Ok((conversation_from(&r)?, owner, deleted))
    }

    /// Newest first; `query` matches the title.
    pub async fn list_conversations(
        &self,
        tenant_id: &str,
        user_id: &str,
        query: &str,
        limit: i64,
    ) -> Result<Vec<Conversation>> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, user_id, title, created_at, updated_at FROM conversations \
             WHERE tenant_id = $1 AND user_id = $2 AND deleted_at IS NULL AND lower(title) LIKE $3 ESCAPE '\\' ORDER BY updated_at DESC, id DESC LIMIT $4",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(format!("%{}%", like_escape(&query.to_lowercase())))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(conversation_from).collect()
    }

    pub async fn rename_conversation(
        &self,
        tenant_id: &str,
        user_id: &str,
        id: &str,
        title: &str,
    ) -> Result<()> {
        let n = sqlx::query(
            "UPDATE conversations SET title = $1 WHERE tenant_id = $2 AND user_id = $3 AND id = $4 AND deleted_at IS NULL",
        )
        .bind(title)
        .bind(tenant_id)
        .bind(user_id)
        .bind(id)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        Ok(())
    }

    pub async fn delete_conversation(
        &self,
        tenant_id: &str,
        user_id: &str,
        id: &str,
        audit: AuditEvent,
    ) -> Result<()> {
        // Hidden from its owner, kept for the chat log (M6) until retention removes it.
        let mut tx = self.write_tx().await?;
        let n = sqlx::query(
            "UPDATE conversations SET deleted_at = $4 WHERE tenant_id = $1 AND user_id = $2 AND id = $3 AND deleted_at IS NULL",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(id)
        .bind(audit.at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        append(
            &mut tx,
            &audit.with(
                "conversation.delete",
                format!("conversation:{id}"),
                serde_json::json!({}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn messages(&self, tenant_id: &str, conversation_id: &str) -> Result<Vec<Message>> {
        let rows = sqlx::query(&format!("SELECT {MESSAGE_COLS}, sources FROM messages WHERE tenant_id = $1 AND conversation_id = $2 ORDER BY seq"))
            .bind(tenant_id)
            .bind(conversation_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(message_from).collect()
    }

    pub async fn message(&self, tenant_id: &str, id: &str) -> Result<Message> {
        let r = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS}, sources FROM messages WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)?;
        message_from(&r)
    }

    /// Stores the user's message and an empty `streaming` answer after it, in one
    /// transaction. Returns (user message id, answer id).
    pub async fn begin_turn(&self, t: &NewTurn, audit: AuditEvent) -> Result<(String, String)> {
        let mut tx = self.write_tx().await?;
        let r = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS s FROM messages WHERE conversation_id = $1",
        )
        .bind(&t.conversation_id)
        .fetch_one(&mut *tx)
        .await?;
        let seq = get_i64(&r, "s")?;
        let (uid, aid) = (domain::ids::new_id(), domain::ids::new_id());
        let insert = format!(
            "INSERT INTO messages (tenant_id, {MESSAGE_COLS}) VALUES ($14, $1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, $10, $11, $12, NULL, NULL, NULL, NULL, $13, $15)"
        );
        for (id, seq, role, content, status, attachment, attachment_text, input, output) in [
            (
                &uid,
                seq + 1,
                "user",
                t.content.as_str(),
                "complete",
                t.attachment_name.clone(),
                t.attachment_text.clone(),
                // The question counts its own characters; the answer carries everything
                // sent for it (history included) and then what came back.
                t.content.chars().count() as i64,
                0i64,
            ),
            (
                &aid,
                seq + 2,
                "assistant",
                "",
                "streaming",
                None,
                None,
                t.input_chars,
                0,
            ),
        ] {
            sqlx::query(&insert)
                .bind(id)
                .bind(&t.conversation_id)
                .bind(seq)
                .bind(role)
                .bind(content)
                .bind(status)
                .bind(&t.model_id)
                .bind(&t.model_name)
                .bind(&t.provider_name)
                .bind(attachment)
                .bind(input)
                .bind(output)
                .bind(t.now)
                .bind(&t.tenant_id)
                .bind(attachment_text)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(sources) = &t.sources {
            sqlx::query("UPDATE messages SET sources = $1 WHERE id = $2")
                .bind(sources)
                .bind(&uid)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE conversations SET updated_at = $1 WHERE id = $2")
            .bind(t.now)
            .bind(&t.conversation_id)
            .execute(&mut *tx)
            .await?;
        let ev = audit.with(
            "chat.send",
            format!("conversation:{}", t.conversation_id),
            serde_json::json!({"message_id": uid, "model": t.model_name, "provider": t.provider_name, "input_chars": t.input_chars}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok((uid, aid))
    }

    /// Stores an empty `streaming` answer to the last question (regeneration).
    pub async fn begin_answer(&self, t: &NewTurn, audit: AuditEvent) -> Result<String> {
        let mut tx = self.write_tx().await?;
        let r = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS s FROM messages WHERE conversation_id = $1",
        )
        .bind(&t.conversation_id)
        .fetch_one(&mut *tx)
        .await?;
        let seq = get_i64(&r, "s")? + 1;
        let id = domain::ids::new_id();
        sqlx::query(&format!(
            "INSERT INTO messages (tenant_id, {MESSAGE_COLS}) VALUES ($1, $2, $3, $4, 'assistant', '', 'streaming', $5, $6, $7, NULL, NULL, NULL, $8, 0, NULL, NULL, NULL, NULL, $9, NULL)"
        ))
        .bind(&t.tenant_id)
        .bind(&id)
        .bind(&t.conversation_id)
        .bind(seq)
        .bind(&t.model_id)
        .bind(&t.model_name)
        .bind(&t.provider_name)
        .bind(t.input_chars)
        .bind(t.now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE conversations SET updated_at = $1 WHERE id = $2")
            .bind(t.now)
            .bind(&t.conversation_id)
            .execute(&mut *tx)
            .await?;
        let ev = audit.with(
            "chat.regenerate",
            format!("conversation:{}", t.conversation_id),
            serde_json::json!({"message_id": id, "model": t.model_name, "provider": t.provider_name, "input_chars": t.input_chars}),
        );
        append(&mut tx, &ev).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Writes how an answer ended (and a failure record when it failed).
    pub async fn finish_answer(
        &self,
        tenant_id: &str,
        id: &str,
        end: &AnswerEnd,
        user_id: &str,
        now: i64,
        usage: Option<&crate::UsageRecord>,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        if let Some(u) = usage {
            crate::usage::insert_usage(&mut tx, u).await?;
        }
        sqlx::query(
            "UPDATE messages SET content = $1, status = $2, error_code = $3, error_detail = $4, output_chars = $5, input_tokens = $6, \
             output_tokens = $7, ttft_ms = $8, total_ms = $9 WHERE tenant_id = $10 AND id = $11",
        )
        .bind(&end.content)
        .bind(&end.status)
        .bind(&end.error_code)
        .bind(&end.error_detail)
        .bind(end.content.chars().count() as i64)
        .bind(end.input_tokens)
        .bind(end.output_tokens)
        .bind(end.ttft_ms)
        .bind(end.total_ms)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if end.status == "failed" {
            sqlx::query("INSERT INTO failures (id, tenant_id, at, source, code, detail, user_id) VALUES ($1, $2, $3, 'chat', $4, $5, $6)")
                .bind(domain::ids::new_id())
                .bind(tenant_id)
                .bind(now)
                .bind(end.error_code.as_deref().unwrap_or("unknown"))
                .bind(end.error_detail.as_deref().unwrap_or(""))
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Answers left `streaming` by a crash become `failed` at start-up.
    pub async fn fail_interrupted_answers(&self) -> Result<u64> {
        Ok(sqlx::query("UPDATE messages SET status = 'failed', error_code = 'interrupted', error_detail = 'server restarted' WHERE status = 'streaming'")
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    /// Failures recorded for admins, newest first: (at, source, code, detail).
    pub async fn list_failures(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, String)>> {
        let rows = sqlx::query("SELECT at, source, code, detail FROM failures WHERE tenant_id = $1 ORDER BY at DESC LIMIT $2")
            .bind(tenant_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_i64(r, "at")?,
                    get_str(r, "source")?,
                    get_str(r, "code")?,
                    get_str(r, "detail")?,
                ))
            })
            .collect()
    }
}
