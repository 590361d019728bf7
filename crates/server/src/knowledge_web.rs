//! Knowledge pages and API (M8): collections (a department's, or shared tenant-wide,
//! with a classification and optionally named members), uploads streamed to disk with
//! per-file results and then sealed into the tenant's encrypted file store (the staged
//! plaintext, 0600 in the work area, goes whatever happens), documents with their
//! progress, the page view a citation opens, and
//! search. Every object is fetched through the tenant and checked with
//! `domain::policy`; what the caller may not read answers 404.

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::knowledge::{self, place};
use crate::pages::{render, render_status, Layout};
use askama::Template;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use domain::policy::{self, Decision};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use storage::{Collection, CollectionInput, KbDocument, NewDocument, StorageError};
use tokio::io::AsyncWriteExt;

pub fn routes(max_file: usize) -> Router<Shared> {
    Router::new()
        .route("/knowledge", get(list_page).post(create))
        .route("/knowledge/{id}", get(collection_page))
        .route("/knowledge/{id}/settings", post(save_settings))
        .route("/knowledge/{id}/delete", post(delete_collection))
        .route(
            "/knowledge/{id}/documents",
            post(upload).layer(DefaultBodyLimit::max(max_file + 1024 * 1024)),
        )
        .route("/knowledge/documents/{id}/delete", post(delete_document))
        .route("/knowledge/documents/{id}/reindex", post(reindex))
        .route("/knowledge/documents/{id}/pages/{page}", get(page_view))
        .route("/api/v1/knowledge/collections", get(api_collections))
        .route(
            "/api/v1/knowledge/collections/{id}/documents",
            get(api_documents)
                .post(upload)
                .layer(DefaultBodyLimit::max(max_file + 1024 * 1024)),
        )
        .route("/api/v1/knowledge/search", get(api_search))
}

fn decide(d: Decision) -> AppResult<()> {
    match d {
        Decision::Allow => Ok(()),
        Decision::Forbidden => Err(AppError::Forbidden),
        Decision::NotFound => Err(AppError::NotFound),
    }
}

/// A collection the caller may know of.
async fn visible(state: &Shared, a: &Authed, id: &str) -> AppResult<Collection> {
    let c = state.store.collection(&a.ctx.tenant.id, id).await?;
    if !policy::see_collection(a.actor(), &place(&c, &a.auth.user.id)) {
        return Err(AppError::NotFound);
    }
    Ok(c)
}

async fn managed(state: &Shared, a: &Authed, id: &str) -> AppResult<Collection> {
    let c = state.store.collection(&a.ctx.tenant.id, id).await?;
    decide(policy::manage_collection(
        a.actor(),
        &place(&c, &a.auth.user.id),
    ))?;
    Ok(c)
}

/// A document whose text the caller may read.
async fn readable_document(
    state: &Shared,
    a: &Authed,
    id: &str,
) -> AppResult<(KbDocument, Collection)> {
    let d = state.store.document(&a.ctx.tenant.id, id).await?;
    let c = state
        .store
        .collection(&a.ctx.tenant.id, &d.collection_id)
        .await?;
    decide(policy::read_collection(
        a.actor(),
        &place(&c, &a.auth.user.id),
    ))?;
    Ok((d, c))
}

fn class_label(c: i64) -> &'static str {
    match c {
        1 => "機密性1",
        2 => "機密性2",
        _ => "機密性3",
    }
}

fn size_label(bytes: i64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", (b / 1e3).max(1.0))
    }
}

fn status_label(d: &KbDocument) -> String {
    match d.status.as_str() {
        "queued" => "処理待ち".into(),
        "processing" => match d.pages {
            Some(n) if n > 0 => format!("処理中（{}/{}ページ）", d.pages_done, n),
            _ => "処理中".into(),
        },
        "ready" if !d.ocr_pages.is_empty() => format!(
            "検索できます（OCRで読み取ったページ: {}）",
            d.ocr_pages
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "ready" => "検索できます".into(),
        "needs_ocr" => "一部のページは OCR が必要です".into(),
        _ => format!("失敗: {}", d.error.as_deref().unwrap_or("不明なエラー")),
    }
}

fn doc_json(d: &KbDocument) -> serde_json::Value {
    json!({
        "id": d.id, "name": d.name, "kind": d.kind, "bytes": d.bytes, "status": d.status,
        "status_label": status_label(d), "pages": d.pages, "pages_done": d.pages_done,
        "ocr_pages": d.ocr_pages, "error": d.error,
        "created_at": domain::time::format_utc(d.created_at),
    })
}

// ------------------------------------------------------------------ pages

pub struct CollectionRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub class: &'static str,
    pub restricted: bool,
    pub documents: i64,
    pub size: String,
    pub readable: bool,
}

#[derive(Template)]
#[template(path = "knowledge/list.html")]
struct ListPage {
    l: Layout,
    rows: Vec<CollectionRow>,
    departments: Vec<(String, String)>,
    can_create: bool,
    can_shared: bool,
    used: String,
    quota: String,
    errors: Vec<String>,
}

async fn list_view(state: &Shared, a: &Authed, errors: Vec<String>) -> AppResult<ListPage> {
    // Straight from the database: a department made a moment ago must be offered.
    let paths = state.store.department_paths(&a.ctx.tenant.id).await?;
    let actor = a.actor();
    let mut departments: Vec<(String, String)> = paths
        .iter()
        .filter(|(_, p)| policy::create_collection(actor, Some(p)) == Decision::Allow)
        .map(|(id, p)| (id.clone(), p.clone()))
        .collect();
    departments.sort_by(|x, y| x.1.cmp(&y.1));
    let rows = state
        .store
        .collections(&a.ctx.tenant.id)
        .await?
        .into_iter()
        .filter(|c| policy::see_collection(actor, &place(c, &a.auth.user.id)))
        .map(|c| CollectionRow {
            readable: policy::read_collection(actor, &place(&c, &a.auth.user.id))
                == Decision::Allow,
            owner: c
                .department_path
                .clone()
                .unwrap_or_else(|| "全庁共有".into()),
            class: class_label(c.classification),
            restricted: c.restricted,
            documents: c.documents,
            size: size_label(c.bytes),
            id: c.id,
            name: c.name,
        })
        .collect();
    let can_shared = policy::create_collection(actor, None) == Decision::Allow;
    Ok(ListPage {
        l: Layout::for_user(a, "ナレッジ", "knowledge"),
        rows,
        can_create: can_shared || !departments.is_empty(),
        can_shared,
        departments,
        used: size_label(state.store.knowledge_bytes(&a.ctx.tenant.id).await?),
        quota: size_label(state.config.knowledge.tenant_quota_bytes as i64),
        errors,
    })
}

async fn list_page(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    crate::chat::require_chat(&a)?;
    render(&list_view(&state, &a, Vec::new()).await?)
}

fn collection_input(
    f: &HashMap<String, String>,
    department_id: Option<String>,
) -> Result<CollectionInput, Vec<String>> {
    let mut errors = Vec::new();
    let name = domain::validate::required_line(
        "名前",
        f.get("name").map(String::as_str).unwrap_or(""),
        100,
    )
    .map_err(|e| errors.push(e))
    .unwrap_or_default();
    let description = domain::validate::multi_line(
        "説明",
        f.get("description").map(String::as_str).unwrap_or(""),
        1000,
    )
    .map_err(|e| errors.push(e))
    .unwrap_or_default();
    let classification = match f.get("classification").map(String::as_str) {
        Some("1") => 1,
        Some("2") | None => 2,
        Some("3") => 3,
        Some(_) => {
            errors.push("機密性は1〜3から選んでください。".into());
            2
        }
    };
    if errors.is_empty() {
        Ok(CollectionInput {
            department_id,
            name,
            description,
            classification,
            restricted: f.get("restricted").is_some_and(|v| v == "1" || v == "on"),
        })
    } else {
        Err(errors)
    }
}

async fn create(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    crate::chat::require_chat(&a)?;
    let owner = f.get("department_id").map(|s| s.trim()).unwrap_or("");
    let (department_id, path) = if owner.is_empty() {
        (None, None)
    } else {
        // From the database: a department made a moment ago is not in the cached catalog.
        let paths = state.store.department_paths(&a.ctx.tenant.id).await?;
        let p = paths.get(owner).cloned().ok_or(AppError::NotFound)?;
        (Some(owner.to_string()), Some(p))
    };
    decide(policy::create_collection(a.actor(), path.as_deref()))?;
    let input = match collection_input(&f, department_id) {
        Ok(i) => i,
        Err(errors) => {
            return render_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                &list_view(&state, &a, errors).await?,
            )
        }
    };
    match state
        .store
        .create_collection(&a.ctx.tenant.id, &input, a.audit())
        .await
    {
        Ok(id) => Ok(Redirect::to(&format!("/knowledge/{id}")).into_response()),
        Err(StorageError::Conflict(m)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &list_view(&state, &a, vec![m]).await?,
        ),
        Err(e) => Err(e.into()),
    }
}

pub struct DocRow {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub size: String,
    pub status: String,
    pub state: String,
    pub uploaded: String,
}

#[derive(Template)]
#[template(path = "knowledge/collection.html")]
struct CollectionPage {
    l: Layout,
    c: Collection,
    owner: String,
    class: &'static str,
    docs: Vec<DocRow>,
    can_manage: bool,
    can_read: bool,
    members: String,
    max_mb: u64,
    errors: Vec<String>,
    notice: String,
}

async fn collection_view(
    state: &Shared,
    a: &Authed,
    c: Collection,
    errors: Vec<String>,
    notice: &str,
) -> AppResult<CollectionPage> {
    let p = place(&c, &a.auth.user.id);
    let docs = state
        .store
        .documents(&a.ctx.tenant.id, &c.id)
        .await?
        .into_iter()
        .map(|d| DocRow {
            status: status_label(&d),
            state: d.status.clone(),
            kind: documents::Kind::parse(&d.kind)
                .map(|k| k.label())
                .unwrap_or("-")
                .to_string(),
            size: size_label(d.bytes),
            uploaded: domain::time::format_jst(d.created_at),
            id: d.id,
            name: d.name,
        })
        .collect();
    let mut members = Vec::new();
    for m in &c.member_ids {
        if let Ok(u) = state.store.user_by_id(&a.ctx.tenant.id, m).await {
            members.push(u.login_id);
        }
    }
    Ok(CollectionPage {
        l: Layout::for_user(a, &c.name, "knowledge"),
        owner: c
            .department_path
            .clone()
            .unwrap_or_else(|| "全庁共有".into()),
        class: class_label(c.classification),
        can_manage: policy::manage_collection(a.actor(), &p) == Decision::Allow,
        can_read: policy::read_collection(a.actor(), &p) == Decision::Allow,
        members: members.join(", "),
        max_mb: state.config.knowledge.max_file_bytes / (1024 * 1024),
        docs,
        c,
        errors,
        notice: notice.to_string(),
    })
}

async fn collection_page(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    let c = visible(&state, &a, &id).await?;
    let notice = match q.get("notice").map(String::as_str) {
        Some("saved") => "設定を保存しました。",
        Some("uploaded") => "ファイルを登録しました。処理が終わると検索できます。",
        Some("deleted") => "文書を削除しました。",
        Some("reindex") => "文書をもう一度処理します。",
        _ => "",
    };
    render(&collection_view(&state, &a, c, Vec::new(), notice).await?)
}

async fn save_settings(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let c = managed(&state, &a, &id).await?;
    let mut errors = Vec::new();
    let input = collection_input(&f, c.department_id.clone())
        .map_err(|e| errors.extend(e))
        .ok();
    let mut members = Vec::new();
    for login in f
        .get("members")
        .map(String::as_str)
        .unwrap_or("")
        .split([',', '、', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match state.store.user_by_login(&a.ctx.tenant.id, login).await {
            Ok(u) => members.push(u.id),
            Err(StorageError::NotFound) => {
                errors.push(format!("ログインID「{login}」の職員は見つかりません。"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (Some(input), true) = (input, errors.is_empty()) else {
        return render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &collection_view(&state, &a, c, errors, "").await?,
        );
    };
    match state
        .store
        .update_collection(&a.ctx.tenant.id, &c.id, &input, &members, a.audit())
        .await
    {
        Ok(()) => Ok(Redirect::to(&format!("/knowledge/{}?notice=saved", c.id)).into_response()),
        Err(StorageError::Conflict(m)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &collection_view(&state, &a, c, vec![m], "").await?,
        ),
        Err(e) => Err(e.into()),
    }
}

async fn delete_collection(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let c = managed(&state, &a, &id).await?;
    let docs = state
        .store
        .delete_collection(&a.ctx.tenant.id, &c.id, a.audit())
        .await?;
    knowledge::forget_collection(&state, &a.ctx.tenant.id, &docs).await?;
    Ok(Redirect::to("/knowledge").into_response())
}

async fn delete_document(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let d = state.store.document(&a.ctx.tenant.id, &id).await?;
    let c = managed(&state, &a, &d.collection_id).await?;
    let d = state
        .store
        .delete_document(&a.ctx.tenant.id, &d.id, a.audit())
        .await?;
    knowledge::forget_document(&state, &d).await?;
    Ok(Redirect::to(&format!("/knowledge/{}?notice=deleted", c.id)).into_response())
}

async fn reindex(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let d = state.store.document(&a.ctx.tenant.id, &id).await?;
    let c = managed(&state, &a, &d.collection_id).await?;
    state
        .store
        .requeue_document(&a.ctx.tenant.id, &d.id, a.ctx.now)
        .await?;
    state.ingest.notify_one();
    Ok(Redirect::to(&format!("/knowledge/{}?notice=reindex", c.id)).into_response())
}

#[derive(Template)]
#[template(path = "knowledge/page.html")]
struct PageView {
    l: Layout,
    d: KbDocument,
    collection: Collection,
    page: i64,
    pages: i64,
    lines: Vec<PageLine>,
    ocr: bool,
}

/// One line of a page as shown: headings (written `# ` in the extracted text) as headings,
/// and the cited passage marked.
pub struct PageLine {
    pub heading: bool,
    /// (text, inside the cited passage, the first marked piece: the scroll target)
    pub parts: Vec<(String, bool, bool)>,
}

/// Splits a page into lines for display, marking the byte range `mark` of `text`.
pub fn page_lines(text: &str, mark: Option<(usize, usize)>) -> Vec<PageLine> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut first = true;
    for line in text.split('\n') {
        let start = at;
        at += line.len() + 1;
        let (heading, skip) = match line.strip_prefix("# ") {
            Some(_) => (true, 2),
            None => (false, 0),
        };
        let body_start = start + skip;
        let body = &line[skip..];
        let mut parts = Vec::new();
        match mark {
            Some((m0, m1)) if m0 < body_start + body.len() && m1 > body_start => {
                let a = m0.max(body_start) - body_start;
                let b = m1.min(body_start + body.len()) - body_start;
                let (a, b) = (floor_char(body, a), floor_char(body, b));
                if a > 0 {
                    parts.push((body[..a].to_string(), false, false));
                }
                parts.push((body[a..b].to_string(), true, first));
                first = false;
                if b < body.len() {
                    parts.push((body[b..].to_string(), false, false));
                }
            }
            _ => parts.push((body.to_string(), false, false)),
        }
        out.push(PageLine { heading, parts });
    }
    out
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A page of a document with the cited passage marked: what a citation opens.
async fn page_view(
    State(state): State<Shared>,
    a: Authed,
    Path((id, page)): Path<(String, i64)>,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    let (d, collection) = readable_document(&state, &a, &id).await?;
    let (text, ocr) = state
        .store
        .document_page(&a.ctx.tenant.id, &d.id, page)
        .await?;
    let chunk = q.get("chunk").cloned().unwrap_or_default();
    let passage = if chunk.is_empty() {
        None
    } else {
        state
            .store
            .passages(&a.ctx.tenant.id, std::slice::from_ref(&chunk))
            .await?
            .into_iter()
            .find(|p| p.document_id == d.id)
    };
    // The passage is a run of the page's text (chunking only trims it).
    let mark = passage.as_ref().and_then(|p| {
        let needle = p.text.trim();
        text.find(needle).map(|i| (i, i + needle.len()))
    });
    let lines = page_lines(&text, mark);
    let pages = d.pages.unwrap_or(page);
    render(&PageView {
        l: Layout::for_user(&a, &d.name, "knowledge"),
        page,
        pages,
        lines,
        ocr,
        collection,
        d,
    })
}

// ------------------------------------------------------------------ upload

/// Cleans a file name as people see it: no directories, no control or bidi characters.
pub fn clean_name(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(*c as u32, 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069 | 0xFEFF)
        })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim().to_string();
    let name: String = cleaned.chars().take(200).collect();
    if name.is_empty() {
        "無題".into()
    } else {
        name
    }
}

struct Received {
    name: String,
    /// The staged plaintext: removed when this is dropped, on every path.
    tmp: tempfile::TempPath,
    bytes: u64,
    sha256: String,
}

/// One upload's outcome.
fn result(name: &str, r: Result<String, String>) -> serde_json::Value {
    match r {
        Ok(id) => json!({"name": name, "ok": true, "document_id": id}),
        Err(e) => json!({"name": name, "ok": false, "error": e}),
    }
}

async fn upload(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    headers: HeaderMap,
    mut mp: Multipart,
) -> AppResult<Response> {
    let c = managed(&state, &a, &id).await?;
    let cfg = &state.config.knowledge;
    let tmp_dir = crate::encryption::work_dir(&state.config);
    tokio::fs::create_dir_all(&tmp_dir)
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let mut results = Vec::new();
    let mut any = false;
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(AppError::TooLarge)
            }
            Err(_) => {
                return Err(AppError::BadRequest(
                    "送信されたファイルを読み取れません。".into(),
                ))
            }
        };
        let Some(raw_name) = field.file_name().map(str::to_string) else {
            continue;
        };
        any = true;
        let name = clean_name(&raw_name);
        let received = receive(field, &tmp_dir, cfg.max_file_bytes).await;
        let r = match received {
            Ok(Some(r)) => {
                store_one(
                    &state,
                    &a,
                    &c,
                    Received {
                        name: name.clone(),
                        ..r
                    },
                )
                .await
            }
            Ok(None) => Err(format!(
                "ファイルが大きすぎます（1ファイル {} MB まで）。",
                cfg.max_file_bytes / (1024 * 1024)
            )),
            Err(e) => Err(e),
        };
        results.push(result(&name, r));
    }
    if !any {
        return Err(AppError::field("file", "ファイルを選んでください。"));
    }
    state.ingest.notify_one();
    let wants_json = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
        || headers.contains_key("x-csrf-token");
    if wants_json {
        let status = if results.iter().all(|r| r["ok"] == true) {
            StatusCode::CREATED
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        return Ok((status, Json(json!({"results": results}))).into_response());
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r["ok"] != true)
        .map(|r| {
            format!(
                "{}: {}",
                r["name"].as_str().unwrap_or(""),
                r["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(Redirect::to(&format!("/knowledge/{}?notice=uploaded", c.id)).into_response())
    } else {
        render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &collection_view(&state, &a, c, failed, "").await?,
        )
    }
}

/// Streams a file field to a temporary file, hashing it; `None` when it is over `max`.
async fn receive(
    mut field: axum::extract::multipart::Field<'_>,
    tmp_dir: &std::path::Path,
    max: u64,
) -> Result<Option<Received>, String> {
    // Private (0600) and removed when `tmp` is dropped: on an error, a refusal, or a
    // client that goes away mid-upload as much as after the file is sealed.
    let staged = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(tmp_dir)
        .map_err(|e| e.to_string())?;
    let (file, tmp) = staged.into_parts();
    let mut f = tokio::fs::File::from_std(file);
    let mut h = Sha256::new();
    let mut n = 0u64;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                n += chunk.len() as u64;
                if n > max {
                    drop(f);
                    drop(tmp);
                    // Read the rest so the next field can be reached.
                    while let Ok(Some(_)) = field.chunk().await {}
                    return Ok(None);
                }
                h.update(&chunk);
                f.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            Ok(None) => break,
            Err(_) => {
                return Err("ファイルを受け取れませんでした（通信が途中で切れました）。".into());
            }
        }
    }
    f.sync_all().await.map_err(|e| e.to_string())?;
    Ok(Some(Received {
        name: String::new(),
        tmp,
        bytes: n,
        sha256: hex::encode(h.finalize()),
    }))
}

/// Checks one received file and registers it; the temporary file is gone afterwards.
async fn store_one(
    state: &Shared,
    a: &Authed,
    c: &Collection,
    r: Received,
) -> Result<String, String> {
    let outcome = check_and_store(state, a, c, &r).await;
    drop(r);
    outcome
}

async fn check_and_store(
    state: &Shared,
    a: &Authed,
    c: &Collection,
    r: &Received,
) -> Result<String, String> {
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "upload could not be stored");
        "ファイルを保存できませんでした。時間をおいてもう一度お試しください。".to_string()
    };
    if r.bytes == 0 {
        return Err(documents::DocError::Empty.upload_message_ja().into());
    }
    let used = state
        .store
        .knowledge_bytes(&a.ctx.tenant.id)
        .await
        .map_err(|e| internal(&e))?;
    if used as u64 + r.bytes > state.config.knowledge.tenant_quota_bytes {
        return Err(format!(
            "文書の保存容量（{}）を超えるため登録できません。不要な文書を削除するか、運用事業者に容量の追加を依頼してください。",
            size_label(state.config.knowledge.tenant_quota_bytes as i64)
        ));
    }
    let bytes = tokio::fs::read(&r.tmp).await.map_err(|e| internal(&e))?;
    let name = r.name.clone();
    let kind = tokio::task::spawn_blocking(move || documents::detect(&bytes, &name))
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| e.upload_message_ja().to_string())?;
    if !state.config.knowledge.clamd.is_empty() {
        match crate::clamd::scan(&state.config.knowledge.clamd, &r.tmp).await {
            Ok(None) => {}
            Ok(Some(signature)) => {
                let _ = state
                    .store
                    .append_audit(&a.audit().result("denied").with(
                        "document.infected",
                        format!("collection:{}", c.id),
                        json!({"name": r.name, "signature": signature, "sha256": r.sha256}),
                    ))
                    .await;
                return Err(format!(
                    "ウイルスが検出されたため登録しませんでした（{signature}）。"
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "virus scanner unreachable; upload refused");
                return Err("ウイルス検査ができないため、登録を受け付けられません。情報システム担当に連絡してください。".into());
            }
        }
    }
    // Sealed while it streams from the staged file; the same content already stored for
    // the tenant is not stored twice.
    state
        .blobs
        .put_file(&a.ctx.tenant.id, &r.sha256, &r.tmp, a.audit())
        .await
        .map_err(|e| internal(&e))?;
    let nd = NewDocument {
        tenant_id: a.ctx.tenant.id.clone(),
        collection_id: c.id.clone(),
        name: r.name.clone(),
        kind: kind.code().into(),
        bytes: r.bytes as i64,
        sha256: r.sha256.clone(),
        uploaded_by: a.auth.user.login_id.clone(),
        now: a.ctx.now,
    };
    match state.store.add_document(&nd, a.audit()).await {
        Ok(id) => Ok(id),
        Err(StorageError::Conflict(m)) => Err(m),
        Err(e) => Err(internal(&e)),
    }
}

// ------------------------------------------------------------------ API

async fn api_collections(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    crate::chat::require_chat(&a)?;
    let list: Vec<serde_json::Value> = state
        .store
        .collections(&a.ctx.tenant.id)
        .await?
        .into_iter()
        .filter(|c| policy::see_collection(a.actor(), &place(c, &a.auth.user.id)))
        .map(|c| {
            let readable = policy::read_collection(a.actor(), &place(&c, &a.auth.user.id)) == Decision::Allow;
            json!({"id": c.id, "name": c.name, "department": c.department_path, "classification": c.classification,
                   "restricted": c.restricted, "documents": c.documents, "bytes": c.bytes, "readable": readable})
        })
        .collect();
    Ok(Json(json!({"collections": list})).into_response())
}

async fn api_documents(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let c = visible(&state, &a, &id).await?;
    let docs: Vec<serde_json::Value> = state
        .store
        .documents(&a.ctx.tenant.id, &c.id)
        .await?
        .iter()
        .map(doc_json)
        .collect();
    Ok(Json(json!({"documents": docs})).into_response())
}

#[derive(serde::Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    /// Comma-separated collection ids; empty: all the caller may read.
    #[serde(default)]
    collections: String,
}

async fn api_search(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<SearchQuery>,
) -> AppResult<Response> {
    crate::chat::require_chat(&a)?;
    let query = q.q.trim();
    if query.is_empty() || query.chars().count() > 1000 {
        return Err(AppError::field(
            "q",
            "検索語を1〜1000文字で入力してください。",
        ));
    }
    let readable = knowledge::readable(&state, &a).await?;
    let wanted: Vec<storage::Collection> = if q.collections.trim().is_empty() {
        readable
    } else {
        let asked: Vec<&str> = q.collections.split(',').map(str::trim).collect();
        if asked.iter().any(|c| !readable.iter().any(|r| r.id == *c)) {
            return Err(AppError::NotFound);
        }
        readable
            .into_iter()
            .filter(|r| asked.contains(&r.id.as_str()))
            .collect()
    };
    let passages = knowledge::retrieve(&state, &a.ctx.tenant.id, query, &wanted).await?;
    let out: Vec<serde_json::Value> = passages
        .iter()
        .map(|p| json!({"document_id": p.document_id, "document_name": p.document_name, "page": p.page,
                        "heading": p.heading, "text": p.text,
                        "url": format!("/knowledge/documents/{}/pages/{}?chunk={}", p.document_id, p.page, p.chunk_id)}))
        .collect();
    Ok(Json(json!({"passages": out})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_and_the_mark() {
        let text = "# 第1章 総則\n第1条 この規程は、文書の管理について定める。\n# 第2章";
        let i = text.find("この規程").unwrap_or(0);
        let lines = page_lines(text, Some((i, i + "この規程は".len())));
        assert_eq!(lines.len(), 3);
        assert!(lines[0].heading && lines[2].heading && !lines[1].heading);
        assert_eq!(lines[0].parts[0].0, "第1章 総則");
        assert_eq!(lines[1].parts[0], ("第1条 ".to_string(), false, false));
        assert_eq!(lines[1].parts[1], ("この規程は".to_string(), true, true));
        // A mark across a heading line starts after its marker; only the first is the target.
        let lines = page_lines(text, Some((0, text.len())));
        assert_eq!(lines[0].parts[0], ("第1章 総則".to_string(), true, true));
        assert_eq!(lines[2].parts[0], ("第2章".to_string(), true, false));
        assert_eq!(page_lines("", None).len(), 1);
    }
}
