//! Operations: Prometheus metrics and the response cache's statistics.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let collections = match state.rag.as_ref() {
        Ok(library) => crate::retrieval::collection_stats(library)
            .await
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    // Rendering reads the cache's stats, which may touch its disk tier.
    let body = tokio::task::spawn_blocking(move || {
        state
            .metrics
            .render(&state.registry, &state.cache, &collections)
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/internal/cache/stats", responses((status = 200, description = "Hits, misses, entries (also as seed 001's `size`), evictions, bytes, disk tier state")))]
pub async fn cache_stats(State(state): State<AppState>) -> axum::Json<crate::cache::CacheStats> {
    let cache = state.cache.clone();
    let stats = tokio::task::spawn_blocking(move || cache.stats()).await;
    axum::Json(stats.unwrap_or_else(|_| state.cache.stats()))
}
