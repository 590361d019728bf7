//! The virus scanner hook: a file is sent to clamd with its INSTREAM command (the
//! null-terminated `zINSTREAM` form: chunks each preceded by their length as a 4-byte
//! big-endian number, then a zero length). The answer is `stream: OK` or
//! `stream: <signature> FOUND`. Anything else, or no answer, is an error: the caller
//! refuses the upload (fail closed).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `Ok(None)` when clean, `Ok(Some(signature))` when infected.
pub async fn scan(address: &str, path: &std::path::Path) -> Result<Option<String>, String> {
    let io = |e: std::io::Error| format!("clamd {address}: {e}");
    let connect = tokio::net::TcpStream::connect(address);
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("clamd {address}: timed out"))?
        .map_err(io)?;
    s.write_all(b"zINSTREAM\0").await.map_err(io)?;
    let mut f = tokio::fs::File::open(path).await.map_err(io)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        s.write_all(&(n as u32).to_be_bytes()).await.map_err(io)?;
        s.write_all(&buf[..n]).await.map_err(io)?;
    }
    s.write_all(&0u32.to_be_bytes()).await.map_err(io)?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        s.read_to_end(&mut answer),
    )
    .await
    .map_err(|_| format!("clamd {address}: no answer"))?
    .map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let text = text.trim_end_matches(['\0', '\n']).trim();
    let body = text.strip_prefix("stream:").unwrap_or(text).trim();
    if body == "OK" {
        Ok(None)
    } else if let Some(sig) = body.strip_suffix("FOUND") {
        Ok(Some(sig.trim().to_string()))
    } else {
        Err(format!("clamd {address}: unexpected answer {text:?}"))
    }
}
