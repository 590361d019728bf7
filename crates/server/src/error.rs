//! One mapping from errors to HTTP. Handlers return [`AppError`]; it becomes a response
//! carrying an [`ErrorInfo`], and the `render_errors` middleware turns that into an HTML
//! page or a JSON body depending on where the request was going. Messages are safe to
//! show and in Japanese; internals go to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::settings::FieldError;
use storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("password change required")]
    PasswordChangeRequired,
    #[error("forbidden")]
    Forbidden,
    #[error("csrf")]
    Csrf,
    #[error("not found")]
    NotFound,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("validation")]
    Validation(Vec<FieldError>),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("too large")]
    TooLarge,
    /// An API token that is unknown, expired or revoked; the message says which.
    #[error("invalid token")]
    Token(String),
    /// A usage allowance is used up; the message says which and what to do.
    #[error("quota exceeded")]
    Quota(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// What the error renderer needs, attached to the response.
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<FieldError>,
}

impl AppError {
    pub fn field(field: &str, message: impl Into<String>) -> AppError {
        AppError::Validation(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn info(&self) -> ErrorInfo {
        let (status, code, message) = match self {
            AppError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated", "ログインしてください。ログインの有効期限が切れた可能性があります。".to_string()),
            AppError::PasswordChangeRequired => (StatusCode::FORBIDDEN, "password_change_required", "仮パスワードでログインしています。先にパスワードを変更してください。".to_string()),
            AppError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "この操作を行う権限がありません。".to_string()),
            AppError::Csrf => (StatusCode::FORBIDDEN, "csrf", "画面の有効期限が切れたか、不正な送信です。画面を開き直してから、もう一度操作してください。".to_string()),
            AppError::NotFound => (StatusCode::NOT_FOUND, "not_found", "お探しのページやデータは見つかりませんでした。".to_string()),
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            AppError::Validation(f) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                f.first().map(|e| e.message.clone()).unwrap_or_else(|| "入力内容を確認してください。".into()),
            ),
            AppError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m.clone()),
            AppError::Token(m) => (StatusCode::UNAUTHORIZED, "invalid_token", m.clone()),
            AppError::Quota(m) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", m.clone()),
            AppError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", "送信されたデータが大きすぎます。".to_string()),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "システムで問題が発生しました。時間をおいて再度お試しください。解決しない場合は管理者に連絡してください。".to_string()),
        };
        let fields = match self {
            AppError::Validation(f) => f.clone(),
            _ => Vec::new(),
        };
        ErrorInfo {
            status,
            code,
            message,
            fields,
        }
    }
}

impl From<StorageError> for AppError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound => AppError::NotFound,
            StorageError::Conflict(m) => AppError::Conflict(m),
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<askama::Error> for AppError {
    fn from(e: askama::Error) -> Self {
        AppError::Internal(format!("template: {e}"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let info = self.info();
        let mut res = info.status.into_response();
        res.extensions_mut().insert(info);
        res
    }
}

/// The generic message for a status that an extractor or the router produced.
pub fn info_for_status(status: StatusCode, max_body: usize) -> Option<ErrorInfo> {
    let (code, message) = match status {
        StatusCode::BAD_REQUEST => ("bad_request", "送信された内容の形式が正しくありません。".to_string()),
        StatusCode::NOT_FOUND => ("not_found", "お探しのページやデータは見つかりませんでした。".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "この方法では操作できません。".to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            format!("送信されたデータが大きすぎます（上限 {} KB）。", max_body / 1024),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "送信形式が正しくありません（JSON は Content-Type: application/json で送ってください）。".to_string()),
        StatusCode::UNPROCESSABLE_ENTITY => ("unprocessable", "送信された内容を読み取れません。使用できない文字（不正な UTF-8 など）や項目の不足がないか確認してください。".to_string()),
        _ => return None,
    };
    Some(ErrorInfo {
        status,
        code,
        message,
        fields: Vec::new(),
    })
}

pub type AppResult<T> = Result<T, AppError>;
