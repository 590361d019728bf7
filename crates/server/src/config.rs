//! Configuration: defaults → `yakuba.toml` → `YAKUBA_*` environment (`__` for nesting) →
//! command-line flags. An unknown key anywhere is an error that names it. Secrets may come
//! from a file (`database_url_file`, `YAKUBA_DATABASE_URL_FILE`, `[storage]
//! master_key_file`) and never print.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// A value that must not reach a log or a terminal.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: String,
    /// Where the SQLite database and (later) files live.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; empty means `<data_dir>/yakuba.db`.
    pub database_url: Secret,
    pub database_max_connections: u32,
    /// The tenant served when the request's host names no other.
    pub default_tenant: String,
    /// Its name, used when it is created on first start.
    pub default_tenant_name: String,
    /// Mark cookies `Secure` (and use the `__Host-` prefix). Turn on whenever staff reach
    /// yakuba over HTTPS, including through a TLS-terminating reverse proxy.
    pub cookie_secure: bool,
    /// Believe `X-Forwarded-For` for the client address (only behind your own proxy).
    pub trust_proxy_headers: bool,
    /// `text` or `json`.
    pub log_format: String,
    pub security: SecurityConfig,
    pub llm: LlmConfig,
    pub smtp: SmtpConfig,
    pub knowledge: KnowledgeConfig,
    pub local_model: LocalModelConfig,
    pub storage: StorageConfig,
}

/// Files at rest (S15).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The master key that wraps each tenant's file key: 32 random bytes as 64 hex digits
    /// or base64, usually from `master_key_file` (`YAKUBA_STORAGE__MASTER_KEY_FILE`). Empty:
    /// `<data_dir>/keys/master.key`, made at the first start.
    pub master_key: Secret,
}

/// Documents for the knowledge base (M8).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct KnowledgeConfig {
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Storage for documents per tenant (the operator's setting).
    pub tenant_quota_bytes: u64,
    /// `host:port` of a clamd to scan every upload with (INSTREAM). When set and not
    /// reachable, uploads are refused.
    pub clamd: String,
    /// MeCab IPADIC sources for the second, morphological search field: empty means
    /// Debian's `mecab-ipadic` when installed, `off` none (character bigrams only).
    pub morph_dictionary: String,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 100 * 1024 * 1024,
            tenant_quota_bytes: 20 * 1024 * 1024 * 1024,
            clamd: String::new(),
            morph_dictionary: String::new(),
        }
    }
}

/// The mail relay alerts go through (e.g. the office's relay on LGWAN). Without a host,
/// alerts are shown in the admin pages only.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    /// `starttls` (default), `tls` (implicit, usually port 465) or `none` (a relay on the
    /// same closed network that speaks plain SMTP).
    pub security: String,
    pub username: String,
    pub password: Secret,
    /// The sender, e.g. `yakuba@city.example.lg.jp`.
    pub from: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 587,
            security: "starttls".into(),
            username: String::new(),
            password: Secret::default(),
            from: String::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Let tenant admins point providers at loopback or private addresses (an on-premises
    /// vLLM server, tests). Off for a shared SaaS, where such a URL would reach the
    /// operator's internal network.
    pub allow_internal_provider_urls: bool,
    /// The egress proxy all LLM traffic leaves through, unless a provider sets its own.
    pub egress_proxy: Option<String>,
}

/// The local engine: GGUF files run by yakuba itself (closed networks, 機密性3).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The folder of GGUF files tenant admins may choose from (empty: `<data_dir>/models`).
    /// Admins pick a file by name; no other path on the server can be named.
    pub dir: Option<PathBuf>,
    /// The model offered at first start when a tenant has no AI service at all (empty:
    /// the first `.gguf` file in `dir`, by name).
    pub model_path: Option<PathBuf>,
    /// Answers generated at the same time; the rest wait in a queue (each answer uses
    /// every CPU core, so more rarely helps on a CPU).
    pub max_concurrent: usize,
    /// Upper bound on prompt plus answer tokens (memory per answer).
    pub max_context: usize,
    /// The longest answer in tokens (an instruction-tuned model usually stops sooner).
    pub max_answer_tokens: u32,
}

impl Default for LocalModelConfig {
    fn default() -> Self {
        Self {
            dir: None,
            model_path: None,
            max_concurrent: 1,
            max_context: 8192,
            max_answer_tokens: 2048,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// argon2id memory cost in KiB.
    pub password_hash_memory_kib: u32,
    /// argon2id passes.
    pub password_hash_iterations: u32,
    /// Largest request body in bytes (CSV imports may be larger, see below).
    pub max_body_bytes: usize,
    pub max_import_bytes: usize,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        let cost = domain::password::HashCost::default();
        Self {
            password_hash_memory_kib: cost.memory_kib,
            password_hash_iterations: cost.iterations,
            max_body_bytes: 1024 * 1024,
            max_import_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./yakuba-data"),
            database_url: Secret::default(),
            database_max_connections: 16,
            default_tenant: "default".into(),
            default_tenant_name: "サンプル市".into(),
            cookie_secure: false,
            trust_proxy_headers: false,
            log_format: "text".into(),
            security: SecurityConfig::default(),
            llm: LlmConfig::default(),
            smtp: SmtpConfig::default(),
            knowledge: KnowledgeConfig::default(),
            local_model: LocalModelConfig::default(),
            storage: StorageConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("設定ファイル {path} を読めません: {err}")]
    Read { path: String, err: String },
    #[error("設定ファイル {path} の書式が正しくありません: {err}")]
    Syntax { path: String, err: String },
    #[error("設定が正しくありません: {0}")]
    Invalid(String),
}

/// Flags given on the command line; they win over everything else.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
}

/// Environment variables that belong to yakuba but are not configuration keys.
const NOT_CONFIG: &[&str] = &[
    "YAKUBA_CONFIG",
    "YAKUBA_LOG",
    "YAKUBA_TEST_DATABASE_URL",
    "YAKUBA_TEST_BROWSER",
];

impl Config {
    /// Loads the configuration. `file` is `--config` (or `YAKUBA_CONFIG`); without one,
    /// `./yakuba.toml` is read if it exists.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = toml::Table::new();
        let path = file.map(Path::to_path_buf).or_else(|| {
            let p = PathBuf::from("yakuba.toml");
            p.exists().then_some(p)
        });
        if let Some(p) = &path {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.display().to_string(),
                err: e.to_string(),
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: p.display().to_string(),
                    err: e.to_string(),
                })?;
        }
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("YAKUBA_") else {
                continue;
            };
            if NOT_CONFIG.contains(&k.as_str()) || k.starts_with("YAKUBA_TEST_") {
                continue;
            }
            let keys: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if keys.iter().any(String::is_empty) {
                return Err(ConfigError::Invalid(format!(
                    "環境変数 {k} の名前が正しくありません"
                )));
            }
            set_path(&mut table, &keys, scalar(&v))
                .map_err(|e| ConfigError::Invalid(format!("環境変数 {k}: {e}")))?;
        }
        resolve_files(&mut table)?;
        let mut cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        if let Some(v) = &flags.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = &flags.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = &flags.database_url {
            cfg.database_url = Secret(v.clone());
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "listen「{}」はアドレス:ポートの形式で指定してください（例: 127.0.0.1:8080）",
                self.listen
            )));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(
                "log_format は text か json です".into(),
            ));
        }
        let url = self.database_url.expose();
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "database_url は sqlite:// か postgres:// で始めてください".into(),
            ));
        }
        if domain::validate::login_id(&self.default_tenant).is_err() {
            return Err(ConfigError::Invalid(
                "default_tenant は半角英数字で指定してください".into(),
            ));
        }
        let m = &self.smtp;
        if !matches!(m.security.as_str(), "starttls" | "tls" | "none") {
            return Err(ConfigError::Invalid(
                "smtp.security は starttls, tls, none のいずれかです".into(),
            ));
        }
        if !m.host.is_empty() && (m.from.is_empty() || !m.from.contains('@')) {
            return Err(ConfigError::Invalid(
                "smtp.from に送信元のメールアドレスを指定してください".into(),
            ));
        }
        let lm = &self.local_model;
        if !(1..=64).contains(&lm.max_concurrent)
            || !(256..=1_048_576).contains(&lm.max_context)
            || !(1..=1_048_576).contains(&lm.max_answer_tokens)
        {
            return Err(ConfigError::Invalid(
                "local_model.max_concurrent は 1〜64、max_context は 256〜1048576、max_answer_tokens は 1〜1048576 で指定してください".into(),
            ));
        }
        let s = &self.security;
        if !(8..=1024 * 1024).contains(&s.password_hash_memory_kib)
            || !(1..=10).contains(&s.password_hash_iterations)
        {
            return Err(ConfigError::Invalid(
                "security.password_hash_* の値が範囲外です".into(),
            ));
        }
        Ok(())
    }

    /// The folder of GGUF files for local models.
    pub fn models_dir(&self) -> PathBuf {
        self.local_model
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("models"))
    }

    /// The database URL to connect to.
    pub fn database_url(&self) -> String {
        let url = self.database_url.expose();
        if url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("yakuba.db").display())
        } else {
            url.to_string()
        }
    }

    pub fn hash_cost(&self) -> domain::password::HashCost {
        domain::password::HashCost {
            memory_kib: self.security.password_hash_memory_kib,
            iterations: self.security.password_hash_iterations,
        }
    }
}

/// Environment values are typed the way TOML would read them: `true`, `8080`, else text.
fn scalar(v: &str) -> toml::Value {
    if let Ok(b) = v.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    toml::Value::String(v.to_string())
}

fn set_path(table: &mut toml::Table, keys: &[String], v: toml::Value) -> Result<(), String> {
    match keys {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), v);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, v),
                _ => Err(format!("{first} は表ではありません")),
            }
        }
    }
}

/// `<secret>_file = "/run/secrets/x"` becomes `<secret> = <contents of the file>`, at the
/// top level (`database_url_file`) or in a section (`[smtp] password_file`).
fn resolve_files(table: &mut toml::Table) -> Result<(), ConfigError> {
    const SECRETS: &[(Option<&str>, &str)] = &[
        (None, "database_url"),
        (Some("smtp"), "password"),
        (Some("storage"), "master_key"),
    ];
    for (section, key) in SECRETS {
        let t = match section {
            None => &mut *table,
            Some(name) => match table.get_mut(*name).and_then(|v| v.as_table_mut()) {
                Some(t) => t,
                None => continue,
            },
        };
        let file_key = format!("{key}_file");
        if let Some(v) = t.remove(&file_key) {
            let path = v
                .as_str()
                .ok_or_else(|| ConfigError::Invalid(format!("{file_key} はファイルのパスです")))?
                .to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                path: path.clone(),
                err: e.to_string(),
            })?;
            t.insert(
                (*key).to_string(),
                toml::Value::String(text.trim().to_string()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert!(Config::load(Some(&missing), env(&[]), &Overrides::default()).is_err());
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert!(c.database_url().starts_with("sqlite://"));
    }

    #[test]
    fn layers_in_order_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("y.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\n[security]\npassword_hash_iterations = 3\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            env(&[
                ("YAKUBA_SECURITY__PASSWORD_HASH_ITERATIONS", "4"),
                ("PATH", "/bin"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.security.password_hash_iterations, 4);
        let c = Config::load(
            Some(&f),
            env(&[("YAKUBA_LISTEN", "127.0.0.1:9001")]),
            &Overrides {
                listen: Some("127.0.0.1:9002".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9002");

        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        let e = Config::load(Some(&f), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::load(
            None,
            env(&[("YAKUBA_SECURITY__NOPE", "1")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn secrets_from_files_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("db");
        std::fs::write(&s, "postgres://app:hunter2@db/yakuba\n").unwrap();
        let c = Config::load(
            None,
            env(&[("YAKUBA_DATABASE_URL_FILE", s.to_str().unwrap())]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.database_url(), "postgres://app:hunter2@db/yakuba");
        assert!(!format!("{c:?}").contains("hunter2"));
        // The SMTP password too, from a file in its section.
        let p = dir.path().join("smtp");
        std::fs::write(&p, "mail-secret\n").unwrap();
        let c = Config::load(
            None,
            env(&[
                ("YAKUBA_SMTP__HOST", "relay.city.lg.jp"),
                ("YAKUBA_SMTP__FROM", "yakuba@city.lg.jp"),
                ("YAKUBA_SMTP__PASSWORD_FILE", p.to_str().unwrap()),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.smtp.password.expose(), "mail-secret");
        assert!(!format!("{c:?}").contains("mail-secret"));
        // The master key of the files at rest, from a file named in the TOML.
        let k = dir.path().join("master.key");
        let hex = "0f".repeat(32);
        std::fs::write(&k, format!("{hex}\n")).unwrap();
        let f = dir.path().join("y.toml");
        std::fs::write(
            &f,
            format!("[storage]\nmaster_key_file = \"{}\"\n", k.display()),
        )
        .unwrap();
        let c = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.storage.master_key.expose(), hex);
        assert!(!format!("{c:?}").contains(&hex));
        let e = Config::load(
            None,
            env(&[("YAKUBA_STORAGE__MASTER_KEY_FILE", "/nonexistent/master.key")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/master.key"), "{e}");
    }

    #[test]
    fn smtp_settings_are_checked() {
        for (vars, message) in [
            (vec![("YAKUBA_SMTP__SECURITY", "ssl")], "smtp.security"),
            (vec![("YAKUBA_SMTP__HOST", "relay.city.lg.jp")], "smtp.from"),
        ] {
            let e = Config::load(None, env(&vars), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(message), "{e}");
        }
    }
}
