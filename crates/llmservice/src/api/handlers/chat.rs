//! `POST /v1/chat/completions`.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::pipeline::{cache_key, check, generate, load};
use super::retrieval::{source, Asked, Retrieval};
use super::{respond, Delivery};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, ChatAnswer, ChatShape};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::{self, Served};
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{ChatCompletion, ChatCompletionRequest, ErrorResponse, RagSource, SseEvent};

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest, responses((status = 200, description = "A completion, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending with `data: [DONE]`", content((ChatCompletion = "application/json"), (SseEvent = "text/event-stream"))), (status = 400, description = "Bad parameters, a schema or grammar that cannot be compiled, or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(mut req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let sources = match req.rag.take() {
        Some(options) => Some(retrieve_into(&state, &headers, &mut req, &options).await?),
        None => None,
    };
    let (job, entry) = check(&state, &req).await?;
    let head = AnswerHead::new("chatcmpl", &req.model, &req.sampling);
    let shape = ChatShape {
        legacy: job.legacy(),
        logprobs: job.logprobs.is_some(),
    };
    let answer = ChatAnswer::new(head.clone(), job.n as usize, shape).with_sources(sources.clone());
    let cache_key = cache_key(&state, &entry, &req, &job);
    let replayed =
        response_cache::replay_chat(&state.cache, cache_key.as_ref(), head, shape, sources);
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
        ledger: Ledger::current(),
    };
    respond(answer, events, delivery, Served::Generated).await
}

/// Retrieves for the request's last user message and gives the model the
/// sources: in the system message (after the client's own, if any). Returns
/// the sources, in citation order.
async fn retrieve_into(
    state: &AppState,
    headers: &HeaderMap,
    req: &mut ChatCompletionRequest,
    options: &crate::wire::RagOptions,
) -> Result<Vec<RagSource>, ApiError> {
    let query = last_user_text(&req.messages).ok_or_else(|| {
        ApiError::invalid(
            "rag",
            "rag retrieves for the last user message, and there is none with text",
        )
    })?;
    let retrieval = Retrieval::new(
        state,
        Asked {
            collection: options.collection.as_ref(),
            query: &query,
            top_k: options.top_k,
            top_k_param: "rag.top_k",
            score_threshold: options.score_threshold,
            filter: options.filter.as_ref(),
            mode: options.mode.as_deref(),
        },
    )?;
    let (hits, _) = retrieval.run(state, headers, options.rerank).await?;
    let sources_message = rag::prompt::system_message(&hits);
    // Beside the client's own system message when it is text; else ahead of
    // the conversation.
    let own = req
        .messages
        .first()
        .filter(|m| m.get("role").and_then(|r| r.as_str()) == Some("system"))
        .and_then(|m| m.get("content")?.as_str().map(str::to_owned));
    match own {
        Some(own) => {
            req.messages[0]["content"] = format!("{own}\n\n{sources_message}").into();
        }
        None => req.messages.insert(
            0,
            serde_json::json!({"role": "system", "content": sources_message}),
        ),
    }
    Ok(hits.into_iter().map(source).collect())
}

/// The text of the last user message (a string, or its text parts joined).
fn last_user_text(messages: &[serde_json::Value]) -> Option<String> {
    let message = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))?;
    let text = match message.get("content")? {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}
