//! `POST /v1/responses`, `GET /v1/responses/{id}` and `DELETE
//! /v1/responses/{id}`: OpenAI's Responses API, translated onto the chat
//! pipeline (`chat::responses`). Responses are stored unless `store: false`,
//! so `previous_response_id` continues a conversation: its stored messages
//! come first, and the next turn's prompt starts with the same tokens, which
//! the engine's prefix reuse finds.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::pipeline::{cache_key, cached_events, check, generate, load, replayed};
use super::{respond, Delivery};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, ResponsesAnswer};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::Served;
use crate::chat::responses::{self, Translated};
use crate::keys::Caller;
use crate::response_store::{now_ms, ResponseStore, Stored};
use crate::state::AppState;
use crate::wire::{ErrorResponse, ResponseDeleted, ResponseObject, ResponsesRequest, SseEvent};

#[utoipa::path(post, path = "/v1/responses", request_body = ResponsesRequest, responses((status = 200, description = "A response, or with `stream: true` typed SSE events (`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`/`.done`, `response.function_call_arguments.delta`/`.done`, `response.content_part.done`, `response.output_item.done`, `response.completed` or `response.incomplete`), each with a `sequence_number`", content((ResponseObject = "application/json"), (SseEvent = "text/event-stream"))), (status = 400, description = "Bad parameters or items, or an unknown previous_response_id", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, model loading, or the response store unavailable", body = ErrorResponse)))]
pub async fn create_response(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let previous = match &req.previous_response_id {
        Some(id) => previous_history(&state, id).await?,
        None => Vec::new(),
    };
    let Translated { chat, history } = responses::chat_request(&req, previous)?;
    let (job, entry) = check(&state, &chat).await?;
    let head = AnswerHead {
        id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
        include_usage: false,
        ..AnswerHead::new("resp", &req.model, &chat.sampling)
    };
    let keep = req.store.unwrap_or(true).then(|| {
        let (store, id) = (state.responses.clone(), head.id.clone());
        Box::new(move |body: Value| keep(&store, id, body, history)) as Box<_>
    });
    let answer = ResponsesAnswer::new(head, &req);
    let cache_key = cache_key(&state, &entry, &chat, &job);
    let delivery = Delivery {
        state: state.clone(),
        model_id: entry.id.clone(),
        endpoint: "responses",
        cache_key: cache_key.clone(),
        started,
        keep,
        caller,
        ledger: Ledger::current(),
    };
    if let Some(events) = cached_events(&state, cache_key.as_ref()).await {
        return respond(answer, replayed(events), delivery, Served::FromCache).await;
    }
    let engine = load(&state, &headers, &entry).await?;
    let (events, _) = generate(&state, &entry, &engine, &chat, job, started).await?;
    respond(answer, events, delivery, Served::Generated).await
}

/// Stores a finished response and the conversation it ends.
fn keep(store: &Arc<ResponseStore>, id: String, body: Value, history: Vec<Value>) {
    let Ok(response) = serde_json::from_value::<ResponseObject>(body.clone()) else {
        return;
    };
    let history = responses::history_after(history, &response);
    store.keep(id, Stored { body, history });
}

/// The conversation a stored response ended, as chat messages.
async fn previous_history(state: &AppState, id: &str) -> Result<Vec<Value>, ApiError> {
    let stored = read(state, id).await?.ok_or_else(|| {
        ApiError::invalid(
            "previous_response_id",
            format!("Previous response with id '{id}' not found."),
        )
        .with_code("previous_response_not_found")
    })?;
    Ok(stored.history)
}

async fn read(state: &AppState, id: &str) -> Result<Option<Stored>, ApiError> {
    let (store, id) = (state.responses.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || store.get(&id, now_ms()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_unavailable)
}

#[utoipa::path(get, path = "/v1/responses/{id}", params(("id" = String, Path, description = "The response's id")), responses((status = 200, description = "The stored response", body = ResponseObject), (status = 404, description = "No stored response has this id", body = ErrorResponse)))]
pub async fn get_response(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    match read(&state, &id).await? {
        Some(stored) => Ok(axum::Json(stored.body)),
        None => Err(not_found(&id)),
    }
}

#[utoipa::path(delete, path = "/v1/responses/{id}", params(("id" = String, Path, description = "The response's id")), responses((status = 200, description = "The response is deleted", body = ResponseDeleted), (status = 404, description = "No stored response has this id", body = ErrorResponse)))]
pub async fn delete_response(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<ResponseDeleted>, ApiError> {
    let (store, key) = (state.responses.clone(), id.clone());
    let deleted = tokio::task::spawn_blocking(move || store.delete(&key, now_ms()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_unavailable)?;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok(axum::Json(ResponseDeleted {
        id,
        object: "response",
        deleted: true,
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        param: Some("id".to_owned()),
        code: Some("not_found"),
        ..ApiError::bad_request(format!("Response with id '{id}' not found."))
    }
}

fn store_unavailable(message: String) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: Some("response_store_unavailable"),
        ..ApiError::internal(message)
    }
}
