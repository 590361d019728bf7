//! All of a tenant's data in one zip (S18, M12: migration at contract end, moving a tenant
//! to another yakuba), and `yakuba import` that loads it.
//!
//! The zip holds one JSON Lines file per table (`users.jsonl`, `messages.jsonl`, …, see
//! [`storage::EXPORT_TABLES`]), `README.txt` in Japanese, and `manifest.json` with the
//! size, row count and SHA-256 of each file. Rows are read from one snapshot; the zip is
//! written on a blocking thread to a file, so memory stays flat whatever the tenant's size.
//! Password hashes, provider API keys and API tokens are not exported.
//!
//! An import checks every hash before it writes anything and then inserts all rows in one
//! transaction; it adds nothing of its own to the tenant's records (the operator's command
//! is in the server log), so exporting the imported tenant gives the same files again.
//!
//! Knowledge files travel in plaintext under `files/<sha256>` (the archive must open on
//! another installation, which has another master key): the export decrypts each one and
//! checks it against its hash, the import seals each one with the new tenant's own key
//! (made then, and logged rather than audited, as above). Tenant keys are never exported.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use storage::{BlobStore, ExportItem, Store, Tenant};

pub const FORMAT: &str = "yakuba-tenant-export";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tenant_id: String,
    pub tenant_slug: String,
    pub tenant_name: String,
    pub exported_at: String,
    pub yakuba_version: String,
    pub schema_version: i64,
    pub files: Vec<ExportedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportedFile {
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

const README: &str = "yakuba 全データの書き出し\r\n\
\r\n\
このファイルには、自治体のすべてのデータが含まれます。取扱いは情報セキュリティポリシーに従ってください。\r\n\
\r\n\
- 各表は JSON Lines 形式（1行に1件、UTF-8）です。users.jsonl（職員）、departments.jsonl（部署）、\r\n\
  conversations.jsonl と messages.jsonl（チャットの会話と質問・回答）、prompt_templates.jsonl（テンプレート）、\r\n\
  usage_events.jsonl（利用記録）、audit_log.jsonl（監査ログ、ハッシュチェーン付き）など。\r\n\
- 日時は UTC の1970年1月1日からのミリ秒です。\r\n\
- manifest.json に各ファイルの件数、バイト数、SHA-256 ハッシュがあります。改ざんや欠落の確認に使えます。\r\n\
- files/ には、ナレッジに登録された文書の元のファイルが、暗号化を解いた状態で入っています（名前は内容の SHA-256）。\r\n\
- パスワード、AI サービスの API キー、API キーは含まれません（移行先で再設定してください）。\r\n\
- 別の yakuba へは `yakuba import <このファイル>` で取り込めます。\r\n";

fn zip_err(e: zip::result::ZipError) -> String {
    format!("zip を書けません: {e}")
}

/// Writes the tenant's export to `out`. Returns the manifest and the file, flushed.
pub async fn export(
    store: &Store,
    blobs: &BlobStore,
    tenant: &Tenant,
    out: std::fs::File,
    now: i64,
) -> Result<(Manifest, std::fs::File), String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ExportItem>(512);
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: 1,
        tenant_id: tenant.id.clone(),
        tenant_slug: tenant.slug.clone(),
        tenant_name: tenant.name.clone(),
        exported_at: domain::time::format_utc(now),
        yakuba_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: store.schema_version().await.map_err(|e| e.to_string())?,
        files: Vec::new(),
    };
    let header = manifest.clone();
    let keys = blobs.keys(&tenant.id).await.map_err(|e| e.to_string())?;
    let sealed = blobs.clone();
    let writer = tokio::task::spawn_blocking(
        move || -> Result<(Vec<ExportedFile>, std::fs::File), String> {
            let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(out));
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(true);
            let mut files: Vec<ExportedFile> = Vec::new();
            let mut hasher = Sha256::new();
            let mut line = Vec::with_capacity(4096);
            let mut table = "";
            let mut blobs: Vec<String> = Vec::new();
            let finish = |files: &mut Vec<ExportedFile>, hasher: &mut Sha256| {
                if let Some(f) = files.last_mut() {
                    f.sha256 = hex::encode(std::mem::take(hasher).finalize());
                }
            };
            zip.start_file("README.txt", opts).map_err(zip_err)?;
            zip.write_all(README.as_bytes())
                .map_err(|e| e.to_string())?;
            while let Some(item) = rx.blocking_recv() {
                match item {
                    ExportItem::Table(name) => {
                        table = name;
                        finish(&mut files, &mut hasher);
                        let path = format!("{name}.jsonl");
                        zip.start_file(&path, opts).map_err(zip_err)?;
                        files.push(ExportedFile {
                            path,
                            rows: 0,
                            bytes: 0,
                            sha256: String::new(),
                        });
                    }
                    ExportItem::Row(row) => {
                        if table == "kb_documents" {
                            if let Some(h) = row.get("sha256").and_then(|v| v.as_str()) {
                                blobs.push(h.to_string());
                            }
                        }
                        line.clear();
                        serde_json::to_writer(&mut line, &row).map_err(|e| e.to_string())?;
                        line.push(b'\n');
                        zip.write_all(&line).map_err(|e| e.to_string())?;
                        hasher.update(&line);
                        if let Some(f) = files.last_mut() {
                            f.rows += 1;
                            f.bytes += line.len() as u64;
                        }
                    }
                }
            }
            finish(&mut files, &mut hasher);
            // The original files of the knowledge documents, by content hash.
            blobs.sort();
            blobs.dedup();
            for h in blobs {
                let path = format!("files/{h}");
                let cannot =
                    |e: &dyn std::fmt::Display| format!("文書のファイル {h} を読めません: {e}");
                let mut f = sealed.open_sync(&keys, &h).map_err(|e| cannot(&e))?;
                zip.start_file(&path, opts).map_err(zip_err)?;
                let mut hh = Sha256::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(|e| cannot(&storage::StorageError::from(e)))?;
                    if n == 0 {
                        break;
                    }
                    hh.update(&buf[..n]);
                    zip.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                    total += n as u64;
                }
                let sha256 = hex::encode(hh.finalize());
                // What leaves is what was uploaded, or the export fails.
                if sha256 != h {
                    return Err(cannot(
                        &"内容がハッシュと一致しません（ファイルが壊れています）",
                    ));
                }
                files.push(ExportedFile {
                    path,
                    rows: 0,
                    bytes: total,
                    sha256,
                });
            }
            let mut m = header;
            m.files = files.clone();
            zip.start_file("manifest.json", opts).map_err(zip_err)?;
            zip.write_all(&serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            let w = zip.finish().map_err(zip_err)?;
            let file = w.into_inner().map_err(|e| e.to_string())?;
            file.sync_all().map_err(|e| e.to_string())?;
            Ok((files, file))
        },
    );
    let read = store.export_tenant_rows(&tenant.id, tx).await;
    let (files, file) = writer
        .await
        .map_err(|e| format!("書き出しが異常終了しました: {e}"))??;
    read.map_err(|e| e.to_string())?;
    manifest.files = files;
    Ok((manifest, file))
}

/// Reads and checks the manifest of an export, and every file it lists against its size
/// and hash, before anything is written.
pub fn verify(path: &Path) -> Result<Manifest, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("{} を開けません: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|_| {
        "ZIP ファイルとして読めません（途中で切れているか、yakuba の書き出しではありません）。"
            .to_string()
    })?;
    let m: Manifest = {
        let mut f = zip.by_name("manifest.json").map_err(|_| {
            "yakuba の書き出しではありません（manifest.json がありません）。".to_string()
        })?;
        let mut text = Vec::new();
        f.read_to_end(&mut text)
            .map_err(|_| "manifest.json を読めません（途中で切れています）。".to_string())?;
        serde_json::from_slice(&text).map_err(|e| format!("manifest.json が壊れています: {e}"))?
    };
    if m.format != FORMAT || m.version != 1 {
        return Err("manifest.json は yakuba の全データの書き出しの目録ではありません。".into());
    }
    if m.schema_version > storage::LATEST_SCHEMA {
        return Err(format!(
            "新しい版の yakuba（データ構造 {}）で書き出されています。この版（{}）では取り込めません。",
            m.schema_version,
            storage::LATEST_SCHEMA
        ));
    }
    for f in &m.files {
        let mut entry = zip
            .by_name(&f.path)
            .map_err(|_| format!("{} がありません（書き出しが欠けています）。", f.path))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(|_| {
                format!(
                    "{} を最後まで読めません（途中で切れているか、壊れています）。",
                    f.path
                )
            })?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        if total != f.bytes || hex::encode(h.finalize()) != f.sha256 {
            return Err(format!(
                "{} のハッシュが目録と一致しません（書き換えられているか、壊れています）。取り込みは行いませんでした。",
                f.path
            ));
        }
    }
    Ok(m)
}

/// Loads an export into this yakuba as a new tenant. Nothing is written unless every
/// file checks out and every row goes in.
/// `morph`: the server's morphological analyser, so the index is built as it searches.
pub async fn import(
    store: &Store,
    blobs: &BlobStore,
    data_dir: &Path,
    path: &Path,
    morph: Option<std::sync::Arc<search::Morph>>,
) -> Result<(Manifest, Vec<(String, u64)>), String> {
    let owned = path.to_path_buf();
    let m = tokio::task::spawn_blocking(move || verify(&owned))
        .await
        .map_err(|e| e.to_string())??;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<(String, serde_json::Map<String, serde_json::Value>)>(512);
    let (owned, files) = (path.to_path_buf(), m.files.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let file = std::fs::File::open(&owned).map_err(|e| e.to_string())?;
        let mut zip =
            zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
        for f in files.iter().filter(|f| !f.path.starts_with("files/")) {
            let table = f
                .path
                .strip_suffix(".jsonl")
                .ok_or_else(|| format!("{} は取り込めるファイルではありません。", f.path))?
                .to_string();
            let entry = zip.by_name(&f.path).map_err(|e| e.to_string())?;
            for (i, line) in std::io::BufReader::new(entry).lines().enumerate() {
                let line = line.map_err(|e| format!("{}: {e}", f.path))?;
                let row: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&line)
                        .map_err(|e| format!("{} の{}行目が読めません: {e}", f.path, i + 1))?;
                if tx.blocking_send((table.clone(), row)).is_err() {
                    return Ok(()); // the writer stopped; it says why
                }
            }
        }
        let _ = tx.blocking_send((storage::IMPORT_END.to_string(), Default::default()));
        Ok(())
    });
    let written = store
        .import_tenant_rows(&m.tenant_id, &m.tenant_slug, rx)
        .await;
    let read = reader.await.map_err(|e| e.to_string())?;
    let counts = match (written, read) {
        (_, Err(e)) => {
            return Err(format!(
                "{}。取り込みは行いませんでした。",
                e.trim_end_matches('。')
            ))
        }
        (Ok(c), Ok(())) => c,
        (Err(storage::StorageError::Conflict(msg)), _) => return Err(msg),
        (Err(e), _) => return Err(e.to_string()),
    };
    // The documents' files into the file store, sealed with the new tenant's own key as
    // they stream out of the zip (their hashes were checked above, and again while sealing).
    let (owned, files, blobs) = (path.to_path_buf(), m.files.clone(), blobs.clone());
    if files.iter().any(|f| f.path.starts_with("files/")) {
        let keys = blobs
            .keys_for_writing(&m.tenant_id, None)
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let file = std::fs::File::open(&owned).map_err(|e| e.to_string())?;
            let mut zip =
                zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
            for f in files.iter().filter(|f| f.path.starts_with("files/")) {
                let mut entry = zip.by_name(&f.path).map_err(|e| e.to_string())?;
                blobs
                    .put_sync(&keys, &f.sha256, &mut entry)
                    .map_err(|e| format!("{}: {e}", f.path))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())??;
    }
    // Its index, from the passages just stored (the tenant is new here: nobody has it open).
    let dir = crate::knowledge::index_dir(data_dir, &m.tenant_id);
    let open_dir = dir.clone();
    let ix = std::sync::Arc::new(
        tokio::task::spawn_blocking(move || search::SearchIndex::open(&open_dir, morph))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?,
    );
    crate::knowledge::rebuild_index(store, &m.tenant_id, ix, &dir).await?;
    Ok((m, counts))
}

// ------------------------------------------------------------------ pages

use crate::app::{Authed, Shared};
use crate::error::{AppError, AppResult};
use crate::pages::{render, Layout};
use askama::Template;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

pub fn routes() -> Router<Shared> {
    Router::new().route("/admin/export", get(page).post(download))
}

#[derive(Template)]
#[template(path = "admin/export.html")]
struct ExportPage {
    l: Layout,
    tenant_name: String,
}

fn require(a: &Authed) -> AppResult<()> {
    if domain::policy::can_export_tenant(a.actor()) {
        Ok(())
    } else {
        Err(AppError::Forbidden)
    }
}

async fn page(a: Authed) -> AppResult<Response> {
    require(&a)?;
    render(&ExportPage {
        l: Layout::for_user(&a, "データの書き出し", "export"),
        tenant_name: a.ctx.tenant.name.clone(),
    })
}

/// Builds the zip in an unnamed temporary file (gone when closed) and streams it.
async fn download(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    use axum::http::header;
    require(&a)?;
    let tmp = tokio::task::spawn_blocking(tempfile::tempfile)
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let tenant = (*a.ctx.tenant).clone();
    let (m, file) = export(&state.store, &state.blobs, &tenant, tmp, a.ctx.now)
        .await
        .map_err(AppError::Internal)?;
    let rows: u64 = m.files.iter().map(|f| f.rows).sum();
    state
        .store
        .append_audit(&a.audit().with(
            "tenant.export",
            format!("tenant:{}", tenant.id),
            serde_json::json!({"files": m.files.len(), "rows": rows}),
        ))
        .await?;
    let mut file = tokio::fs::File::from_std(file);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::io::AsyncReadExt::read(&mut f, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let name = format!(
        "yakuba-export-{}-{}.zip",
        tenant.slug,
        domain::time::format_jst_compact(a.ctx.now)
            .get(..10)
            .unwrap_or("")
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/zip")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .header(header::CACHE_CONTROL, "no-store")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| AppError::Internal(e.to_string()))
}
