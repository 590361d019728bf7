//! Static files, compiled into the binary: our stylesheet and script, the Digital Agency
//! design tokens and htmx, both from npm (pinned in package-lock.json). Nothing is loaded
//! from outside the service.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "assets/"]
struct Own;

#[derive(RustEmbed)]
#[folder = "../../node_modules/htmx.org/dist/"]
#[include = "htmx.min.js"]
struct Htmx;

#[derive(RustEmbed)]
#[folder = "../../node_modules/@digital-go-jp/design-tokens/dist/"]
#[include = "tokens.css"]
struct Tokens;

fn find(path: &str) -> Option<rust_embed::EmbeddedFile> {
    Own::get(path)
        .or_else(|| Htmx::get(path))
        .or_else(|| Tokens::get(path))
}

pub async fn serve(Path(path): Path<String>) -> Response {
    match find(&path) {
        Some(f) => {
            let mime = f.metadata.mimetype().to_string();
            let etag = format!("\"{}\"", hex::encode(&f.metadata.sha256_hash()[..12]));
            (
                [
                    (header::CONTENT_TYPE, mime),
                    (header::CACHE_CONTROL, "public, max-age=3600".to_string()),
                    (header::ETAG, etag),
                ],
                f.data,
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
