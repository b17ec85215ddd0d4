//! The HTTP handlers, thin by design: read the wire request, plan it with the
//! domain modules (`chat`, `generation`), run it on the model, and answer
//! through [`super::answer`]. Handlers never import each other; what they
//! share is here.

pub mod admin;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod functions;
pub mod ingest;
pub mod messages;
pub mod models;
pub mod ollama;
pub mod ops;
pub mod rag;
pub mod rerank;
pub mod responses;
pub mod tokens;

mod pipeline;
mod retrieval;

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::{ModelKind, TokenId};
use futures_util::Stream;

use super::answer::{self, Answer};
use super::auth;
use super::error::ApiError;
use super::response_cache::{self, Served};
use super::sse::sse;
use crate::analytics::Ledger;
use crate::cache::CacheKey;
use crate::error::RequestError;
use crate::generation::ChoiceEvent;
use crate::keys::Caller;
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::PromptField;

/// The model a request names, noted as the request's model for analytics.
async fn resolve(state: &AppState, name: &str) -> Result<Arc<ModelEntry>, ApiError> {
    let entry = state.registry.resolve_async(name).await?;
    if let Some(ledger) = Ledger::current() {
        ledger.note_model(&entry.id);
    }
    Ok(entry)
}

/// The text-generating model a request names; embedding and reranker models
/// are the client's mistake.
async fn text_model(state: &AppState, name: &str) -> Result<Arc<ModelEntry>, ApiError> {
    let entry = resolve(state, name).await?;
    if entry.kind != engine::ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!(
                "'{}' is a {} model and cannot generate text",
                entry.id,
                entry.kind.as_str()
            ),
        ));
    }
    Ok(entry)
}

/// Clients that would rather be told "loading, retry" than wait say so with
/// `x-wait-for-model: false`.
fn wants_to_wait(headers: &HeaderMap) -> bool {
    headers
        .get("x-wait-for-model")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "0" | "no"))
}

/// Where a generation's answer goes once it is whole.
struct Delivery {
    state: AppState,
    model_id: String,
    endpoint: &'static str,
    cache_key: Option<CacheKey>,
    started: Instant,
    /// Also handed the whole answer's JSON (the Responses API stores it).
    keep: Option<Box<dyn FnOnce(serde_json::Value) + Send>>,
    /// Whose key the tokens count against.
    caller: Caller,
    /// The request's analytics (taken when the delivery is made, while
    /// the handler runs; a stream finishes after it returns).
    ledger: Option<Arc<Ledger>>,
}

impl Delivery {
    /// Hands the whole answer to `keep`; a generated one is also stored in
    /// the cache (when it has a key) and logged.
    fn finished<A: Answer>(self, answer: &A, served: Served) {
        if let Some(keep) = self.keep {
            keep(answer::json_value(&answer.whole()));
        }
        if served == Served::FromCache {
            return;
        }
        if let Some(key) = self.cache_key {
            response_cache::store(&self.state.cache, key, answer.cache_body());
        }
        let usage = answer.usage();
        if let Some(ledger) = &self.ledger {
            ledger.note_model(&self.model_id);
            ledger.note_tokens(usage.prompt_tokens, usage.completion_tokens);
        }
        crate::generation::log_done(
            &self.state.metrics,
            &self.model_id,
            self.endpoint,
            &usage,
            self.started,
        );
        let tokens = u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens);
        auth::record(&self.state, self.caller, 0, tokens);
    }
}

/// Answers with the events of a generation (or a cache replay): read to the
/// end into one JSON answer, or sent as SSE (or NDJSON) while they arrive.
/// Either way the whole answer goes where `delivery` says.
async fn respond<A, S>(
    answer: A,
    events: S,
    delivery: Delivery,
    served: Served,
) -> Result<Response, ApiError>
where
    A: Answer,
    A::Chunk: Send,
    S: Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send + 'static,
{
    let response = if answer.head().stream && A::NDJSON {
        ndjson(answer::lines(answer, events, move |a| {
            delivery.finished(a, served)
        }))
    } else if answer.head().stream {
        sse(answer::stream(answer, events, move |a| {
            delivery.finished(a, served)
        }))
    } else {
        let answer = answer::collect(answer, events).await?;
        delivery.finished(&answer, served);
        // Sent as the wire struct itself, so its numbers read as they do in
        // a stream; the cache keeps its JSON value.
        axum::Json(answer.whole()).into_response()
    };
    Ok(response_cache::mark(response, served))
}

/// A stream of JSON lines as an `application/x-ndjson` response.
fn ndjson<S>(lines: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let body = axum::body::Body::from_stream(futures_util::StreamExt::map(
        lines,
        Ok::<_, std::convert::Infallible>,
    ));
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// Checks that `entry` is the kind of model `endpoint` serves.
fn require_kind(entry: &ModelEntry, kind: ModelKind, endpoint: &str) -> Result<(), ApiError> {
    if entry.kind == kind {
        return Ok(());
    }
    let hint = match entry.kind {
        ModelKind::Chat => "use /v1/chat/completions or /v1/completions",
        ModelKind::Embedding => "use /v1/embeddings",
        ModelKind::Reranker => "use /v1/rerank",
    };
    Err(ApiError::invalid(
        "model",
        format!(
            "'{}' is a {} model and cannot serve {endpoint}; {hint}",
            entry.id,
            entry.kind.as_str()
        ),
    ))
}

/// Checks that a list holds between 1 and `max` items.
fn check_count(param: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n == 0 || n > max {
        return Err(ApiError::invalid(
            param,
            format!("{param} must hold between 1 and {max} items, got {n}"),
        ));
    }
    Ok(())
}

/// The one log line of an embedding or rerank request, and its token count.
fn log_encoded(
    state: &AppState,
    caller: Caller,
    model: &str,
    endpoint: &str,
    prompt_tokens: u32,
    started: Instant,
) {
    auth::record(state, caller, 0, u64::from(prompt_tokens));
    if let Some(ledger) = Ledger::current() {
        ledger.note_model(model);
        ledger.note_tokens(prompt_tokens, 0);
    }
    state.metrics.observe_usage(
        model,
        &engine::Usage {
            prompt_tokens,
            ..Default::default()
        },
    );
    tracing::info!(
        model,
        endpoint,
        status = 200,
        prompt_tokens,
        latency_ms = started.elapsed().as_millis() as u64,
        "request finished"
    );
}

/// OpenAI's limit on inputs in one embeddings request.
const MAX_INPUTS: usize = 2048;

/// Every input's tokens; an empty input is the client's 400.
async fn tokenize_inputs(
    engine: &Arc<engine::Engine>,
    input: &PromptField,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let empty_text = match input {
        PromptField::Text(text) => text.is_empty().then_some(0),
        PromptField::Texts(texts) => texts.iter().position(String::is_empty),
        _ => None,
    };
    if let Some(index) = empty_text {
        return Err(ApiError::invalid(
            "input",
            format!("input {index} is an empty string"),
        ));
    }
    // Tokenizing up to 2048 long texts is real CPU work: keep it off the async threads.
    let (input, tokenizer) = (input.clone(), engine.clone());
    let inputs = off_async(move || -> Result<Vec<Vec<TokenId>>, ApiError> {
        Ok(match &input {
            PromptField::Text(text) => vec![tokenizer.tokenize_input(text)],
            PromptField::Texts(texts) => {
                check_count("input", texts.len(), MAX_INPUTS)?;
                texts.iter().map(|t| tokenizer.tokenize_input(t)).collect()
            }
            PromptField::Tokens(tokens) => vec![token_input(&tokenizer, tokens)?],
            PromptField::TokenLists(lists) => {
                check_count("input", lists.len(), MAX_INPUTS)?;
                lists
                    .iter()
                    .map(|t| token_input(&tokenizer, t))
                    .collect::<Result<_, _>>()?
            }
        })
    })
    .await?;
    if let Some(index) = inputs.iter().position(Vec::is_empty) {
        return Err(ApiError::invalid(
            "input",
            format!("input {index} is empty"),
        ));
    }
    Ok(inputs)
}

fn token_input(engine: &engine::Engine, tokens: &[i64]) -> Result<Vec<TokenId>, ApiError> {
    let n_vocab = i64::from(engine.info().n_vocab);
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(ApiError::invalid(
            "input",
            format!("token id {bad} is outside the vocabulary (size {n_vocab})"),
        ));
    }
    Ok(tokens.iter().map(|&t| t as TokenId).collect())
}

/// A new id for an answer.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs CPU-bound request preparation on the blocking pool.
async fn off_async<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("a worker thread failed: {e}"))))
}
