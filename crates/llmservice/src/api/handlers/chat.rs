//! `POST /v1/chat/completions`.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::pipeline::{cache_key, check, generate, load};
use super::{respond, Delivery};
use crate::api::answer::{AnswerHead, ChatAnswer, ChatShape};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::{self, Served};
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{ChatCompletion, ChatCompletionRequest, ErrorResponse};

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest, responses((status = 200, description = "A completion, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending with `data: [DONE]`", content((ChatCompletion = "application/json"), (String = "text/event-stream"))), (status = 400, description = "Bad parameters, a schema or grammar that cannot be compiled, or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (job, entry) = check(&state, &req).await?;
    let head = AnswerHead::new("chatcmpl", &req.model, &req.sampling);
    let shape = ChatShape {
        legacy: job.legacy(),
        logprobs: job.logprobs.is_some(),
    };
    let answer = ChatAnswer::new(head.clone(), job.n as usize, shape);
    let cache_key = cache_key(&state, &entry, &req, &job);
    let replayed = response_cache::replay_chat(&state.cache, cache_key.as_ref(), head, shape);
    if let Some(response) = replayed.await {
        return Ok(response);
    }
    let engine = load(&state, &headers, &entry).await?;
    let (events, _) = generate(&state, &entry, &engine, &req, job, started).await?;
    let delivery = Delivery {
        state,
        model_id: entry.id.clone(),
        endpoint: "chat",
        cache_key,
        started,
        keep: None,
        caller,
    };
    respond(answer, events, delivery, Served::Generated).await
}
