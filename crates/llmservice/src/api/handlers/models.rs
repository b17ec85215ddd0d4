//! `GET /health`, `GET /v1/models[/{id}]`, and bare per-kind lists of `{name, ...}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use engine::ModelKind;
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::{ErrorResponse, ModelList, ModelObject};

/// Answers from atomics and `try_lock` only: it never waits on a loading model.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "`{status: healthy, timestamp, models: [loaded]}`")))]
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let loaded: Vec<Value> = state
        .registry
        .loaded()
        .iter()
        .map(|e| json!({"id": e.id, "kind": e.kind.as_str()}))
        .collect();
    let mut health = json!({
        "status": "healthy",
        "timestamp": chrono::Local::now().naive_local().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        "models": loaded,
    });
    // Tiers served elsewhere: whether their replicas (or our child) answer.
    let upstreams: Vec<Value> = state
        .registry
        .upstream_tiers()
        .iter()
        .map(|e| {
            let replicas = e
                .upstream
                .as_ref()
                .map(|u| u.replicas())
                .unwrap_or_default();
            json!({
                "id": e.id,
                "state": e.state().as_str(),
                "managed": e.managed.is_some(),
                "replicas": replicas.len(),
                "healthy_replicas": replicas.iter().filter(|r| r.1).count(),
                "error": e.last_error(),
            })
        })
        .collect();
    if !upstreams.is_empty() {
        health["upstreams"] = upstreams.into();
    }
    Json(health)
}

fn model_object(entry: &ModelEntry) -> ModelObject {
    let state = entry.state();
    ModelObject {
        id: entry.id.clone(),
        object: "model",
        created: entry.created,
        owned_by: entry.owned_by(),
        kind: entry.kind.as_str(),
        state: state.as_str(),
        error: (state == crate::models::ModelState::Failed)
            .then(|| entry.last_error())
            .flatten(),
    }
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, description = "Success", body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let registry = state.registry.clone();
    let entries = tokio::task::spawn_blocking(move || registry.list())
        .await
        .unwrap_or_default();
    Json(ModelList {
        object: "list",
        data: entries.iter().map(|e| model_object(e)).collect(),
    })
}

/// One model, named as a request's `model` may name it: its id, its tier or
/// a file stem in the models directory (`client.models.retrieve("light")`
/// finds the light tier's model); not through the seed's name patterns.
#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path, description = "Model id (e.g. light/qwen-0.5b), or any name a request's `model` may use")), responses((status = 200, description = "Success", body = ModelObject), (status = 404, description = "Unknown model", body = ErrorResponse)))]
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let registry = state.registry.clone();
    let entry = tokio::task::spawn_blocking(move || registry.named(&id))
        .await
        .map_err(|e| ApiError::internal(format!("model lookup failed: {e}")))??;
    Ok(Json(model_object(&entry)))
}

/// A bare array of `{name, ...}`, `name` being what to send as `model`.
async fn by_kind(state: AppState, kind: ModelKind) -> Json<Vec<Value>> {
    let registry = state.registry.clone();
    let entries: Vec<Arc<ModelEntry>> = tokio::task::spawn_blocking(move || registry.list())
        .await
        .unwrap_or_default();
    Json(
        entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| {
                json!({
                    "name": e.id,
                    "id": e.id,
                    "path": e.path.display().to_string(),
                    "size_bytes": std::fs::metadata(&e.path).map(|m| m.len()).unwrap_or(0),
                    "state": e.state().as_str(),
                    "tier": e.tier.map(|t| t.as_str()),
                })
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/v1/models/chat", responses((status = 200, description = "A bare array of `{name, id, path, size_bytes, state, tier}` for chat models")))]
pub async fn chat_models(State(state): State<AppState>) -> Json<Vec<Value>> {
    by_kind(state, ModelKind::Chat).await
}

#[utoipa::path(get, path = "/v1/models/embeddings", responses((status = 200, description = "The same for embedding models")))]
pub async fn embedding_models(State(state): State<AppState>) -> Json<Vec<Value>> {
    by_kind(state, ModelKind::Embedding).await
}

/// `POST /v1/models/{id}/load` and `/unload`, for operators (ids contain `/`,
/// so the action is the path's last segment).
#[utoipa::path(post, path = "/v1/models/{id}/{action}", params(("id" = String, Path, description = "Model id"), ("action" = String, Path, description = "`load` or `unload`")), responses((status = 200, description = "Success", body = ModelObject), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 400, description = "An action other than load or unload", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse), (status = 403, description = "A named key, not the operator's", body = ErrorResponse), (status = 409, description = "The model is serving requests", body = ErrorResponse)))]
pub async fn model_action(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let (id, action) = path
        .rsplit_once('/')
        .filter(|(_, a)| matches!(*a, "load" | "unload"))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown model action in {path:?}; use /load or /unload"
            ))
        })?;
    let entry = state.registry.resolve_async(id).await?;
    state.registry.operate(&entry, action == "load").await?;
    Ok(Json(model_object(&entry)))
}
