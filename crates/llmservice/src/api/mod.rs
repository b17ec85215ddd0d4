//! The HTTP surface: the router and its layers, the handlers, answers built
//! from choice records, SSE, the response cache at the edge, and OpenAI's
//! error shape. Nothing here touches llama.cpp.
//!
//! Dependencies point one way: `handlers` → `answer`, `response_cache`, `sse`
//! → `error`, `json`; the domain (`crate::chat`, `crate::generation`) and the
//! wire types (`crate::wire`) know nothing of this module.

mod answer;
mod auth;
mod dashboard;
pub mod error;
mod handlers;
mod json;
mod openapi;
mod response_cache;
mod sse;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;

use crate::analytics::{Analytics, Ledger};
use error::ApiError;
use handlers::{
    admin, chat, completions, embeddings, functions, ingest, messages, models, ollama, ops, rag,
    rerank, responses, tokens,
};

pub use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    Router::new()
        .merge(api_routes(state.settings.rag.max_upload_bytes))
        .merge(operator_routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(cors(&state.settings.cors_allow_origins))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .layer(middleware::from_fn(close_after_unread_body))
        .with_state(state)
}

/// Seed 002's second view of the OpenAPI document (FastAPI's `/redoc`). Its
/// script comes from ReDoc's CDN, so the page runs sandboxed, in an origin
/// of its own: it cannot read what the dashboard keeps for this one (the
/// operator's key).
fn redoc_page() -> impl axum::handler::Handler<((),), AppState> {
    let html = utoipa_redoc::Redoc::new(<openapi::ApiDoc as utoipa::OpenApi>::openapi()).to_html();
    move || {
        let html = html.clone();
        async move {
            (
                [(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("sandbox allow-scripts"),
                )],
                axum::response::Html(html),
            )
        }
    }
}

/// What clients call: the OpenAI, Anthropic and Ollama APIs, retrieval, the
/// tokenizer, health and metrics.
fn api_routes(upload_limit: usize) -> Router<AppState> {
    Router::new()
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url(
            "/openapi.json",
            <openapi::ApiDoc as utoipa::OpenApi>::openapi(),
        ))
        .route("/redoc", get(redoc_page()))
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
            post(ingest::add_documents).get(rag::list_documents),
        )
        .route(
            "/v1/rag/files",
            post(ingest::add_files).layer(DefaultBodyLimit::max(upload_limit)),
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
        .route("/metrics", get(ops::metrics))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
}

/// The operator's routes: the dashboard and its JSON API, the cache's
/// statistics.
fn operator_routes() -> Router<AppState> {
    use admin::{analytics, downloads, keys, models as admin_models, status};
    Router::new()
        .route("/admin", get(dashboard::index))
        .route("/admin/", get(dashboard::index))
        .route("/admin/assets/{file}", get(dashboard::asset))
        .route("/admin/api/status", get(status::status))
        .route("/admin/api/settings", get(status::settings))
        .route("/admin/api/cache/flush", post(status::flush_cache))
        .route(
            "/admin/api/keys",
            get(keys::list_keys).post(keys::create_key),
        )
        .route("/admin/api/keys/{id}", delete(keys::revoke_key))
        .route("/admin/api/models", get(admin_models::list))
        .route(
            "/admin/api/models/{*path}",
            get(admin_models::get)
                .post(admin_models::action)
                .put(admin_models::put_settings),
        )
        .route(
            "/admin/api/downloads",
            get(downloads::list).post(downloads::start),
        )
        .route(
            "/admin/api/downloads/{id}",
            get(downloads::get).delete(downloads::cancel),
        )
        .route("/admin/api/downloads/{id}/events", get(downloads::events))
        .route("/admin/api/analytics", get(analytics::report))
        .route("/internal/cache/stats", get(ops::cache_stats))
}

/// Browsers may call the API from any origin unless `CORS_ALLOW_ORIGINS`
/// lists them; the operator's routes from none (a page elsewhere must not
/// drive the console with a key it has seen). Preflight requests are
/// answered here, before any key check.
fn cors(origins: &Option<Vec<String>>) -> CorsLayer {
    let origins: Option<Vec<HeaderValue>> = origins.as_ref().map(|list| {
        list.iter()
            .filter_map(|origin| HeaderValue::from_str(origin).ok())
            .collect()
    });
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, request| {
            !auth::same_origin_only(&request.method, request.uri.path())
                && origins.as_ref().is_none_or(|list| list.contains(origin))
        }))
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
    // Requests for routes that do not exist are not the API's traffic.
    let counted =
        route != "other" && auth::counts_in_analytics(request.method(), request.uri().path());
    let ledger = Arc::new(Ledger::default());
    let mut response = ledger
        .clone()
        .scope(next.run(request))
        .instrument(span.clone())
        .await;
    let status = response.status().as_u16();
    tracing::info!(parent: &span, status, latency_ms = started.elapsed().as_millis() as u64, "response");
    state
        .metrics
        .observe_request(&route, status, started.elapsed());
    state.touch();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    if counted {
        // The request ends when its body has been sent (or dropped): a
        // stream's tokens and latency are known only then.
        let done = RecordWhenDropped {
            analytics: state.analytics.clone(),
            ledger,
            status,
            started,
        };
        response = response.map(|inner| {
            Body::new(Watched {
                inner,
                watcher: done,
            })
        });
    }
    response.into_response()
}

/// Marks a refusal `Connection: close` when the request's body was not read
/// to its end (over the size limit, or refused before it was read). hyper
/// closes such a connection after the response; without the header a client
/// that pools connections sends its next request into the closed socket and
/// gets "server disconnected without sending a response" instead of an answer.
async fn close_after_unread_body(request: Request, next: Next) -> Response {
    let read = Arc::new(AtomicBool::new(request.body().is_end_stream()));
    let request = request.map(|inner| {
        Body::new(Watched {
            inner,
            watcher: BodyRead(read.clone()),
        })
    });
    let mut response = next.run(request).await;
    let refused = response.status().is_client_error() || response.status().is_server_error();
    if refused && !read.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A body passed through unchanged to a watcher, which is told when the body
/// has been read to its end and is dropped with it.
struct Watched<W> {
    inner: Body,
    watcher: W,
}

trait Watcher: Unpin + Send + 'static {
    /// The body has been read to its end.
    fn ended(&self) {}
}

impl<W: Watcher> HttpBody for Watched<W> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.watcher.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Set once a request's body has been read to its end.
struct BodyRead(Arc<AtomicBool>);

impl Watcher for BodyRead {
    fn ended(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Records its request's analytics when the response body is dropped.
struct RecordWhenDropped {
    analytics: Arc<Analytics>,
    ledger: Arc<Ledger>,
    status: u16,
    started: Instant,
}

impl Watcher for RecordWhenDropped {}

impl Drop for RecordWhenDropped {
    fn drop(&mut self) {
        self.analytics
            .record(&self.ledger.outcome(self.status, self.started));
    }
}
