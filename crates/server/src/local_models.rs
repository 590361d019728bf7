//! Local models for the server: which GGUF files admins may choose (only files in the
//! operator's models folder, named by file name, so no other server path can be reached),
//! the first-run offer when a tenant has no AI service yet, and what admins see of a file.

use std::path::{Path, PathBuf};

use crate::app::Shared;
use crate::config::Config;
use storage::{AuditEvent, ModelInput, ProviderInput};

/// A GGUF file in the models folder, as admins see it.
pub struct LocalFile {
    pub name: String,
    pub bytes: u64,
    /// The header's facts, or why the file cannot be used (in Japanese).
    pub info: Result<llm::local::ModelInfo, String>,
}

impl LocalFile {
    /// "Gemma 3 270m（gemma3、253 MB、コンテキスト 32768）".
    pub fn summary(&self) -> String {
        let mb = self.bytes / 1_000_000;
        match &self.info {
            Ok(i) => format!(
                "{}（{}、{mb} MB、コンテキスト {}）",
                i.name.as_deref().unwrap_or(&self.name),
                i.architecture,
                i.context_length
            ),
            Err(e) => format!("使用できません: {e}"),
        }
    }

    /// The honest label: a file without a chat template is a pre-trained model that
    /// continues text and does not follow instructions.
    pub fn base_model(&self) -> bool {
        self.info.as_ref().is_ok_and(|i| !i.instruction_tuned())
    }
}

/// A file name an admin may choose: a plain `.gguf` name inside the models folder.
pub fn valid_name(name: &str) -> bool {
    let n = name.trim();
    !n.is_empty()
        && n.len() <= 255
        && n == name
        && !n.starts_with('.')
        && n.to_ascii_lowercase().ends_with(".gguf")
        && !n.chars().any(|c| {
            matches!(c, '/' | '\\' | '\0')
                || c.is_control()
                // Bidirectional marks make a name read differently from what it is.
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
}

/// The path of a local provider's model: its file name inside the models folder.
pub fn resolve(config: &Config, name: &str) -> Option<PathBuf> {
    valid_name(name).then(|| config.models_dir().join(name))
}

/// The GGUF files in the models folder, by name, each with its header checked.
pub fn list_files(config: &Config) -> Vec<LocalFile> {
    let dir = config.models_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<LocalFile> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !valid_name(&name) {
                return None;
            }
            let path = e.path();
            let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
            Some(LocalFile {
                info: inspect_cached(&path, &meta),
                name,
                bytes: meta.len(),
            })
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

type Inspected = Result<llm::local::ModelInfo, String>;

/// A header read once per file version: the admin page lists the folder on every visit,
/// and a large vocabulary makes a header megabytes long.
fn inspect_cached(path: &Path, meta: &std::fs::Metadata) -> Inspected {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Stamp = (u64, Option<std::time::SystemTime>);
    static SEEN: Mutex<Option<HashMap<PathBuf, (Stamp, Inspected)>>> = Mutex::new(None);
    let stamp = (meta.len(), meta.modified().ok());
    if let Ok(g) = SEEN.lock() {
        if let Some((s, info)) = g.as_ref().and_then(|m| m.get(path)) {
            if *s == stamp {
                return info.clone();
            }
        }
    }
    let info = llm::local::inspect(path).map_err(|e| e.detail);
    if let Ok(mut g) = SEEN.lock() {
        g.get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), (stamp, info.clone()));
    }
    info
}

/// At start-up: a tenant without any AI service gets the local model (the configured
/// `model_path`, else the first usable file of the models folder) as its first provider
/// and default model, so chat works on a fresh machine in a closed network. A pre-trained
/// demo model is named as such. Nothing happens when the tenant has any provider.
pub async fn offer_first_run(state: &Shared, tenant_id: &str) {
    let config = &state.config;
    let providers = match state.store.list_providers(tenant_id).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not check for AI services");
            return;
        }
    };
    if !providers.is_empty() {
        return;
    }
    let chosen = match &config.local_model.model_path {
        Some(p) => {
            let in_dir = p
                .parent()
                .zip(Some(config.models_dir()))
                .is_some_and(|(parent, dir)| same_dir(parent, &dir));
            let name = p.file_name().and_then(|n| n.to_str()).map(str::to_string);
            match name.filter(|n| in_dir && valid_name(n)) {
                Some(n) => list_files(config).into_iter().find(|f| f.name == n),
                None => {
                    tracing::warn!(
                        path = %p.display(),
                        dir = %config.models_dir().display(),
                        "local_model.model_path must be a .gguf file inside the models folder (local_model.dir); not offered"
                    );
                    return;
                }
            }
        }
        None => list_files(config).into_iter().find(|f| f.info.is_ok()),
    };
    let Some(file) = chosen else {
        tracing::info!(
            dir = %config.models_dir().display(),
            "no AI service is configured and no local model was found; an admin can add one under 管理 → AIモデル"
        );
        return;
    };
    let info = match &file.info {
        Ok(i) => i.clone(),
        Err(e) => {
            tracing::warn!(file = %file.name, error = %e, "the local model cannot be used");
            return;
        }
    };
    let audit = AuditEvent {
        tenant_id: tenant_id.to_string(),
        at_ms: state.now(),
        actor_login: "system".into(),
        ip: "-".into(),
        ..Default::default()
    };
    match register(state, tenant_id, &file.name, &info, audit).await {
        Ok(_) => {
            tracing::info!(file = %file.name, "no AI service was configured: the local model is offered")
        }
        Err(e) => tracing::warn!(error = %e, "could not register the local model"),
    }
}

/// Makes the GGUF file `name` of the models folder a model staff can choose: its local
/// provider (reused when there is one) and a model for every department that may receive
/// up to 機密性3, the default when the tenant has no enabled default yet. A pre-trained
/// file is named as the demo it is.
pub async fn register(
    state: &Shared,
    tenant_id: &str,
    name: &str,
    info: &llm::local::ModelInfo,
    audit: AuditEvent,
) -> Result<storage::Model, storage::StorageError> {
    let now = audit.at_ms;
    let existing = state
        .store
        .list_providers(tenant_id)
        .await?
        .into_iter()
        .find(|p| p.kind == llm::ProviderKind::Local.as_str() && p.base_url == name);
    let provider = match existing {
        Some(p) => p,
        None => {
            let input = ProviderInput {
                name: format!("ローカル: {name}"),
                kind: llm::ProviderKind::Local.as_str().into(),
                base_url: name.to_string(),
                api_key: String::new(),
                api_version: None,
                proxy: None,
                region: "このサーバー内（外部に送信しません）".into(),
                no_training: true,
                enabled: true,
            };
            state
                .store
                .save_provider(tenant_id, None, &input, now, audit.clone())
                .await?
        }
    };
    let has_default = state
        .store
        .list_models(tenant_id)
        .await?
        .iter()
        .any(|m| m.is_default && m.enabled);
    let shown = info.name.clone().unwrap_or_else(|| name.to_string());
    let display_name = if info.instruction_tuned() {
        format!("{shown}（ローカル）")
    } else {
        format!("{shown}（デモ用・事前学習のみ：指示に従いません）")
    };
    let model = ModelInput {
        provider_id: provider.id,
        model: name.to_string(),
        display_name,
        enabled: true,
        is_default: !has_default,
        all_departments: true,
        department_ids: Vec::new(),
        max_class: 3,
    };
    state
        .store
        .save_model(tenant_id, None, &model, now, audit)
        .await
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("gemma-3-270m-q4_k_m.gguf"));
        assert!(valid_name("Qwen2.5-7B-Instruct-Q4_K_M.GGUF"));
        for bad in [
            "",
            "../../etc/passwd",
            "../x.gguf",
            "/etc/x.gguf",
            "a/b.gguf",
            "a\\b.gguf",
            ".hidden.gguf",
            "model.bin",
            "x\0.gguf",
            " x.gguf",
            "a\u{202e}fuggg.gguf",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
