//! The HTTP surface: the router and its layers, the handlers, answers built
//! from choice records, SSE, the response cache at the edge, and OpenAI's
//! error shape. Nothing here touches llama.cpp.
//!
//! Dependencies point one way: `handlers` → `answer`, `response_cache`, `sse`
//! → `error`, `json`; the domain (`crate::chat`, `crate::generation`) and the
//! wire types (`crate::wire`) know nothing of this module.

mod answer;
mod auth;
pub mod error;
mod handlers;
mod json;
mod openapi;
mod response_cache;
mod sse;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;

use error::ApiError;
use handlers::{
    admin, chat, completions, embeddings, functions, messages, models, ollama, ops, rag, rerank,
    responses, tokens,
};

pub use crate::state::AppState;

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
        .route("/v1/responses", post(responses::create_response))
        .route(
            "/v1/responses/{id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate_text))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::legacy_embeddings))
        .route("/api/pull", post(ollama::pull))
        .route("/v1/functions", get(functions::list_functions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/embeddings", post(embeddings::embeddings))
        .route(
            "/v1/rag/documents",
            post(rag::add_documents).get(rag::list_documents),
        )
        .route(
            "/v1/rag/documents/{id}",
            get(rag::get_document).delete(rag::delete_document),
        )
        .route("/v1/rag/search", post(rag::rag_search))
        .route("/v1/rag/chat", post(rag::rag_chat))
        .route("/v1/rag/collections", get(rag::list_collections))
        .route("/v1/rag/collections/{name}", delete(rag::delete_collection))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/rerank", post(rerank::rerank))
        .route(
            "/admin/api/keys",
            get(admin::list_keys).post(admin::create_key),
        )
        .route("/admin/api/keys/{id}", delete(admin::revoke_key))
        .route("/internal/cache/stats", get(ops::cache_stats))
        .route("/metrics", get(ops::metrics))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(cors(&state.settings.cors_allow_origins))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .with_state(state)
}

/// Browsers may call from any origin unless `CORS_ALLOW_ORIGINS` lists
/// them (preflight requests are answered here, before any key check).
fn cors(origins: &Option<Vec<String>>) -> CorsLayer {
    let Some(origins) = origins else {
        return CorsLayer::permissive();
    };
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods(Any)
        .allow_headers(Any)
        .expose_headers(Any)
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

/// Opens the request's span (with its id, echoed as `x-request-id`), logs one
/// line when the response head is ready, and counts the request under the
/// route it matched (a bounded set: model ids and unknown paths must not each
/// become a metric series).
async fn trace_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || "other".to_owned(),
        |p| p.as_str().replace("{*id}", "{id}"),
    );
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
        .observe_request(&route, response.status().as_u16(), started.elapsed());
    state.touch();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response.into_response()
}
