//! Test support: a real yakuba server in-process on 127.0.0.1:0 over a fresh SQLite file
//! (or PostgreSQL database), a clock the test moves, and an HTTP client that keeps cookies
//! and the CSRF token like a browser would. Fixtures are synthetic (policy S19).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Fake LLM providers (real HTTP servers on 127.0.0.1 speaking each provider's format).
pub use fakes;

use domain::{ManualClock, Role};
use reqwest::StatusCode;
use serde_json::{json, Value};
use server::app::Shared;
use server::config::Config;
use std::sync::Arc;
use storage::{AuditEvent, NewUser, User};

/// 2026-04-01 09:00 JST, a Wednesday: the start of a fiscal year.
pub const START_MS: i64 = 1_775_001_600_000;

pub struct TestServer {
    pub url: String,
    /// (server URL, database name) of a PostgreSQL database made for this test.
    pg: Option<(String, String)>,
    pub state: Shared,
    pub clock: Arc<ManualClock>,
    pub data_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts with a configuration adjusted by `f` (light argon2 cost for speed). With
    /// `YAKUBA_TEST_SERVER_DATABASE_URL` set, the server runs on a fresh PostgreSQL database
    /// of its own instead of SQLite.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            ..Config::default()
        };
        config.security.password_hash_memory_kib = 256;
        config.security.password_hash_iterations = 1;
        let mut pg = None;
        if let Ok(base) = std::env::var("YAKUBA_TEST_SERVER_DATABASE_URL") {
            let name = format!("yakuba_it_{}", domain::ids::random_token(6));
            let admin = storage::Store::connect(&base, 1).await.unwrap();
            sqlx::Executor::execute(admin.pool(), format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap();
            admin.close().await;
            let at = base.rfind('/').unwrap();
            config.database_url = server::config::Secret(format!("{}/{name}", &base[..at]));
            pg = Some((base, name));
        }
        f(&mut config);
        let clock = Arc::new(ManualClock::new(START_MS));
        let data_dir = config.data_dir.clone();
        let (url, state, tx, task) = Self::launch(config, clock.clone()).await;
        TestServer {
            url,
            pg,
            state,
            clock,
            data_dir,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn launch(
        config: Config,
        clock: Arc<ManualClock>,
    ) -> (
        String,
        Shared,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let state = server::build_state(config, clock).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            server::serve(listener, st, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        (url, state, tx, task)
    }

    /// Stops the server and starts a new one over the same database and data directory,
    /// as after a process restart (answers still streaming are marked failed on start).
    pub async fn restart(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.state.store.close().await;
        let config = (*self.state.config).clone();
        let (url, state, tx, task) = Self::launch(config, self.clock.clone()).await;
        self.url = url;
        self.state = state;
        self.shutdown = Some(tx);
        self.task = Some(task);
    }

    /// A second app node over the same database and stored files, with a data directory
    /// (and so search indexes) of its own and the same clock: what a load balancer would
    /// send requests to.
    /// Stop it before the first node.
    pub async fn another_node(&self) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = (*self.state.config).clone();
        config.database_url = server::config::Secret(self.state.config.database_url());
        if config.storage.master_key.expose().is_empty() {
            // Every node opens the files with the same master key.
            let key =
                std::fs::read_to_string(server::encryption::master_key_path(&config)).unwrap();
            config.storage.master_key = server::config::Secret(key.trim().to_string());
        }
        config.data_dir = dir.path().join("data");
        let data_dir = config.data_dir.clone();
        // The stored files are on a mount every node shares (as they would be on NFS or
        // in object storage); the search indexes are each node's own.
        std::fs::create_dir_all(&data_dir).unwrap();
        let files = self.data_dir.join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::os::unix::fs::symlink(&files, data_dir.join("files")).unwrap();
        let (url, state, tx, task) = Self::launch(config, self.clock.clone()).await;
        TestServer {
            url,
            pg: None,
            state,
            clock: self.clock.clone(),
            data_dir,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.state.store.close().await;
        if let Some((base, name)) = self.pg.take() {
            let admin = storage::Store::connect(&base, 1).await.unwrap();
            sqlx::Executor::execute(
                admin.pool(),
                format!("DROP DATABASE {name} WITH (FORCE)").as_str(),
            )
            .await
            .unwrap();
            admin.close().await;
        }
    }

    pub fn tenant_id(&self) -> &str {
        &self.state.default_tenant_id
    }

    pub fn now(&self) -> i64 {
        domain::Clock::now_ms(self.clock.as_ref())
    }

    pub fn audit(&self) -> AuditEvent {
        AuditEvent {
            tenant_id: self.tenant_id().to_string(),
            at_ms: self.now(),
            actor_login: "testkit".into(),
            ip: "127.0.0.1".into(),
            ..Default::default()
        }
    }

    /// Creates an account directly (as `yakuba admin create-user` does) and returns it with
    /// its temporary password.
    pub async fn create_user(
        &self,
        login_id: &str,
        department: &str,
        role: Role,
    ) -> (User, String) {
        self.create_user_in(self.tenant_id().to_string(), login_id, department, role)
            .await
    }

    pub async fn create_user_in(
        &self,
        tenant_id: String,
        login_id: &str,
        department: &str,
        role: Role,
    ) -> (User, String) {
        let store = &self.state.store;
        let mut ev = self.audit();
        ev.tenant_id = tenant_id.clone();
        let dept = store
            .ensure_department_path(&tenant_id, department, self.now(), ev.clone())
            .await
            .unwrap();
        let temp = domain::password::generate_temporary(&Default::default());
        let hash = domain::password::hash(&temp, self.state.config.hash_cost()).unwrap();
        let nu = NewUser {
            tenant_id,
            login_id: login_id.into(),
            display_name: format!("試験 {login_id}"),
            email: None,
            department_id: dept.id,
            role,
            password_hash: hash,
            temporary_until: Some(self.now() + 72 * domain::clock::HOUR_MS),
            now: self.now(),
        };
        (store.create_user(&nu, ev).await.unwrap(), temp)
    }

    /// An account that has already replaced its temporary password, signed in.
    pub async fn signed_in(&self, login_id: &str, department: &str, role: Role) -> (Client, User) {
        let (u, temp) = self.create_user(login_id, department, role).await;
        let c = self.client();
        c.activate(login_id, &temp).await;
        (c, u)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url)
    }
}

/// The password every synthetic account is given after its first sign-in.
pub const PASSWORD: &str = "sakura-momiji-tsubaki-2026";

/// An HTTP client with a cookie jar that does not follow redirects (tests look at them).
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub csrf: std::sync::Mutex<Option<String>>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Client {
            http,
            base: base.to_string(),
            csrf: std::sync::Mutex::new(None),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn csrf(&self) -> String {
        self.csrf.lock().unwrap().clone().unwrap_or_default()
    }

    /// Signs in through the API; remembers the CSRF token.
    pub async fn login(&self, login_id: &str, password: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"login_id": login_id, "password": password}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if let Some(t) = body["csrf_token"].as_str() {
            *self.csrf.lock().unwrap() = Some(t.to_string());
        }
        (status, body)
    }

    /// First sign-in with a temporary password, then the change to [`PASSWORD`].
    pub async fn activate(&self, login_id: &str, temp: &str) {
        let (s, body) = self.login(login_id, temp).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["password_change_required"], true);
        let (s, body) = self
            .post_json(
                "/api/v1/auth/password",
                &json!({"current_password": temp, "new_password": PASSWORD}),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).await;
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self.get(path).await;
        let s = r.status();
        (s, r.text().await.unwrap_or_default())
    }

    /// A JSON request with the CSRF header.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("x-csrf-token", self.csrf());
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send_json(reqwest::Method::POST, path, Some(body))
            .await
    }

    /// A form post as a page would send it, with the `_csrf` field.
    pub async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        let csrf = self.csrf();
        let mut all: Vec<(&str, &str)> = vec![("_csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.http
            .post(self.url(path))
            .form(&all)
            .send()
            .await
            .unwrap()
    }
}

/// A synthetic staff CSV: `n` people spread over `departments` departments of 5 部.
pub fn staff_csv(n: usize, departments: usize) -> String {
    const BU: [&str; 5] = ["総務部", "税務部", "福祉部", "市民生活部", "建設部"];
    const KA: [&str; 8] = [
        "企画課",
        "管理課",
        "第一課",
        "第二課",
        "調整課",
        "支援課",
        "窓口課",
        "保全課",
    ];
    const SEI: [&str; 10] = [
        "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "山本", "中村", "小林", "加藤",
    ];
    const MEI: [&str; 10] = [
        "一郎",
        "花子",
        "健太",
        "由美",
        "翔",
        "さくら",
        "大輔",
        "美咲",
        "誠",
        "陽菜",
    ];
    let mut s = String::from("ログインID,氏名,所属,権限,メールアドレス\r\n");
    for i in 0..n {
        let d = i % departments;
        let dept = format!("{}/{}", BU[d % BU.len()], KA[(d / BU.len()) % KA.len()]);
        let role = if i % 100 == 0 {
            "所属管理者"
        } else {
            "一般職員"
        };
        s.push_str(&format!(
            "staff{:04},{} {},{},{},staff{:04}@city.example.lg.jp\r\n",
            i + 1,
            SEI[i % 10],
            MEI[(i / 10) % 10],
            dept,
            role,
            i + 1
        ));
    }
    s
}

/// The same text as Excel on Japanese Windows saves it (Shift_JIS / code page 932).
pub fn shift_jis(text: &str) -> Vec<u8> {
    let (bytes, _, had_errors) = encoding_rs::SHIFT_JIS.encode(text);
    assert!(!had_errors);
    bytes.into_owned()
}
