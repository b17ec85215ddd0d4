//! The dashboard's Status and Settings pages: what runs, how busy it is, the
//! cache, the retrieval collections, and the server's settings; flushing the
//! response cache.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::analytics::{Query, Totals};
use crate::api::error::ApiError;
use crate::cache::CacheStats;
use crate::state::AppState;
use crate::wire::ErrorResponse;

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// Resident memory of the whole process (all models, caches), when the
    /// platform tells (Linux).
    pub rss_bytes: Option<u64>,
    /// Models known (tiers and the models directory).
    pub models_available: usize,
    /// Models in memory now, with their load.
    pub loaded: Vec<LoadedModel>,
    #[schema(value_type = Object)]
    pub cache: CacheStats,
    /// Hits over lookups since start; `null` before any lookup.
    pub cache_hit_rate: Option<f64>,
    pub collections: Vec<CollectionStatus>,
    /// Why retrieval is unavailable, when it is.
    pub collections_error: Option<String>,
    /// The API's traffic over the last hour.
    pub last_hour: Totals,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoadedModel {
    pub id: String,
    pub kind: &'static str,
    pub tier: Option<&'static str>,
    pub state: &'static str,
    /// Bytes of weights (the GGUF's tensors).
    pub size_bytes: u64,
    pub n_params: u64,
    pub n_ctx: u32,
    pub parallel: u32,
    /// Sequences generating now, and waiting for a slot.
    pub active: usize,
    pub waiting: usize,
    pub idle_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CollectionStatus {
    pub name: String,
    pub embedding_model: String,
    pub documents: u64,
    pub chunks: u64,
    /// Not known for collections on a Qdrant server.
    pub bytes: Option<u64>,
}

#[utoipa::path(get, path = "/admin/api/status", operation_id = "admin_status", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "Uptime, memory, loaded models with their queues, cache, collections, the last hour's traffic", body = Status), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn status(State(state): State<AppState>) -> Result<axum::Json<Status>, ApiError> {
    let loaded = state
        .registry
        .loaded()
        .iter()
        .filter_map(|entry| {
            let engine = entry.loaded_engine()?;
            let info = engine.info();
            let stats = engine.stats();
            Some(LoadedModel {
                id: entry.id.clone(),
                kind: entry.kind.as_str(),
                tier: entry.tier.map(|t| t.as_str()),
                state: entry.state().as_str(),
                size_bytes: info.size_bytes,
                n_params: info.n_params,
                n_ctx: info.n_ctx,
                parallel: info.parallel,
                active: stats.active.load(Ordering::Relaxed),
                waiting: stats.waiting.load(Ordering::Relaxed),
                idle_seconds: entry.idle_for().as_secs(),
            })
        })
        .collect();
    let (collections, collections_error) = match state.rag.as_ref() {
        Ok(library) => match crate::retrieval::collection_stats(library).await {
            Ok(all) => (
                all.into_iter()
                    .map(|(meta, stats)| CollectionStatus {
                        name: meta.name,
                        embedding_model: meta.embedding_model,
                        documents: stats.documents,
                        chunks: stats.chunks,
                        bytes: stats.bytes,
                    })
                    .collect(),
                None,
            ),
            Err(error) => (Vec::new(), Some(error)),
        },
        Err(error) => (Vec::new(), Some(error.clone())),
    };
    let status = super::blocking("status_unavailable", move || {
        let cache = state.cache.stats();
        let lookups = cache.hits + cache.misses;
        let last_hour = state
            .analytics
            .report(&Query {
                now: chrono::Utc::now().timestamp(),
                range: Duration::from_secs(3600),
                step: Duration::from_secs(3600),
                model: None,
                key: None,
            })?
            .totals;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: state.started.elapsed().as_secs(),
            rss_bytes: rss_bytes(),
            models_available: state.registry.list().len(),
            loaded,
            cache_hit_rate: (lookups > 0).then(|| cache.hits as f64 / lookups as f64),
            cache,
            collections,
            collections_error,
            last_hour,
        })
    })
    .await?;
    Ok(axum::Json(status))
}

/// Resident set size from `/proc/self/statm` (pages × page size).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Whether the API routes need a key (beyond loopback, or `REQUIRE_API_KEY`).
    pub api_key_required: bool,
    /// Origins browsers may call `/v1` from; `null`: any. `/admin` allows none.
    pub cors_allow_origins: Option<Vec<String>>,
    pub models_dir: String,
    pub data_dir: String,
    /// Where downloads come from, and whether a token is set (never the token).
    pub hub_endpoint: String,
    pub hub_token_set: bool,
    pub cache_enabled: bool,
    pub cache_max_entries: u64,
    /// Serialized bytes the memory tier holds at most (`CACHE_MAX_BYTES`).
    pub cache_max_bytes: u64,
    pub cache_ttl_seconds: u64,
    pub cache_persist_to_disk: bool,
    /// The shared tier (`CACHE_URL`, its password hidden), if any.
    pub cache_shared: Option<String>,
    pub max_loaded_models: Option<usize>,
    /// `MAX_MODEL_MEMORY` in MiB (`null`: no budget).
    pub max_model_memory_mib: Option<u64>,
    pub analytics_retention_days: u64,
}

#[utoipa::path(get, path = "/admin/api/settings", operation_id = "admin_settings", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "The server's settings as it runs with them (no secrets)", body = ServerSettings), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn settings(State(state): State<AppState>) -> axum::Json<ServerSettings> {
    let s = &state.settings;
    axum::Json(ServerSettings {
        host: s.host.clone(),
        port: s.port,
        api_key_required: state.keys.api_needs_key(),
        cors_allow_origins: s.cors_allow_origins.clone(),
        models_dir: s.models_dir.display().to_string(),
        data_dir: s.data_dir.display().to_string(),
        hub_endpoint: s.hub.endpoint.clone(),
        hub_token_set: s.hub.token.is_some(),
        cache_enabled: s.cache.enabled,
        cache_max_entries: s.cache.max_entries,
        cache_max_bytes: s.cache.max_bytes,
        cache_ttl_seconds: s.cache.ttl.as_secs(),
        cache_persist_to_disk: s.cache.persist_to_disk,
        cache_shared: state.cache.shared_url(),
        max_loaded_models: s.max_loaded_models,
        max_model_memory_mib: s.max_model_memory.map(|b| b >> 20),
        analytics_retention_days: s.analytics_retention.as_secs() / 86400,
    })
}

#[utoipa::path(post, path = "/admin/api/cache/flush", operation_id = "admin_flush_cache", security(("bearer" = []), ("x_api_key" = [])), responses((status = 200, description = "Every cached answer dropped, from memory, disk and the shared Redis; the counters since start are kept"), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn flush_cache(
    State(state): State<AppState>,
) -> Result<axum::Json<CacheStats>, ApiError> {
    let cache = state.cache.clone();
    let stats = super::blocking("cache_unavailable", move || {
        cache.clear();
        Ok(cache.stats())
    })
    .await?;
    tracing::info!("response cache flushed by the operator");
    Ok(axum::Json(stats))
}
