//! Benchmarks of the models a city buys (M3, Q13), for tenant admins: start `yakuba eval`
//! from the admin pages with the shipped question set or an uploaded JSONL, watch it
//! progress, resume one cut off by a restart, and download the report. Runs live under
//! `<data_dir>/eval/<tenant>/<run>/` with the same files the command writes.

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Mutex;

use askama::Template;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::app::{Shared, TenantAdmin};
use crate::error::{AppError, AppResult};
use crate::eval::{self, Item, Target};
use crate::pages::{render, Layout};

/// Runs going on in this process (a run in `run.json` as running but not here was cut
/// off by a restart and can be resumed).
static RUNNING: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn running(id: &str) -> bool {
    RUNNING
        .lock()
        .map(|r| r.as_ref().is_some_and(|s| s.contains(id)))
        .unwrap_or(false)
}

fn set_running(id: &str, on: bool) -> bool {
    let mut g = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    let s = g.get_or_insert_with(HashSet::new);
    if on {
        s.insert(id.to_string())
    } else {
        s.remove(id)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub created_at: i64,
    pub by: String,
    pub set_name: String,
    /// Model ids of the candidates, and of the judge.
    pub models: Vec<String>,
    pub judge: String,
    pub total: usize,
    /// `running`, `done` or `failed`.
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
}

fn tenant_dir(state: &Shared, tenant: &str) -> PathBuf {
    state.config.data_dir.join("eval").join(tenant)
}

fn run_dir(state: &Shared, tenant: &str, id: &str) -> Option<PathBuf> {
    domain::ids::is_valid_id(id).then(|| tenant_dir(state, tenant).join(id))
}

fn read_info(dir: &FsPath) -> Option<RunInfo> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).ok()?).ok()
}

fn write_info(dir: &FsPath, info: &RunInfo) -> Result<(), String> {
    let tmp = dir.join("run.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(info).map_err(|e| e.to_string())?,
    )
    .and_then(|()| std::fs::rename(&tmp, dir.join("run.json")))
    .map_err(|e| e.to_string())
}

/// The configured models named by id or display name, as eval targets.
pub async fn targets(
    state: &Shared,
    tenant: &str,
    names: &[String],
) -> Result<Vec<Target>, String> {
    let models = state
        .store
        .list_models(tenant)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for n in names {
        let m = models
            .iter()
            .find(|m| &m.id == n || &m.display_name == n)
            .ok_or_else(|| format!("モデル「{n}」は設定されていません（管理 → AIモデル の表示名かIDを指定してください）"))?;
        let p = state
            .store
            .provider(tenant, &m.provider_id)
            .await
            .map_err(|e| e.to_string())?;
        let client = crate::chat::client_for(state, &p).map_err(|e| e.message_ja())?;
        out.push(Target {
            label: m.display_name.clone(),
            client,
            model: m.model.clone(),
        });
    }
    Ok(out)
}

/// Runs (or resumes) a run in the background, keeping `run.json` current.
fn spawn(state: Shared, tenant: String, dir: PathBuf, mut info: RunInfo, items: Vec<Item>) {
    if !set_running(&info.id, true) {
        return;
    }
    tokio::spawn(async move {
        let result = async {
            let candidates = targets(&state, &tenant, &info.models).await?;
            let judge = targets(&state, &tenant, std::slice::from_ref(&info.judge))
                .await?
                .remove(0);
            eval::run(&items, &candidates, &judge, &dir, |_, _| {}).await
        }
        .await;
        match result {
            Ok(_) => {
                info.state = "done".into();
                info.error = None;
            }
            Err(e) => {
                tracing::warn!(run = %info.id, error = %e, "evaluation failed");
                info.state = "failed".into();
                info.error = Some(e);
            }
        }
        if let Err(e) = write_info(&dir, &info) {
            tracing::warn!(error = %e, "could not record the evaluation's end");
        }
        set_running(&info.id, false);
    });
}

pub struct RunRow {
    pub id: String,
    pub when: String,
    pub by: String,
    pub set_name: String,
    pub models: String,
    pub judge: String,
    pub progress: String,
    pub state: String,
    pub error: String,
    pub can_resume: bool,
    pub has_report: bool,
    /// (model, mean, answered) from the summary.
    pub scores: Vec<(String, String, usize)>,
}

#[derive(Template)]
#[template(path = "admin/eval.html")]
struct EvalPage {
    l: Layout,
    models: Vec<(String, String)>,
    runs: Vec<RunRow>,
    errors: Vec<String>,
    sample_count: usize,
}

async fn page_with(
    state: &Shared,
    a: &crate::app::Authed,
    errors: Vec<String>,
) -> AppResult<Response> {
    let tenant = &a.ctx.tenant.id;
    let models = state.store.list_models(tenant).await?;
    let name_of = |id: &str| {
        models.iter().find(|m| m.id == id).map_or_else(
            || "（削除されたモデル）".to_string(),
            |m| m.display_name.clone(),
        )
    };
    let mut runs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(tenant_dir(state, tenant)) {
        for e in entries.flatten() {
            let Some(info) = read_info(&e.path()) else {
                continue;
            };
            let done = eval::done_so_far(&e.path());
            let live = running(&info.id);
            let state_label = match (info.state.as_str(), live) {
                ("running", true) => "実行中",
                ("running", false) => "中断（再開できます）",
                ("done", _) => "完了",
                _ => "失敗",
            };
            let items = std::fs::read_to_string(e.path().join("set.jsonl"))
                .ok()
                .and_then(|t| eval::parse_set(&t).ok())
                .unwrap_or_default();
            let labels: Vec<String> = info.models.iter().map(|m| name_of(m)).collect();
            let scores = if done.is_empty() {
                Vec::new()
            } else {
                labels
                    .iter()
                    .map(|l| {
                        let s: Vec<u8> = done
                            .iter()
                            .filter(|o| &o.model == l)
                            .filter_map(|o| o.score)
                            .collect();
                        let n = done.iter().filter(|o| &o.model == l).count();
                        let mean = if s.is_empty() {
                            "-".to_string()
                        } else {
                            format!(
                                "{:.2}",
                                s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64
                            )
                        };
                        (l.clone(), mean, n)
                    })
                    .collect()
            };
            runs.push(RunRow {
                when: domain::time::format_jst_compact(info.created_at),
                by: info.by.clone(),
                set_name: info.set_name.clone(),
                models: labels.join("、"),
                judge: name_of(&info.judge),
                progress: format!("{} / {}", done.len().min(info.total), info.total),
                state: state_label.into(),
                error: info.error.clone().unwrap_or_default(),
                can_resume: !live && info.state != "done" && !items.is_empty(),
                has_report: e.path().join("report.csv").is_file(),
                scores,
                id: info.id.clone(),
            });
        }
    }
    runs.sort_by(|a, b| b.when.cmp(&a.when).then(b.id.cmp(&a.id)));
    render(&EvalPage {
        l: Layout::for_user(a, "モデルの評価", "eval"),
        models: models
            .iter()
            .map(|m| (m.id.clone(), m.display_name.clone()))
            .collect(),
        runs,
        errors,
        sample_count: eval::parse_set(eval::SAMPLE_SET)
            .map(|s| s.len())
            .unwrap_or(0),
    })
}

async fn page(State(state): State<Shared>, TenantAdmin(a): TenantAdmin) -> AppResult<Response> {
    page_with(&state, &a, Vec::new()).await
}

async fn start(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    mp: Multipart,
) -> AppResult<Response> {
    let up = crate::form::read_upload(mp).await?;
    let mut errors = Vec::new();
    let (set_name, text) = match up.file.filter(|b| !b.is_empty()) {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(t) => ("アップロードした問題集".to_string(), t),
            Err(_) => {
                errors.push("問題集は UTF-8 の JSONL ファイルにしてください。".to_string());
                (String::new(), String::new())
            }
        },
        None => (
            "同梱のサンプル問題集".to_string(),
            eval::SAMPLE_SET.to_string(),
        ),
    };
    let items = if errors.is_empty() {
        match eval::parse_set(&text) {
            Ok(i) => i,
            Err(e) => {
                errors.extend(e.into_iter().take(20));
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let tenant = a.ctx.tenant.id.clone();
    let known = state.store.list_models(&tenant).await?;
    let mut chosen: Vec<String> = up
        .fields
        .keys()
        .filter_map(|k| k.strip_prefix("model_"))
        .filter(|id| known.iter().any(|m| m.id == *id))
        .map(str::to_string)
        .collect();
    chosen.sort();
    if chosen.is_empty() {
        errors.push("評価するモデルを1つ以上選んでください。".into());
    }
    let judge = up.fields.get("judge").cloned().unwrap_or_default();
    if !known.iter().any(|m| m.id == judge) {
        errors.push("採点に使うモデルを選んでください。".into());
    }
    if !errors.is_empty() {
        return page_with(&state, &a, errors).await;
    }
    let id = domain::ids::new_id();
    let dir = tenant_dir(&state, &tenant).join(&id);
    std::fs::create_dir_all(&dir).map_err(|e| AppError::Internal(e.to_string()))?;
    std::fs::write(dir.join("set.jsonl"), &text).map_err(|e| AppError::Internal(e.to_string()))?;
    let info = RunInfo {
        id: id.clone(),
        created_at: a.ctx.now,
        by: a.auth.user.login_id.clone(),
        set_name,
        total: items.len() * chosen.len(),
        models: chosen,
        judge,
        state: "running".into(),
        error: None,
    };
    write_info(&dir, &info).map_err(AppError::Internal)?;
    state
        .store
        .append_audit(&a.audit().with(
            "eval.start",
            id.clone(),
            serde_json::json!({"models": info.models, "judge": info.judge, "questions": items.len()}),
        ))
        .await?;
    spawn(state.clone(), tenant, dir, info, items);
    Ok(Redirect::to("/admin/eval").into_response())
}

async fn resume(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let tenant = a.ctx.tenant.id.clone();
    let dir = run_dir(&state, &tenant, &id).ok_or(AppError::NotFound)?;
    let mut info = read_info(&dir).ok_or(AppError::NotFound)?;
    if !running(&id) {
        let items = std::fs::read_to_string(dir.join("set.jsonl"))
            .ok()
            .and_then(|t| eval::parse_set(&t).ok())
            .ok_or(AppError::NotFound)?;
        info.state = "running".into();
        info.error = None;
        write_info(&dir, &info).map_err(AppError::Internal)?;
        spawn(state.clone(), tenant, dir, info, items);
    }
    Ok(Redirect::to("/admin/eval").into_response())
}

async fn download(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path((id, file)): Path<(String, String)>,
) -> AppResult<Response> {
    if !matches!(file.as_str(), "report.csv" | "summary.csv") {
        return Err(AppError::NotFound);
    }
    let dir = run_dir(&state, &a.ctx.tenant.id, &id).ok_or(AppError::NotFound)?;
    let body = std::fs::read(dir.join(&file)).map_err(|_| AppError::NotFound)?;
    let name = format!("eval-{}-{file}", &id[..id.len().min(8)]);
    Ok(crate::csvout::response(&name, body))
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/eval", get(page).post(start))
        .route("/admin/eval/{id}/resume", post(resume))
        .route("/admin/eval/{id}/{file}", get(download))
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
}
