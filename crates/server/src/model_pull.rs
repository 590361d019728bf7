//! `yakuba model pull`: downloads a GGUF file from a Hugging Face compatible hub into the
//! models folder, on machines that have internet and only when an operator asks. The
//! download resumes where an earlier one stopped (`.partial` + HTTP Range), is checked
//! against the hub's SHA-256 (the LFS `X-Linked-Etag`) or one given by hand, and the file
//! is only put in place once it is complete, correct and a GGUF the engine can run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, AUTHORIZATION, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

pub struct Pull<'a> {
    /// e.g. `https://huggingface.co`.
    pub endpoint: &'a str,
    /// `owner/name`.
    pub repo: &'a str,
    /// The file's path in the repository, e.g. `qwen2.5-7b-instruct-q4_k_m.gguf`.
    pub file: &'a str,
    pub revision: &'a str,
    /// For gated models; sent only to the hub itself, never after a redirect elsewhere.
    pub token: Option<&'a str>,
    /// Expected SHA-256 (hex); otherwise the hub's own is used when it sends one.
    pub sha256: Option<&'a str>,
    pub proxy: Option<&'a str>,
    pub dest_dir: &'a Path,
}

pub struct Pulled {
    pub path: PathBuf,
    pub bytes: u64,
    pub resumed_from: u64,
    pub sha256: String,
    pub verified_against: Option<String>,
    pub info: llm::local::ModelInfo,
}

fn valid_repo(repo: &str) -> bool {
    let mut parts = repo.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && s.len() <= 96
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn valid_file(file: &str) -> bool {
    !file.is_empty()
        && file.len() <= 300
        && file.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        })
}

pub async fn pull(
    p: &Pull<'_>,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Pulled, String> {
    if !valid_repo(p.repo) {
        return Err(format!(
            "リポジトリ「{}」の形式が正しくありません（例: Qwen/Qwen2.5-7B-Instruct-GGUF）",
            p.repo
        ));
    }
    if !valid_file(p.file) {
        return Err(format!("ファイル名「{}」の形式が正しくありません", p.file));
    }
    let name = p.file.rsplit('/').next().unwrap_or(p.file);
    if !crate::local_models::valid_name(name) {
        return Err(format!("「{name}」は .gguf ファイルではありません"));
    }
    let expected = match p.sha256.map(str::trim).filter(|s| !s.is_empty()) {
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(h.to_ascii_lowercase())
        }
        Some(_) => return Err("--sha256 には 64 桁の16進数を指定してください".into()),
        None => None,
    };
    let endpoint = p.endpoint.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!(
        "{endpoint}/{}/resolve/{}/{}",
        p.repo, p.revision, p.file
    ))
    .map_err(|e| format!("ハブのURLが正しくありません: {e}"))?;
    let hub_host = url.host_str().unwrap_or_default().to_string();

    std::fs::create_dir_all(p.dest_dir)
        .map_err(|e| format!("{} を作れません: {e}", p.dest_dir.display()))?;
    let final_path = p.dest_dir.join(name);
    if final_path.exists() {
        return Err(format!(
            "{} は既にあります（置き換える場合は先に削除してください）",
            final_path.display()
        ));
    }
    let partial = p.dest_dir.join(format!("{name}.partial"));

    let token = p.token.map(str::to_string);
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("yakuba/", env!("CARGO_PKG_VERSION")))
        // Hubs redirect downloads to their storage; the token stays with the hub.
        .redirect(reqwest::redirect::Policy::limited(10));
    builder = match p.proxy.filter(|s| !s.trim().is_empty()) {
        Some(proxy) => builder.proxy(
            reqwest::Proxy::all(proxy)
                .map_err(|_| "プロキシのURLが正しくありません".to_string())?,
        ),
        None => builder.no_proxy(),
    };
    let http = builder
        .build()
        .map_err(|e| format!("HTTP クライアントを作れません: {e}"))?;

    // Ask the hub first without following its redirect: it names the storage location
    // and the file's SHA-256 there (as huggingface_hub does).
    let no_redirect = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    let no_redirect = match p.proxy.filter(|s| !s.trim().is_empty()) {
        Some(proxy) => no_redirect.proxy(
            reqwest::Proxy::all(proxy)
                .map_err(|_| "プロキシのURLが正しくありません".to_string())?,
        ),
        None => no_redirect.no_proxy(),
    }
    .build()
    .map_err(|e| format!("HTTP クライアントを作れません: {e}"))?;
    let mut head = no_redirect.head(url.clone());
    if let Some(t) = &token {
        head = head.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let meta = head
        .send()
        .await
        .map_err(|e| format!("ハブに接続できません（{hub_host}）: {}", e.without_url()))?;
    let hub_sha = linked_sha(meta.headers());
    let target = if meta.status().is_redirection() {
        let loc = meta
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or("ハブの転送先が示されていません")?;
        url.join(loc)
            .map_err(|e| format!("ハブの転送先が正しくありません: {e}"))?
    } else {
        match meta.status() {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(format!(
                    "ハブに拒否されました（HTTP {}）。利用条件への同意が必要なモデルでは、アクセストークンを --token で指定してください",
                    meta.status().as_u16()
                ))
            }
            StatusCode::NOT_FOUND => {
                return Err(format!(
                    "ハブに {}/{}（{}）が見つかりません",
                    p.repo, p.file, p.revision
                ))
            }
            s if s.is_success() => url.clone(),
            s => return Err(format!("ハブがエラーを返しました（HTTP {}）", s.as_u16())),
        }
    };

    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let mut req = http.get(target.clone());
    // The token goes to the hub only, never to the storage it redirects to.
    if let Some(t) = token
        .as_ref()
        .filter(|_| target.host_str() == url.host_str())
    {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    if have > 0 {
        req = req.header(RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("ハブに接続できません（{hub_host}）: {}", e.without_url()))?;
    let status = resp.status();
    let (mut file, resumed_from) = match status {
        StatusCode::PARTIAL_CONTENT if have > 0 => {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(&partial)
                .map_err(|e| format!("{} を開けません: {e}", partial.display()))?;
            (f, have)
        }
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // The partial file is already whole (or longer than the file): start again.
            std::fs::remove_file(&partial).ok();
            return Err("途中まで取得したファイルが想定と合いません。もう一度実行してください".into());
        }
        s if s.is_success() => {
            let f = std::fs::File::create(&partial)
                .map_err(|e| format!("{} を作れません: {e}", partial.display()))?;
            (f, 0)
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(format!(
                "ハブに拒否されました（HTTP {}）。利用条件への同意が必要なモデルでは、アクセストークンを --token で指定してください",
                status.as_u16()
            ))
        }
        StatusCode::NOT_FOUND => {
            return Err(format!(
                "ハブに {}/{}（{}）が見つかりません",
                p.repo, p.file, p.revision
            ))
        }
        s => return Err(format!("ハブがエラーを返しました（HTTP {}）", s.as_u16())),
    };
    let total = resp.content_length().map(|n| n + resumed_from);
    let mut got = resumed_from;
    progress(got, total);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            format!(
                "ダウンロードが途中で切れました（{got} バイトまで保存済み。もう一度実行すると続きから再開します）: {}",
                e.without_url()
            )
        })?;
        file.write_all(&chunk)
            .map_err(|e| format!("{} に書けません: {e}", partial.display()))?;
        got += chunk.len() as u64;
        progress(got, total);
    }
    file.sync_all()
        .map_err(|e| format!("{} に書けません: {e}", partial.display()))?;
    drop(file);
    if let Some(t) = total {
        if got != t {
            return Err(format!(
                "ダウンロードが途中で終わりました（{got} / {t} バイト。もう一度実行すると続きから再開します）"
            ));
        }
    }

    let path = partial.clone();
    let sha = tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .map_err(|e| e.to_string())??;
    let want = expected.clone().or(hub_sha);
    if let Some(w) = &want {
        if &sha != w {
            std::fs::remove_file(&partial).ok();
            return Err(format!(
                "チェックサムが一致しません（期待 {w}、取得 {sha}）。ファイルを削除しました。もう一度実行してください"
            ));
        }
    }
    let info = llm::local::inspect(&partial).map_err(|e| {
        std::fs::remove_file(&partial).ok();
        format!("取得したファイルは使えません: {}", e.detail)
    })?;
    std::fs::rename(&partial, &final_path)
        .map_err(|e| format!("{} に置けません: {e}", final_path.display()))?;
    Ok(Pulled {
        path: final_path,
        bytes: got,
        resumed_from,
        sha256: sha,
        verified_against: want,
        info,
    })
}

/// The SHA-256 a hub sends for an LFS file (`X-Linked-Etag: "<hex>"`).
fn linked_sha(h: &HeaderMap) -> Option<String> {
    let v = h.get("x-linked-etag")?.to_str().ok()?;
    let v = v
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase();
    (v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit())).then_some(v)
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_repo("Qwen/Qwen2.5-7B-Instruct-GGUF"));
        assert!(!valid_repo("../etc"));
        assert!(!valid_repo("a/b/c"));
        assert!(!valid_repo("a/.."));
        assert!(valid_file("sub/model-q4_k_m.gguf"));
        assert!(!valid_file("../model.gguf"));
        assert!(!valid_file("a//b.gguf"));
        assert!(!valid_file("a b.gguf"));
    }
}
