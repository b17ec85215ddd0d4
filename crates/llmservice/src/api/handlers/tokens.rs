//! `POST /tokenize` and `POST /detokenize`, for clients that count tokens. Field
//! names of both llama-server (`content`) and vLLM (`prompt`, `messages`) work.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json as JsonResponse;
use engine::chat::RenderInput;
use engine::Engine;
use serde_json::{json, Value};

use super::wants_to_wait;
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::chat::prepare_messages;
use crate::state::AppState;
use crate::wire::{DetokenizeRequest, ErrorResponse, TokenizeRequest};

fn model_name(state: &AppState, model: Option<&str>) -> Result<String, ApiError> {
    if let Some(m) = model {
        return Ok(m.to_owned());
    }
    state
        .settings
        .tiers
        .iter()
        .find(|t| matches!(t.tier.as_str(), "light" | "medium" | "heavy"))
        .map(|t| t.tier.as_str().to_owned())
        .ok_or_else(|| ApiError::invalid("model", "model is required: no chat tier is configured"))
}

/// The engine of the model the request names (or the default chat tier),
/// loaded if need be.
async fn model_engine(
    state: &AppState,
    headers: &HeaderMap,
    model: Option<&str>,
) -> Result<Arc<Engine>, ApiError> {
    let entry = state
        .registry
        .resolve_async(&model_name(state, model)?)
        .await?;
    Ok(state
        .registry
        .engine(&entry, wants_to_wait(headers))
        .await?)
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, description = "`{tokens, count, max_model_len}`"), (status = 400, description = "Bad request", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse)))]
pub async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<TokenizeRequest>,
) -> Result<JsonResponse<Value>, ApiError> {
    let engine = model_engine(&state, &headers, req.model.as_deref()).await?;
    let tokens = match (&req.messages, req.content.as_ref().or(req.prompt.as_ref())) {
        (Some(messages), None) => {
            let template = engine.info().chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    "messages",
                    "the model has no chat template to render messages with",
                )
            })?;
            // Exactly what chat renders, so the count matches its usage.
            let messages = prepare_messages(messages)?;
            let prompt = template
                .render(&RenderInput {
                    messages: &messages,
                    tools: None,
                    add_generation_prompt: true,
                    extra: req.chat_template_kwargs.as_ref(),
                })
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            engine.tokenize_chat_prompt(&prompt)
        }
        (None, Some(text)) => engine.tokenize(text, req.add_special.unwrap_or(false), true),
        _ => {
            return Err(ApiError::invalid(
                "content",
                "give exactly one of `content` (or `prompt`) and `messages`",
            ))
        }
    };
    let mut body = json!({
        "tokens": tokens,
        "count": tokens.len(),
        "max_model_len": engine.info().n_ctx,
    });
    if req.with_pieces.unwrap_or(false) {
        let pieces: Vec<Value> = tokens
            .iter()
            .map(|&t| {
                let piece = engine.detokenize(&[t], true).unwrap_or_default();
                json!({"id": t, "piece": piece})
            })
            .collect();
        body["tokens"] = pieces.into();
    }
    Ok(JsonResponse(body))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, description = "`{content}`"), (status = 400, description = "Bad request", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse)))]
pub async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<DetokenizeRequest>,
) -> Result<JsonResponse<Value>, ApiError> {
    let engine = model_engine(&state, &headers, req.model.as_deref()).await?;
    let n_vocab = i64::from(engine.info().n_vocab);
    if let Some(bad) = req.tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {n_vocab})"),
        ));
    }
    let tokens: Vec<engine::TokenId> = req.tokens.iter().map(|&t| t as engine::TokenId).collect();
    let content = engine.detokenize(&tokens, true)?;
    Ok(JsonResponse(json!({"content": content, "prompt": content})))
}
