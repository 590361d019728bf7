//! URL-encoded forms, read strictly: bytes that do not decode to UTF-8 are refused with a
//! Japanese message instead of being replaced with U+FFFD and stored. Also the one reader
//! of multipart uploads (a file and a few text fields).

use crate::error::AppError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

pub struct Form<T>(pub T);

const UNREADABLE: &str = "送信された内容を読み取れません。使用できない文字（不正な UTF-8 など）が含まれていないか確認してください。";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True when every key and value percent-decodes to valid UTF-8.
pub fn decodes_to_utf8(body: &[u8]) -> bool {
    body.split(|b| *b == b'&' || *b == b'=').all(|part| {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'%' if i + 2 < part.len() => match (hex(part[i + 1]), hex(part[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                },
                b'+' => out.push(b' '),
                b => out.push(b),
            }
            i += 1;
        }
        std::str::from_utf8(&out).is_ok()
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Form<T> {
    type Rejection = AppError;
    async fn from_request(req: Request, s: &S) -> Result<Self, Self::Rejection> {
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !is_form {
            return Err(AppError::BadRequest(UNREADABLE.into()));
        }
        let bytes = Bytes::from_request(req, s).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::TooLarge
            } else {
                AppError::BadRequest(UNREADABLE.into())
            }
        })?;
        if !decodes_to_utf8(&bytes) {
            return Err(AppError::BadRequest(UNREADABLE.into()));
        }
        serde_urlencoded::from_bytes(&bytes)
            .map(Form)
            .map_err(|_| AppError::BadRequest(UNREADABLE.into()))
    }
}

/// A multipart upload: the bytes of its `file` field (if any) and its other fields as text.
pub struct Upload {
    pub file: Option<Vec<u8>>,
    pub fields: std::collections::HashMap<String, String>,
}

/// Reads a whole multipart upload; a body over the route's limit is "too large", anything
/// unreadable a Japanese "cannot read".
pub async fn read_upload(mut mp: axum::extract::Multipart) -> Result<Upload, AppError> {
    let too_large_or = |status: StatusCode, msg: &str| {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::TooLarge
        } else {
            AppError::BadRequest(msg.into())
        }
    };
    let mut up = Upload {
        file: None,
        fields: Default::default(),
    };
    loop {
        let field =
            match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(too_large_or(
                    e.status(),
                    "アップロードされたデータを読み取れません。もう一度ファイルを選んでください。",
                )),
            };
        let name = field.name().unwrap_or("").to_string();
        if name == "file" {
            let bytes = field
                .bytes()
                .await
                .map_err(|e| too_large_or(e.status(), "ファイルを読み取れません。"))?;
            up.file = Some(bytes.to_vec());
        } else {
            let text = field
                .text()
                .await
                .map_err(|e| too_large_or(e.status(), UNREADABLE))?;
            up.fields.insert(name, text);
        }
    }
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_check() {
        assert!(decodes_to_utf8(b"name=%E7%B7%8F%E5%8B%99&x=a+b"));
        assert!(!decodes_to_utf8(b"name=%FF%FE"));
        assert!(!decodes_to_utf8(b"name=\xff"));
        assert!(decodes_to_utf8(b"a=100%"));
    }
}
