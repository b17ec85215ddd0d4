//! Named API keys: created (their secret shown once), listed with their
//! use, and revoked.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::keys::{CreatedKey, Keys, NamedKey};
use crate::state::AppState;
use crate::wire::ErrorResponse;

/// The longest name a key may have.
const MAX_NAME: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    /// What the key is for, shown in listings.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<NamedKey>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKey {
    pub id: String,
    pub revoked: bool,
}

#[utoipa::path(get, path = "/admin/api/keys", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "Every named key, newest first, with its requests, tokens and last use (never the key itself)", body = KeyList), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn list_keys(State(state): State<AppState>) -> Result<axum::Json<KeyList>, ApiError> {
    let data = with_keys(&state, |keys| keys.list()).await?;
    Ok(axum::Json(KeyList { data }))
}

#[utoipa::path(post, path = "/admin/api/keys", security(("bearer" = []), ("x_api_key" = [])), request_body = CreateKeyRequest, responses((status = 201, description = "The new key; `key` is shown only this once", body = CreatedKey), (status = 400, description = "A missing or overlong name", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn create_key(
    State(state): State<AppState>,
    Json(req): Json<CreateKeyRequest>,
) -> Result<(StatusCode, axum::Json<CreatedKey>), ApiError> {
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(ApiError::invalid(
            "name",
            format!("name must hold between 1 and {MAX_NAME} characters"),
        ));
    }
    let now = chrono::Utc::now().timestamp();
    let created = with_keys(&state, move |keys| keys.create(&name, now)).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

#[utoipa::path(delete, path = "/admin/api/keys/{id}", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "The key's id")), responses((status = 200, description = "The key no longer works", body = RevokedKey), (status = 404, description = "No live key has this id", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<RevokedKey>, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let key = id.clone();
    if !with_keys(&state, move |keys| keys.revoke(&key, now)).await? {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            param: Some("id".to_owned()),
            code: Some("not_found"),
            ..ApiError::bad_request(format!("no live key has id '{id}'"))
        });
    }
    Ok(axum::Json(RevokedKey { id, revoked: true }))
}

/// Runs `f` on the key store, off the async threads (it is SQLite).
async fn with_keys<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Keys) -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    let keys = state.keys.clone();
    super::blocking("key_store_unavailable", move || f(&keys)).await
}
