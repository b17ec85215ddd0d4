//! The dashboard's Models page: every model with its kind, state and
//! settings; load, unload, and per-model settings that persist.

use std::sync::Arc;

use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::models::{ModelEntry, ModelError, ModelOverrides, ModelState};
use crate::state::AppState;
use crate::wire::ErrorResponse;

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminModel {
    pub id: String,
    pub tier: Option<&'static str>,
    pub kind: &'static str,
    /// available, loading, loaded or failed.
    pub state: &'static str,
    /// Why the last load failed.
    pub error: Option<String>,
    /// The GGUF file's name in its directory.
    pub file: String,
    pub size_bytes: u64,
    /// What the next load (engine settings) and the next request (sampling
    /// defaults) use: the configuration with the overrides put in.
    pub settings: EffectiveSettings,
    /// The operator's overrides, as set.
    pub overrides: ModelOverrides,
    /// Loaded with other engine settings than `settings`: unload and load
    /// to apply them.
    pub reload_needed: bool,
    /// Served elsewhere: the upstream's replicas (and the child we run for
    /// a managed tier). Absent for a model run here.
    pub upstream: Option<UpstreamStatus>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamStatus {
    pub replicas: Vec<ReplicaStatus>,
    /// The process id of a managed tier's child while it runs.
    pub child_pid: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaStatus {
    pub base_url: String,
    pub healthy: bool,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

fn upstream_status(entry: &ModelEntry) -> Option<UpstreamStatus> {
    let upstream = entry.upstream.as_ref()?;
    let child_pid = match entry.managed.as_ref().map(|m| m.state()) {
        Some(crate::upstream::ChildState::Running { pid }) => Some(pid),
        _ => None,
    };
    let replicas = upstream
        .replicas()
        .into_iter()
        .map(|(base_url, healthy, in_flight, last_error)| ReplicaStatus {
            base_url,
            healthy,
            in_flight,
            last_error,
        })
        .collect();
    Some(UpstreamStatus {
        replicas,
        child_pid,
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EffectiveSettings {
    pub n_ctx: u32,
    pub n_threads: i32,
    pub parallel: u32,
    pub n_gpu_layers: i32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub max_tokens: u32,
}

/// Reads the file's size: call it off the async threads.
fn admin_model(state: &AppState, entry: &ModelEntry) -> AdminModel {
    let engine = entry.engine_config();
    let defaults = entry.defaults();
    let model_state = entry.state();
    AdminModel {
        id: entry.id.clone(),
        tier: entry.tier.map(|t| t.as_str()),
        kind: entry.kind.as_str(),
        state: model_state.as_str(),
        error: (model_state == ModelState::Failed)
            .then(|| entry.last_error())
            .flatten(),
        file: entry
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size_bytes: std::fs::metadata(&entry.path).map_or(0, |m| m.len()),
        settings: EffectiveSettings {
            n_ctx: engine.n_ctx,
            n_threads: engine.n_threads,
            parallel: engine.parallel,
            n_gpu_layers: engine.n_gpu_layers,
            temperature: defaults.temperature,
            top_p: defaults.top_p,
            top_k: defaults.top_k,
            min_p: defaults.min_p,
            repeat_penalty: defaults.repeat_penalty,
            max_tokens: defaults.max_tokens,
        },
        overrides: state.registry.overrides(entry),
        reload_needed: entry.reload_needed(),
        upstream: upstream_status(entry),
    }
}

#[utoipa::path(get, path = "/admin/api/models", operation_id = "admin_list_models", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "Every model (tiers, then the models directory) with kind, state, file, settings and overrides", body = Vec<AdminModel>), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn list(State(state): State<AppState>) -> Result<axum::Json<Vec<AdminModel>>, ApiError> {
    let models = super::blocking("models_unavailable", move || {
        Ok(state
            .registry
            .list()
            .iter()
            .map(|e| admin_model(&state, e))
            .collect())
    })
    .await?;
    Ok(axum::Json(models))
}

/// A model by exact id (the dashboard acts on what it listed, never on a
/// name that routing would resolve to something else).
async fn by_id(state: &AppState, id: &str) -> Result<Arc<ModelEntry>, ApiError> {
    let registry = state.registry.clone();
    let entries = tokio::task::spawn_blocking(move || registry.list())
        .await
        .unwrap_or_default();
    entries.iter().find(|e| e.id == id).cloned().ok_or_else(|| {
        ModelError::NotFound {
            name: id.to_owned(),
            available: entries.iter().map(|e| e.id.clone()).collect(),
        }
        .into()
    })
}

/// Splits `{id}/{action}` (ids contain `/`).
fn split<'a>(path: &'a str, actions: &[&str]) -> Result<(&'a str, &'a str), ApiError> {
    path.rsplit_once('/')
        .filter(|(id, action)| !id.is_empty() && actions.contains(action))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no model action in {path:?}; use /{}",
                actions.join(" or /")
            ))
        })
}

async fn describe(
    state: AppState,
    entry: Arc<ModelEntry>,
) -> Result<axum::Json<AdminModel>, ApiError> {
    let model = super::blocking("models_unavailable", move || {
        Ok(admin_model(&state, &entry))
    })
    .await?;
    Ok(axum::Json(model))
}

#[utoipa::path(get, path = "/admin/api/models/{id}", operation_id = "admin_get_model", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "Model id, e.g. light/SmolLM2-135M-Instruct-Q4_1")), responses((status = 200, description = "The model", body = AdminModel), (status = 404, description = "No model has this id", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<AdminModel>, ApiError> {
    let entry = by_id(&state, &id).await?;
    describe(state, entry).await
}

#[utoipa::path(post, path = "/admin/api/models/{id}/{action}", operation_id = "admin_model_action", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "Model id"), ("action" = String, Path, description = "`load` or `unload`")), responses((status = 200, description = "The model after the action", body = AdminModel), (status = 404, description = "No model has this id, or no such action", body = ErrorResponse), (status = 409, description = "Unloading a model that is serving requests", body = ErrorResponse), (status = 500, description = "The model failed to load (its error says why)", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn action(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<axum::Json<AdminModel>, ApiError> {
    let (id, action) = split(&path, &["load", "unload"])?;
    let entry = by_id(&state, id).await?;
    state.registry.operate(&entry, action == "load").await?;
    tracing::info!(model = %entry.id, action, "model action by the operator");
    describe(state, entry).await
}

#[utoipa::path(put, path = "/admin/api/models/{id}/settings", operation_id = "admin_put_model_settings", security(("bearer" = []), ("x_api_key" = [])), params(("id" = String, Path, description = "Model id")), request_body = ModelOverrides, responses((status = 200, description = "The model with its new settings (engine settings apply at its next load, sampling defaults at once)", body = AdminModel), (status = 400, description = "A value out of range, or an unknown field", body = ErrorResponse), (status = 404, description = "No model has this id", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn put_settings(
    State(state): State<AppState>,
    Path(path): Path<String>,
    Json(overrides): Json<ModelOverrides>,
) -> Result<axum::Json<AdminModel>, ApiError> {
    let (id, _) = split(&path, &["settings"])?;
    overrides
        .validate()
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let entry = by_id(&state, id).await?;
    let (registry, target) = (state.registry.clone(), entry.clone());
    super::blocking("settings_unavailable", move || {
        registry.set_overrides(&target, overrides)
    })
    .await?;
    tracing::info!(model = %entry.id, "model settings changed by the operator");
    describe(state, entry).await
}
