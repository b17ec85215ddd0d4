//! Model downloads from the Hub, started, watched and cancelled from the
//! dashboard.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::downloads::{DownloadState, DownloadStatus};
use crate::hub::ModelRef;
use crate::state::AppState;
use crate::wire::{ErrorResponse, SseEvent};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    /// `owner/name`, `owner/name/FILE`, `owner/name:QUANT`, or a Hub link.
    pub model: String,
    /// A quantization to pick, e.g. `Q4_K_M`.
    pub quant: Option<String>,
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DownloadList {
    pub data: Vec<DownloadState>,
}

#[utoipa::path(post, path = "/admin/api/downloads", operation_id = "admin_start_download", security(("bearer" = []), ("x_api_key" = [])), request_body = DownloadRequest, responses((status = 202, description = "The download started (or the same one already running)", body = DownloadState), (status = 400, description = "Not a model reference, no GGUF file, or several to choose from (the message lists them)", body = ErrorResponse), (status = 403, description = "A gated or private repository and no token with access (HF_TOKEN)", body = ErrorResponse), (status = 404, description = "No such repository or file on the Hub", body = ErrorResponse), (status = 502, description = "The Hub could not be reached", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn start(
    State(state): State<AppState>,
    Json(req): Json<DownloadRequest>,
) -> Result<(StatusCode, axum::Json<DownloadState>), ApiError> {
    let mut reference = ModelRef::parse(&req.model)?;
    if let Some(quant) = req.quant.filter(|q| !q.trim().is_empty()) {
        if reference.file.is_some() {
            return Err(ApiError::invalid(
                "quant",
                "name either a file or a quant, not both",
            ));
        }
        reference.quant = Some(quant.trim().to_owned());
    }
    if let Some(revision) = req.revision.filter(|r| !r.trim().is_empty()) {
        reference.revision = Some(revision.trim().to_owned());
    }
    let started = state.downloads.start(reference).await?;
    tracing::info!(repo = %started.repo, files = ?started.files, id = %started.id, "download started by the operator");
    Ok((StatusCode::ACCEPTED, axum::Json(started)))
}

#[utoipa::path(get, path = "/admin/api/downloads", operation_id = "admin_list_downloads", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "Running and recent downloads, newest first", body = DownloadList), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn list(State(state): State<AppState>) -> axum::Json<DownloadList> {
    axum::Json(DownloadList {
        data: state.downloads.list(),
    })
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("no download has id '{id}'")).with_code("not_found")
}

#[utoipa::path(get, path = "/admin/api/downloads/{id}", operation_id = "admin_get_download", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "The download's id")), responses((status = 200, description = "Its progress", body = DownloadState), (status = 404, description = "No such download", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<DownloadState>, ApiError> {
    state
        .downloads
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| unknown(&id))
}

#[utoipa::path(delete, path = "/admin/api/downloads/{id}", operation_id = "admin_cancel_download", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "The download's id")), responses((status = 200, description = "Cancelled (its partial files are removed); a finished download is answered as it is", body = DownloadState), (status = 404, description = "No such download", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<DownloadState>, ApiError> {
    let mut watch = state.downloads.watch(&id).ok_or_else(|| unknown(&id))?;
    state.downloads.cancel(&id);
    // Answer once the task has stopped and removed its files.
    let settled = watch
        .wait_for(|s| s.status != DownloadStatus::Running)
        .await
        .map(|s| s.clone());
    let state = match settled {
        Ok(state) => state,
        Err(_) => state.downloads.get(&id).ok_or_else(|| unknown(&id))?,
    };
    Ok(axum::Json(state))
}

#[utoipa::path(get, path = "/admin/api/downloads/{id}/events", operation_id = "admin_download_events", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "The download's id")), responses((status = 200, description = "Server-sent events: the download's state on every change (at most five a second) until it ends", content_type = "text/event-stream", body = SseEvent), (status = 404, description = "No such download", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(mut watch) = state.downloads.watch(&id) else {
        return unknown(&id).into_response();
    };
    let stream = async_stream::stream! {
        loop {
            let current = watch.borrow_and_update().clone();
            let finished = current.status != DownloadStatus::Running;
            let json = serde_json::to_string(&current).unwrap_or_default();
            yield Ok::<_, Infallible>(Event::default().data(json));
            if finished || watch.changed().await.is_err() {
                break;
            }
        }
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
