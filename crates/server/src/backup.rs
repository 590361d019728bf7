//! `yakuba backup` and `yakuba restore` (M7, S17) for the embedded SQLite deployment.
//!
//! A backup is a directory: `yakuba.db` (a consistent snapshot taken with `VACUUM INTO`
//! while the service runs), `files/` (the stored files as they are on disk, sealed with the
//! tenants' keys; not the work area `files/tmp`) and `manifest.json` with the size and
//! SHA-256 of each file. The tenants' keys travel in the database, wrapped by the master
//! key, which is **not** in the backup: a restore elsewhere needs the same master key
//! (`storage.master_key_file`, or `<data_dir>/keys/master.key`). It is written under a
//! `.partial` name and renamed when complete, so a crash never leaves something that looks
//! like a backup. A restore checks every hash and SQLite's integrity check on a staged copy
//! before it touches the data directory, and moves the data it replaces aside instead of
//! deleting it.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use storage::Store;

pub const FORMAT: &str = "yakuba-backup";

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    pub yakuba_version: String,
    pub schema_version: i64,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// SHA-256 of a file, read in blocks (a database can be large).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((total, hex::encode(h.finalize())))
}

/// Every file under `root`, as paths relative to it with `/`, sorted.
pub fn list_files(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    // The work area holds uploads in flight (plaintext) and half-written files.
    for rel in list_files(from)?
        .into_iter()
        .filter(|r| !r.starts_with("tmp/"))
    {
        let dst = to.join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&rel), dst)?;
    }
    Ok(())
}

fn io(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

/// The SQLite file the configuration points at, or why there is none.
pub fn sqlite_path(config: &Config) -> Result<PathBuf, String> {
    let url = config.database_url();
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Err("PostgreSQL の復元は pg_restore（またはベースバックアップと WAL によるポイントインタイムリカバリ）で行ってください（README の「バックアップと復元」を参照）。".into());
    };
    Ok(PathBuf::from(rest.split('?').next().unwrap_or(rest)))
}

pub struct BackupDone {
    pub files: usize,
    pub bytes: u64,
    pub schema_version: i64,
}

/// Makes a backup of a running (or stopped) service into `dest`, which must not exist
/// or must be empty.
pub async fn backup(
    store: &Store,
    config: &Config,
    dest: &Path,
    now: i64,
) -> Result<BackupDone, String> {
    if dest.exists()
        && std::fs::read_dir(dest)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(format!(
            "保存先 {} はすでにあり、空ではありません。新しいディレクトリを指定してください。",
            dest.display()
        ));
    }
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| io("前回の作りかけを削除できません", e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| io("保存先を作成できません", e))?;
    store
        .backup_into(&partial.join("yakuba.db"))
        .await
        .map_err(|e| match e {
            storage::StorageError::Conflict(m) => m,
            other => format!("データベースを複製できません: {other}"),
        })?;
    let stored = config.data_dir.join("files");
    if stored.is_dir() {
        copy_tree(&stored, &partial.join("files"))
            .map_err(|e| io("ファイルを複製できません", e))?;
    }
    let mut files = Vec::new();
    for rel in list_files(&partial).map_err(|e| io("保存先を読めません", e))? {
        let (bytes, sha256) =
            hash_file(&partial.join(&rel)).map_err(|e| io("保存先を読めません", e))?;
        files.push(FileEntry {
            path: rel,
            bytes,
            sha256,
        });
    }
    let schema_version = store.schema_version().await.map_err(|e| e.to_string())?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: 1,
        created_at: domain::time::format_utc(now),
        yakuba_version: env!("CARGO_PKG_VERSION").into(),
        schema_version,
        files: files.clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(partial.join("manifest.json"), json).map_err(|e| io("目録を書けません", e))?;
    if dest.exists() {
        std::fs::remove_dir(dest).map_err(|e| io("保存先を置き換えられません", e))?;
    }
    std::fs::rename(&partial, dest).map_err(|e| io("保存先に移せません", e))?;
    Ok(BackupDone {
        files: files.len(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        schema_version,
    })
}

/// Reads a backup's manifest and checks every file it lists against its size and hash.
pub fn verify(src: &Path) -> Result<Manifest, String> {
    let text = std::fs::read(src.join("manifest.json")).map_err(|_| {
        format!(
            "{} は yakuba のバックアップではありません（manifest.json がありません）。",
            src.display()
        )
    })?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        format!("manifest.json を読めません（途中で切れているか、壊れています）: {e}")
    })?;
    if m.format != FORMAT || m.version != 1 {
        return Err("manifest.json は yakuba のバックアップの目録ではありません。".into());
    }
    if !m.files.iter().any(|f| f.path == "yakuba.db") {
        return Err("バックアップにデータベース（yakuba.db）がありません。".into());
    }
    for f in &m.files {
        if f.path.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(format!("目録のパス「{}」は使えません。", f.path));
        }
        let (bytes, sha) = hash_file(&src.join(&f.path))
            .map_err(|_| format!("ファイル {} がありません。", f.path))?;
        if bytes != f.bytes || sha != f.sha256 {
            return Err(format!(
                "ファイル {} が目録と一致しません（途中で切れているか、書き換えられています）。復元は行いませんでした。",
                f.path
            ));
        }
    }
    Ok(m)
}

/// Restores the backup in `src` into the configured data directory. The data it replaces
/// is moved to `before-restore-<time>` in the data directory. The service must be stopped.
pub async fn restore(config: &Config, src: &Path, force: bool, now: i64) -> Result<String, String> {
    let db = sqlite_path(config)?;
    let m = verify(src)?;
    if m.schema_version > storage::LATEST_SCHEMA {
        return Err(format!(
            "このバックアップは新しい版の yakuba（データ構造 {}）で作られています。この版（{}）では復元できません。",
            m.schema_version,
            storage::LATEST_SCHEMA
        ));
    }
    if db.exists() && !force {
        return Err(format!(
            "{} にはすでにデータがあります。置き換える場合は --force を付けてください（現在のデータは退避されます）。",
            db.display()
        ));
    }
    let dir = db
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| io("データディレクトリを作成できません", e))?;
    let stamp = domain::time::format_jst_compact(now).replace([' ', ':'], "-");
    // Stage next to the target (same file system, so the final step is a rename).
    let staged = dir.join(format!(".restore-{stamp}"));
    if staged.exists() {
        std::fs::remove_dir_all(&staged)
            .map_err(|e| io("作業用ディレクトリを削除できません", e))?;
    }
    copy_tree(src, &staged).map_err(|e| io("バックアップを複製できません", e))?;
    let _ = std::fs::remove_file(staged.join("manifest.json"));
    let check = Store::connect(
        &format!("sqlite://{}", staged.join("yakuba.db").display()),
        1,
    )
    .await
    .map_err(|e| format!("バックアップのデータベースを開けません: {e}"))?;
    let integrity = check.integrity_check().await.map_err(|e| e.to_string())?;
    check.close().await;
    if integrity != "ok" {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(format!(
            "バックアップのデータベースが壊れています（{integrity}）。復元は行いませんでした。"
        ));
    }
    // Move what is there aside, then put the backup in place.
    let aside = dir.join(format!("before-restore-{stamp}"));
    let mut moved = false;
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "yakuba.db".into());
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.join(format!("{name}{suffix}"));
        if p.exists() {
            std::fs::create_dir_all(&aside).map_err(|e| io("退避先を作成できません", e))?;
            std::fs::rename(&p, aside.join(format!("{name}{suffix}")))
                .map_err(|e| io("現在のデータを退避できません", e))?;
            moved = true;
        }
    }
    let files = config.data_dir.join("files");
    if files.exists() {
        std::fs::create_dir_all(&aside).map_err(|e| io("退避先を作成できません", e))?;
        std::fs::rename(&files, aside.join("files"))
            .map_err(|e| io("現在のファイルを退避できません", e))?;
        moved = true;
    }
    std::fs::rename(staged.join("yakuba.db"), &db)
        .map_err(|e| io("データベースを置けません", e))?;
    if staged.join("files").exists() {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| io("データディレクトリを作成できません", e))?;
        std::fs::rename(staged.join("files"), &files).map_err(|e| io("ファイルを置けません", e))?;
    }
    let _ = std::fs::remove_dir_all(&staged);
    let mut out = format!(
        "{} に作成されたバックアップ（データ構造 {}、ファイル {}件）を復元しました。",
        m.created_at,
        m.schema_version,
        m.files.len()
    );
    if moved {
        out.push_str(&format!(
            "\n置き換える前のデータは {} に退避しました。",
            aside.display()
        ));
    }
    if m.files.iter().any(|f| f.path.starts_with("files/")) {
        out.push_str("\n保存ファイルは暗号化されたまま戻しました。読むには、バックアップ元と同じマスターキー（storage.master_key_file で指定したファイル、または data_dir/keys/master.key。バックアップには含まれません）が必要です。");
    }
    Ok(out)
}
