//! HTTP error responses: always JSON `{"error":{"code","message"}}` with a code from the
//! protocol table, plus `fields` for validation failures.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use chat_core::protocol::ErrorCode;
use chat_core::store::StoreError;

use crate::passwords::PasswordError;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Per-field codes, for `validation_failed`.
    pub fields: BTreeMap<&'static str, &'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("{what} is unavailable, retry later"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    /// A Postgres failure: logged (without row data), answered `503 unavailable`.
    pub fn store(e: StoreError) -> Self {
        tracing::warn!(error = %e, "postgres request failed");
        Self::unavailable("the database")
    }

    /// `422 validation_failed`, its fields to be added.
    pub fn validation() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ValidationFailed,
            "some fields are invalid",
        )
    }

    /// `422 validation_failed` naming one field.
    pub fn invalid_field(field: &'static str, code: &'static str) -> Self {
        let mut err = Self::validation();
        err.fields.insert(field, code);
        err
    }

    /// This validation error when it names a field; `Ok` when none failed.
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.fields.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::store(e)
    }
}

impl From<PasswordError> for ApiError {
    fn from(e: PasswordError) -> Self {
        match e {
            PasswordError::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many password checks in progress; retry shortly",
            ),
            PasswordError::Hash(reason) => {
                tracing::error!(error = %reason, "password hashing failed");
                ApiError::internal()
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if !self.fields.is_empty() {
            error["fields"] = serde_json::json!(self.fields);
        }
        HttpResponse::build(self.status).json(serde_json::json!({ "error": error }))
    }
}

/// Maps a bad JSON body (syntax, type, size) to a JSON error instead of actix's plain text.
pub fn json_body_error(
    err: actix_web::error::JsonPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let api = match &err {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            "request body too large",
        ),
        E::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadRequest,
            "content type must be application/json",
        ),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("invalid JSON body: {err}"),
        ),
    };
    api.into()
}

/// Maps a bad query string to a JSON `400 bad_request`.
pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadRequest,
        format!("invalid query string: {err}"),
    )
    .into()
}

/// The answer for unknown routes.
pub async fn not_found() -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
    .error_response()
}
