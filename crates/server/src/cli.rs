//! The command line: `serve`, `migrate`, `admin …`, `audit verify`, `backup`, `restore`,
//! `export` and `import`.

use crate::config::{Config, Overrides};
use clap::{Parser, Subcommand};
use domain::{Clock, Role, SystemClock};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use storage::{AuditEvent, NewUser, Store};

#[derive(Parser, Debug)]
#[command(
    name = "yakuba",
    version,
    about = "自治体職員のための生成AIワークスペース"
)]
struct Cli {
    /// 設定ファイル（既定: ./yakuba.toml があれば読む）
    #[arg(long, global = true, env = "YAKUBA_CONFIG")]
    config: Option<PathBuf>,
    /// データディレクトリ（既定: ./yakuba-data）
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// データベース URL（sqlite:// または postgres://）
    #[arg(long, global = true, hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// サービスを起動する
    Serve {
        /// 待ち受けるアドレス（既定: 127.0.0.1:8080）
        #[arg(long)]
        listen: Option<String>,
    },
    /// データベースを最新の構造にする
    Migrate,
    /// 管理用の操作
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// 監査ログ
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// 稼働中のままバックアップを作成する（SQLite: データベースとファイル）
    Backup {
        /// 保存先のディレクトリ（新しく作られます）
        dest: PathBuf,
    },
    /// 自治体の全データを ZIP に書き出す（移行用）
    Export {
        /// 書き出すファイル（.zip）
        out: PathBuf,
        /// 自治体の識別名（既定: 設定の default_tenant）
        #[arg(long)]
        tenant: Option<String>,
    },
    /// 書き出した ZIP を、新しい自治体として取り込む
    Import {
        /// yakuba export で書き出したファイル
        file: PathBuf,
    },
    /// ナレッジ
    Knowledge {
        #[command(subcommand)]
        command: KnowledgeCommand,
    },
    /// 問題集で AIモデルを評価し、採点モデルの点数で報告を作る（同じ --out で再開）
    Eval {
        /// 問題集（JSONL）。省略時は同梱のサンプル問題集
        #[arg(long)]
        set: Option<PathBuf>,
        /// 評価するモデル（管理画面の表示名かID。複数指定で比較）
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        /// 採点に使うモデル（表示名かID）
        #[arg(long)]
        judge: String,
        /// 結果を書き出すディレクトリ（results.jsonl, report.csv, summary.csv）
        #[arg(long)]
        out: PathBuf,
        /// 自治体の識別名（既定: 設定の default_tenant）
        #[arg(long)]
        tenant: Option<String>,
    },
    /// ローカルモデル（GGUF）
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// バックアップから復元する（サービスを停止してから実行）
    Restore {
        /// バックアップのディレクトリ
        src: PathBuf,
        /// 既存のデータを置き換える（置き換える前のデータは退避されます）
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Hugging Face 互換のハブから GGUF ファイルをモデル用フォルダにダウンロードする（続きから再開、チェックサム確認）
    Pull {
        /// リポジトリ（例: Qwen/Qwen2.5-7B-Instruct-GGUF）
        repo: String,
        /// ファイル名（例: qwen2.5-7b-instruct-q4_k_m.gguf）
        file: String,
        /// リビジョン（ブランチ名またはコミット）
        #[arg(long, default_value = "main")]
        revision: String,
        /// ハブのURL
        #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
        endpoint: String,
        /// アクセストークン（利用条件への同意が必要なモデル）
        #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// 期待する SHA-256（省略時はハブが示す値で確認）
        #[arg(long)]
        sha256: Option<String>,
    },
    /// モデル用フォルダの GGUF ファイルと、その内容を表示する
    List,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// ユーザーを作成し、仮パスワードを一度だけ表示する
    CreateUser {
        #[arg(long)]
        login_id: String,
        /// 氏名
        #[arg(long)]
        name: String,
        /// 所属（例: 総務部/情報政策課）。なければ作成する
        #[arg(long)]
        department: String,
        /// user, department-admin, tenant-admin, auditor, support
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long)]
        email: Option<String>,
        /// 自治体の識別名（既定: 設定の default_tenant）
        #[arg(long)]
        tenant: Option<String>,
    },
    /// 仮パスワードを再発行する（ロックも解除）
    ResetPassword {
        #[arg(long)]
        login_id: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// 自治体（テナント）を作成する
    CreateTenant {
        /// 識別名（半角英数字、例: sample-city）
        #[arg(long)]
        slug: String,
        /// 名称（例: サンプル市）
        #[arg(long)]
        name: String,
        /// この自治体に割り当てるホスト名
        #[arg(long)]
        host: Option<String>,
    },
    /// 自治体の一覧
    ListTenants,
}

#[derive(Subcommand, Debug)]
enum KnowledgeCommand {
    /// すべての文書をもう一度処理する（稼働中のサービスが順に処理します）
    Reindex {
        /// 自治体の識別名（既定: 設定の default_tenant）
        #[arg(long)]
        tenant: Option<String>,
    },
    /// 以前の版が暗号化せずに保存したファイルを、いま暗号化して結果を表示する（起動時にも自動で行います）
    EncryptFiles {
        /// 自治体の識別名（既定: すべての自治体）
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// 監査ログのハッシュチェーンを検証する（改ざん・削除・並べ替えの検出）
    Verify,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("YAKUBA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let listen = match &cli.command {
        Command::Serve { listen } => listen.clone(),
        _ => None,
    };
    let flags = Overrides {
        listen,
        data_dir: cli.data_dir.clone(),
        database_url: cli.database_url.clone(),
    };
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("エラー: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("エラー: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("エラー: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<ExitCode, String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match command {
        Command::Serve { .. } => {
            let listen = config.listen.clone();
            let state = crate::build_state(config, clock)
                .await
                .map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| format!("{listen} で待ち受けできません: {e}"))?;
            tracing::info!(address = %listen, "yakuba is listening");
            println!("yakuba を起動しました: http://{listen}/");
            let housekeeping = crate::spawn_housekeeping(state.clone());
            crate::serve(listener, state, shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
            housekeeping.abort();
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            println!("データベースは最新の構造です。");
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin { command } => admin(command, &config, clock.as_ref()).await,
        Command::Backup { dest } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let done = crate::backup::backup(&store, &config, &dest, clock.now_ms()).await;
            store.close().await;
            let done = done?;
            println!(
                "バックアップを作成しました: {}（ファイル {}件、{} バイト、データ構造 {}）",
                dest.display(),
                done.files,
                done.bytes,
                done.schema_version
            );
            println!("保存ファイルの暗号化に使うマスターキーは、バックアップに含まれません。バックアップとは別の安全な場所に保管してください（復元先でも同じマスターキーが必要です）。");
            Ok(ExitCode::SUCCESS)
        }
        Command::Model {
            command:
                ModelCommand::Pull {
                    repo,
                    file,
                    revision,
                    endpoint,
                    token,
                    sha256,
                },
        } => {
            let dir = config.models_dir();
            let pull = crate::model_pull::Pull {
                endpoint: &endpoint,
                repo: &repo,
                file: &file,
                revision: &revision,
                token: token.as_deref(),
                sha256: sha256.as_deref(),
                proxy: config.llm.egress_proxy.as_deref(),
                dest_dir: &dir,
            };
            let mut last = 0u64;
            let done = crate::model_pull::pull(&pull, |got, total| {
                if got >= last + 50_000_000 || Some(got) == total {
                    last = got;
                    match total {
                        Some(t) if t > 0 => eprintln!(
                            "  {} / {} MB（{}%）",
                            got / 1_000_000,
                            t / 1_000_000,
                            got * 100 / t
                        ),
                        _ => eprintln!("  {} MB", got / 1_000_000),
                    }
                }
            })
            .await?;
            if done.resumed_from > 0 {
                println!(
                    "前回の続き（{} バイト目）から再開しました。",
                    done.resumed_from
                );
            }
            println!(
                "ダウンロードしました: {}（{} バイト、SHA-256 {}{}）",
                done.path.display(),
                done.bytes,
                done.sha256,
                if done.verified_against.is_some() {
                    "、確認済み"
                } else {
                    "、照合する値なし"
                }
            );
            println!(
                "モデル: {}（{}、コンテキスト {}）{}",
                done.info.name.as_deref().unwrap_or("-"),
                done.info.architecture,
                done.info.context_length,
                if done.info.instruction_tuned() {
                    ""
                } else {
                    "。チャットテンプレートがないため、事前学習のみのモデルと思われます"
                }
            );
            println!("管理 → AIモデル の「ローカルモデル」から選べます。");
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            set,
            models,
            judge,
            out,
            tenant,
        } => {
            let text = match &set {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| format!("問題集 {} を読めません: {e}", p.display()))?,
                None => crate::eval::SAMPLE_SET.to_string(),
            };
            let items = crate::eval::parse_set(&text)
                .map_err(|errs| format!("問題集に誤りがあります:\n{}", errs.join("\n")))?;
            let state = crate::build_state(config.clone(), clock.clone())
                .await
                .map_err(|e| e.to_string())?;
            let t = tenant_of(&state.store, &config, tenant.as_deref()).await?;
            let candidates = crate::eval_web::targets(&state, &t.id, &models).await?;
            let judge = crate::eval_web::targets(&state, &t.id, std::slice::from_ref(&judge))
                .await?
                .remove(0);
            let started = std::time::Instant::now();
            let summary = crate::eval::run(&items, &candidates, &judge, &out, |done, total| {
                eprintln!("  {done} / {total}");
            })
            .await;
            state.store.close().await;
            let summary = summary?;
            for m in &summary.models {
                println!(
                    "{}: 平均 {}（{}問中 {}問を採点、エラー {}件、回答時間 {:.1}秒、入力 {}文字・出力 {}文字）",
                    m.model,
                    m.mean.map_or_else(|| "-".to_string(), |x| format!("{x:.2}")),
                    m.answered,
                    m.graded,
                    m.errors,
                    m.seconds,
                    m.input_chars,
                    m.output_chars
                );
                for (cat, (n, mean)) in &m.by_category {
                    println!(
                        "  {cat}: {}（{n}問）",
                        mean.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
                    );
                }
            }
            println!(
                "報告: {} / {}（{:.1}秒）",
                summary.report.display(),
                summary.summary.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Model {
            command: ModelCommand::List,
        } => {
            let files = crate::local_models::list_files(&config);
            println!("モデル用フォルダ: {}", config.models_dir().display());
            if files.is_empty() {
                println!("GGUF ファイルはありません。");
            }
            for f in files {
                println!(
                    "{}\t{}{}",
                    f.name,
                    f.summary(),
                    if f.base_model() {
                        "（事前学習のみ）"
                    } else {
                        ""
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Knowledge {
            command: KnowledgeCommand::Reindex { tenant },
        } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let t = tenant_of(&store, &config, tenant.as_deref()).await?;
            let mut n = 0;
            for c in store.collections(&t.id).await.map_err(|e| e.to_string())? {
                for d in store
                    .documents(&t.id, &c.id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    store
                        .requeue_document(&t.id, &d.id, clock.now_ms())
                        .await
                        .map_err(|e| e.to_string())?;
                    n += 1;
                }
            }
            store.close().await;
            println!("自治体「{}」の文書 {n}件を処理の待ち行列に入れました。稼働中のサービスが順に処理します。", t.name);
            Ok(ExitCode::SUCCESS)
        }
        Command::Knowledge {
            command: KnowledgeCommand::EncryptFiles { tenant },
        } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let result = encrypt_files(&store, &config, clock.clone(), tenant.as_deref()).await;
            store.close().await;
            result
        }
        Command::Export { out, tenant } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let result = export_cli(&store, &config, &out, tenant.as_deref(), clock.now_ms()).await;
            store.close().await;
            result
        }
        Command::Import { file } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let morph = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || crate::knowledge::morph(&config))
                    .await
                    .map_err(|e| e.to_string())?
            };
            let result = match crate::encryption::open(&config, &store, clock.clone(), true).await {
                Ok(blobs) => {
                    crate::tenant_export::import(&store, &blobs, &config.data_dir, &file, morph)
                        .await
                }
                Err(e) => Err(e),
            };
            let verified = store.verify_audit().await.map_err(|e| e.to_string());
            store.close().await;
            let (m, counts) = result?;
            tracing::info!(tenant = %m.tenant_slug, file = %file.display(), "tenant imported");
            println!(
                "自治体「{}」（{}）を取り込みました（{} に書き出されたもの）。",
                m.tenant_name, m.tenant_slug, m.exported_at
            );
            for (table, n) in counts {
                println!("  {table}: {n}件");
            }
            println!("パスワードと API キーは移行されません。yakuba admin reset-password --tenant {} で仮パスワードを発行し、AI サービスの API キーを管理画面で設定してください。", m.tenant_slug);
            if verified?.iter().all(|r| r.result.is_ok()) {
                println!("監査ログのハッシュチェーンを検証しました。改ざんは見つかりません。");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("注意: 監査ログの検証に失敗しました（yakuba audit verify で詳細を確認してください）。");
                Ok(ExitCode::from(1))
            }
        }
        Command::Restore { src, force } => {
            let message = crate::backup::restore(&config, &src, force, clock.now_ms()).await?;
            // Open it as the service would: migrations, the chain.
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let reports = store.verify_audit().await.map_err(|e| e.to_string())?;
            // The tenants' keys came back with the database; only the master key that
            // wrapped them opens them, and it is not in the backup.
            let keys = match store.tenant_key_count().await.map_err(|e| e.to_string())? {
                0 => Ok(()),
                _ => crate::encryption::open(&config, &store, clock.clone(), false)
                    .await
                    .map(|_| ()),
            };
            store.close().await;
            println!("{message}");
            let mut code = ExitCode::SUCCESS;
            if reports.iter().all(|r| r.result.is_ok()) {
                println!("監査ログのハッシュチェーンを検証しました。改ざんは見つかりません。");
            } else {
                println!("注意: 監査ログの検証に失敗しました（yakuba audit verify で詳細を確認してください）。");
                code = ExitCode::from(1);
            }
            match keys {
                Ok(()) => println!("マスターキーで自治体の暗号鍵を開けることを確認しました。"),
                Err(e) => {
                    println!("注意: {e}");
                    code = ExitCode::from(1);
                }
            }
            Ok(code)
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let (store, _) = crate::open_store(&config, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let reports = store.verify_audit().await.map_err(|e| e.to_string())?;
            let tenants = store.list_tenants().await.map_err(|e| e.to_string())?;
            let mut ok = true;
            for r in reports {
                let name = tenants
                    .iter()
                    .find(|t| t.id == r.tenant_id)
                    .map(|t| t.slug.clone())
                    .unwrap_or(r.tenant_id.clone());
                match r.result {
                    Ok(n) => {
                        println!("OK  {name}: {n}件の記録を検証しました。改ざんは見つかりません。")
                    }
                    Err(b) => {
                        ok = false;
                        println!(
                            "NG  {name}: 連番 {} で検証に失敗しました — {}",
                            b.seq, b.reason
                        );
                    }
                }
            }
            store.close().await;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

async fn export_cli(
    store: &Store,
    config: &Config,
    out: &std::path::Path,
    tenant: Option<&str>,
    now: i64,
) -> Result<ExitCode, String> {
    let t = tenant_of(store, config, tenant).await?;
    if out.exists() {
        return Err(format!(
            "{} はすでにあります。別のファイル名を指定してください。",
            out.display()
        ));
    }
    // Written under a temporary name and renamed when complete.
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial)
        .map_err(|e| format!("{} を作成できません: {e}", partial.display()))?;
    let exported = match crate::encryption::open(config, store, Arc::new(SystemClock), true).await {
        Ok(blobs) => crate::tenant_export::export(store, &blobs, &t, file, now).await,
        Err(e) => Err(e),
    };
    let m = match exported {
        Ok((m, _)) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| e.to_string())?;
    let rows: u64 = m.files.iter().map(|f| f.rows).sum();
    store
        .append_audit(&cli_event(&t.id, now).with(
            "tenant.export",
            format!("tenant:{}", t.id),
            serde_json::json!({"files": m.files.len(), "rows": rows, "via": "cli"}),
        ))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "自治体「{}」の全データを {} に書き出しました（{} 表、{} 件）。",
        t.name,
        out.display(),
        m.files.len(),
        rows
    );
    Ok(ExitCode::SUCCESS)
}

/// `yakuba knowledge encrypt-files`: seals what earlier versions stored in plaintext and
/// says per tenant what it did; fails when a file could not be sealed.
async fn encrypt_files(
    store: &Store,
    config: &Config,
    clock: Arc<dyn Clock>,
    tenant: Option<&str>,
) -> Result<ExitCode, String> {
    let blobs = crate::encryption::open(config, store, clock.clone(), true).await?;
    let tenants = match tenant {
        Some(_) => vec![tenant_of(store, config, tenant).await?],
        None => store.list_tenants().await.map_err(|e| e.to_string())?,
    };
    let now = clock.now_ms();
    let reports =
        crate::encryption::seal_legacy(&blobs, store, &tenants, |t| cli_event(t, now)).await;
    let mut ok = true;
    for (t, r) in tenants.iter().zip(reports) {
        match r {
            Ok(r) => {
                println!(
                    "自治体「{}」: 暗号化 {}件、暗号化済み {}件、失敗 {}件",
                    t.name,
                    r.sealed,
                    r.already,
                    r.failed.len()
                );
                for (name, why) in &r.failed {
                    ok = false;
                    println!("  失敗 {name}: {why}");
                }
            }
            Err(e) => {
                ok = false;
                println!("自治体「{}」: 失敗 — {e}", t.name);
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn tenant_of(
    store: &Store,
    config: &Config,
    slug: Option<&str>,
) -> Result<storage::Tenant, String> {
    let slug = slug.unwrap_or(&config.default_tenant);
    store.tenant_by_slug(slug).await.map_err(|e| match e {
        storage::StorageError::NotFound => {
            format!("自治体「{slug}」はありません（yakuba admin list-tenants で確認できます）")
        }
        other => other.to_string(),
    })
}

fn cli_event(tenant_id: &str, now: i64) -> AuditEvent {
    let who = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    AuditEvent {
        tenant_id: tenant_id.to_string(),
        at_ms: now,
        actor_login: format!("cli:{who}"),
        ip: "local".into(),
        user_agent: "yakuba-cli".into(),
        ..Default::default()
    }
}

async fn admin(
    command: AdminCommand,
    config: &Config,
    clock: &dyn Clock,
) -> Result<ExitCode, String> {
    let now = clock.now_ms();
    let (store, _) = crate::open_store(config, now)
        .await
        .map_err(|e| e.to_string())?;
    let result = match command {
        AdminCommand::CreateUser {
            login_id,
            name,
            department,
            role,
            email,
            tenant,
        } => {
            let t = tenant_of(&store, config, tenant.as_deref()).await?;
            let login_id = domain::validate::login_id(&login_id)?;
            let name = domain::validate::required_line("氏名", &name, 100)?;
            let path = domain::validate::department_path(&department)?;
            let email = domain::validate::email(email.as_deref().unwrap_or(""))?;
            let role = Role::parse(&role.replace('-', "_")).ok_or(
                "権限は user, department-admin, tenant-admin, auditor, support のいずれかです",
            )?;
            let ev = cli_event(&t.id, now);
            let dept = store
                .ensure_department_path(&t.id, &path, now, ev.clone())
                .await
                .map_err(|e| e.to_string())?;
            let crate::ops::Temporary {
                password: temp,
                hash,
                until,
            } = crate::ops::issue_temporary(config.hash_cost(), &t.settings.password, now)
                .await
                .map_err(|e| e.to_string())?;
            let hours = t.settings.password.temporary_valid_hours;
            let nu = NewUser {
                tenant_id: t.id.clone(),
                login_id,
                display_name: name,
                email,
                department_id: dept.id,
                role,
                password_hash: hash,
                temporary_until: Some(until),
                now,
            };
            let u = store.create_user(&nu, ev).await.map_err(|e| match e {
                storage::StorageError::Conflict(m) => m,
                other => other.to_string(),
            })?;
            println!("ユーザーを作成しました。");
            println!("  自治体:       {}（{}）", t.name, t.slug);
            println!("  ログインID:   {}", u.login_id);
            println!("  氏名:         {}", u.display_name);
            println!("  所属:         {}", u.department_path);
            println!("  権限:         {}", u.role.label());
            println!("  仮パスワード: {temp}");
            println!("仮パスワードは今回だけ表示されます。{hours}時間以内にログインし、新しいパスワードに変更してください。");
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::ResetPassword { login_id, tenant } => {
            let t = tenant_of(&store, config, tenant.as_deref()).await?;
            let u = store
                .user_by_login(&t.id, &login_id)
                .await
                .map_err(|_| format!("ログインID「{login_id}」のユーザーはいません"))?;
            let crate::ops::Temporary {
                password: temp,
                hash,
                until,
            } = crate::ops::issue_temporary(config.hash_cost(), &t.settings.password, now)
                .await
                .map_err(|e| e.to_string())?;
            let hours = t.settings.password.temporary_valid_hours;
            store
                .set_password(
                    &t.id,
                    &u.id,
                    &hash,
                    Some(until),
                    None,
                    now,
                    cli_event(&t.id, now),
                )
                .await
                .map_err(|e| e.to_string())?;
            println!("{}（{}）の仮パスワード: {temp}", u.display_name, u.login_id);
            println!("仮パスワードは今回だけ表示されます。{hours}時間有効です。");
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::CreateTenant { slug, name, host } => {
            let slug = domain::validate::login_id(&slug)
                .map_err(|_| "識別名は半角英数字で指定してください".to_string())?;
            let name = domain::validate::required_line("名称", &name, 100)?;
            let ev = cli_event("", now);
            let t = store
                .create_tenant(&slug, &name, host.as_deref(), now, ev)
                .await
                .map_err(|e| match e {
                    storage::StorageError::Conflict(m) => m,
                    other => other.to_string(),
                })?;
            println!("自治体「{}」（{}）を作成しました。", t.name, t.slug);
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::ListTenants => {
            for t in store.list_tenants().await.map_err(|e| e.to_string())? {
                println!("{}\t{}\t{}", t.slug, t.name, t.host.unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    store.close().await;
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
