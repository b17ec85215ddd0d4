//! The operator's JSON API under `/admin/api`: everything the dashboard
//! does, for scripts too. Every route here needs an operator key (see
//! `api::auth`); a named key gets 403.

pub mod analytics;
pub mod downloads;
pub mod keys;
pub mod models;
pub mod status;

use axum::http::StatusCode;

use crate::api::error::ApiError;

/// Runs blocking work (SQLite, the file system) off the async threads; a
/// failure there is the store's, answered 503 with `code`.
async fn blocking<T: Send + 'static>(
    code: &'static str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|message| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: Some(code),
            ..ApiError::internal(message)
        })
}
