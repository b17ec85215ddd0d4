//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's
//! Messages API, translated onto the chat pipeline (`chat::anthropic`), with
//! its own answer shape, named stream events and error shape. `x-api-key` and
//! `anthropic-version` headers are accepted.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::pipeline::{
    cache_key, cached_events, chat_template, check, generate, load, replayed,
    replayed_prompt_tokens,
};
use super::{off_async, respond, Delivery};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, MessagesAnswer};
use crate::api::error::{AnthropicError, ApiError};
use crate::api::json::Json;
use crate::api::response_cache::Served;
use crate::chat::anthropic::{self, PromptParts};
use crate::chat::ChatPrompt;
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{
    CountTokensAnswer, CountTokensRequest, Message, MessagesErrorBody, MessagesRequest, SseEvent,
};

#[utoipa::path(post, path = "/v1/messages", request_body = MessagesRequest, responses((status = 200, description = "A message, or with `stream: true` named SSE events (`message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`)", content((Message = "application/json"), (SseEvent = "text/event-stream"))), (status = 400, description = "Bad parameters or blocks, in Anthropic's error shape", body = MessagesErrorBody), (status = 404, description = "Unknown model", body = MessagesErrorBody), (status = 503, description = "Queue full or model loading", body = MessagesErrorBody)))]
pub async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    body: Result<Json<MessagesRequest>, ApiError>,
) -> Result<Response, AnthropicError> {
    let Json(req) = body?;
    let started = Instant::now();
    let chat = anthropic::chat_request(&req)?;
    let (job, entry) = check(&state, &chat).await?;
    let head = AnswerHead {
        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        include_usage: false,
        ..AnswerHead::new("msg", &req.model, &chat.sampling)
    };
    let stops = req.stop_sequences.clone().unwrap_or_default();
    // A cached chat answer does not say which stop sequence ended it.
    let cache_key = stops
        .is_empty()
        .then(|| cache_key(&state, &entry, &chat, &job))
        .flatten();
    let delivery = Delivery {
        state: state.clone(),
        model_id: entry.id.clone(),
        endpoint: "messages",
        cache_key: cache_key.clone(),
        started,
        keep: None,
        caller,
        ledger: Ledger::current(),
    };
    if let Some(events) = cached_events(&state, cache_key.as_ref()).await {
        let answer = MessagesAnswer::new(head, replayed_prompt_tokens(&events), stops);
        return Ok(respond(answer, replayed(events), delivery, Served::FromCache).await?);
    }
    let engine = load(&state, &headers, &entry).await?;
    let (events, prompt_tokens) = generate(&state, &entry, &engine, &chat, job, started).await?;
    let answer = MessagesAnswer::new(head, prompt_tokens, stops);
    Ok(respond(answer, events, delivery, Served::Generated).await?)
}

#[utoipa::path(post, path = "/v1/messages/count_tokens", request_body = CountTokensRequest, responses((status = 200, description = "The prompt's length in tokens, as `/v1/messages` would render it", body = CountTokensAnswer), (status = 400, description = "Bad parameters or blocks", body = MessagesErrorBody), (status = 404, description = "Unknown model", body = MessagesErrorBody)))]
pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CountTokensRequest>, ApiError>,
) -> Result<axum::Json<CountTokensAnswer>, AnthropicError> {
    let Json(req) = body?;
    let parts = PromptParts {
        system: req.system.as_ref(),
        messages: &req.messages,
        tools: req.tools.as_deref(),
        tool_choice: req.tool_choice.as_ref(),
        thinking: req.thinking.as_ref(),
    };
    let chat = anthropic::count_request(&req.model, &parts)?;
    let (job, entry) = check(&state, &chat).await?;
    // Counting needs the model's own tokenizer and template.
    let engine = state
        .registry
        .engine(&entry, super::wants_to_wait(&headers))
        .await
        .map_err(ApiError::from)?;
    let extra = chat.chat_template_kwargs;
    let input_tokens = off_async(move || {
        let prompt = ChatPrompt {
            template: chat_template(engine.info())?,
            extra: extra.as_ref(),
        };
        let prompt = prompt.tokens(&engine, &job.messages, job.active_plan())?;
        Ok(prompt.tokens.len() as u32)
    })
    .await?;
    Ok(axum::Json(CountTokensAnswer { input_tokens }))
}
