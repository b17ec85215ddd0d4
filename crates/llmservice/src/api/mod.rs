//! The HTTP surface. Handlers turn wire types into engine requests and engine
//! events back into wire types; nothing here touches llama.cpp.

mod cached;
mod chat;
mod completions;
mod embeddings;
pub mod error;
mod functions;
mod generate;
mod json;
mod models;
mod openapi;
mod tokens;
mod tools;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::CorsLayer;
use tracing::Instrument;

use crate::config::Settings;
use crate::models::Registry;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub cache: Arc<crate::cache::ResponseCache>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Milliseconds since the Unix epoch of the last request's start or end.
    last_activity: Arc<std::sync::atomic::AtomicU64>,
}

impl AppState {
    /// The state for `settings`: the model registry and the response cache (whose
    /// disk tier, if any, is opened here; a broken one is logged and bypassed).
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            registry: Arc::new(Registry::new(settings.clone())),
            cache: Arc::new(crate::cache::ResponseCache::new(settings.cache.clone())),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            last_activity: Arc::new(std::sync::atomic::AtomicU64::new(now_millis())),
            settings,
        }
    }

    fn touch(&self) {
        self.last_activity
            .store(now_millis(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the server has been without requests and without generating.
    pub fn idle_for(&self) -> std::time::Duration {
        if self.registry.any_busy() {
            self.touch();
        }
        let last = self
            .last_activity
            .load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_millis(now_millis().saturating_sub(last))
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    Router::new()
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url(
            "/openapi.json",
            <openapi::ApiDoc as utoipa::OpenApi>::openapi(),
        ))
        .route("/health", get(models::health))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/chat", get(models::chat_models))
        .route("/v1/models/embeddings", get(models::embedding_models))
        .route(
            "/v1/models/{*id}",
            get(models::get_model).post(models::model_action),
        )
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/functions", get(functions::list_functions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/embeddings", post(embeddings::embeddings))
        .route("/v1/rerank", post(embeddings::rerank))
        .route("/rerank", post(embeddings::rerank))
        .route("/internal/cache/stats", get(cache_stats))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CorsLayer::permissive())
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .with_state(state)
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    // Rendering reads the cache's stats, which may touch its disk tier.
    let body = tokio::task::spawn_blocking(move || state.metrics.render(&state))
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

#[utoipa::path(get, path = "/internal/cache/stats", responses((status = 200, description = "Hits, misses, entries, evictions, bytes, disk tier state")))]
async fn cache_stats(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<crate::cache::CacheStats> {
    let cache = state.cache.clone();
    let stats = tokio::task::spawn_blocking(move || cache.stats()).await;
    axum::Json(stats.unwrap_or_else(|_| state.cache.stats()))
}

async fn unknown_route(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request(format!(
            "no route for {} {}",
            request.method(),
            request.uri().path()
        ))
    }
    .with_code("unknown_url")
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ))
    }
    .with_code("method_not_allowed")
}

/// A bounded set of route labels: model ids and unknown paths must not each
/// become a metric series.
fn route_label(path: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/health",
        "/v1/models",
        "/v1/models/chat",
        "/v1/models/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/embeddings",
        "/v1/rerank",
        "/rerank",
        "/tokenize",
        "/detokenize",
        "/internal/cache/stats",
        "/metrics",
    ];
    match ROUTES.iter().find(|r| **r == path) {
        Some(route) => route,
        None if path.starts_with("/v1/models/") => "/v1/models/{id}",
        None => "other",
    }
}

/// Opens the request's span (with its id, echoed as `x-request-id`) and logs one
/// line when the response head is ready.
async fn trace_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.uri().path());
    state.touch();
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("request", id = %id, method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    tracing::info!(parent: &span, status = response.status().as_u16(), latency_ms = started.elapsed().as_millis() as u64, "response");
    state
        .metrics
        .observe_request(route, response.status().as_u16(), started.elapsed());
    state.touch();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response.into_response()
}
