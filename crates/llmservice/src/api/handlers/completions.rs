//! `POST /v1/completions`: the legacy prompt-completion API.

use std::time::Instant;

use futures_util::StreamExt as _;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use engine::chat::OutputParser;
use engine::{CompiledConstraint, Engine, EventStream, TokenId};
use serde_json::Value;

use super::{respond, text_model, wants_to_wait, Delivery};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, TextAnswer};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache;
use crate::chat::{self, tools};
use crate::generation;
use crate::keys::Caller;
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::{
    Completion, CompletionRequest, ErrorResponse, PromptField, SamplingFields, SseEvent,
};

/// Most prompts one request may batch.
const MAX_PROMPTS: usize = 64;

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest, responses((status = 200, description = "A legacy completion, or an SSE stream of them", content((Completion = "application/json"), (SseEvent = "text/event-stream"))), (status = 400, description = "Bad parameters or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    generation::validate(&req.sampling)?;
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "suffix (fill-in-the-middle) is not supported yet",
        ));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::unsupported(
            "best_of",
            "best_of > 1 is not supported yet",
        ));
    }
    let output = tools::output_constraint(req.response_format.as_ref(), req.grammar.as_deref())?;
    let entry = text_model(&state, &req.model).await?;
    let logprobs = completion_logprobs_request(&req.sampling)?;
    let head = AnswerHead::new("cmpl", &req.model, &req.sampling);
    let cache_key = response_cache::key_for(
        &state.cache,
        "completions",
        &entry,
        &req.sampling,
        &entry.defaults(),
        serde_json::json!({
            "prompt": serde_json::to_value(&req.prompt).unwrap_or_default(),
            "echo": req.echo,
            // As text: a schema's property order is what the model writes.
            "response_format": req.response_format.as_ref().map(Value::to_string),
            "grammar": req.grammar,
            // Fields we do not read change an upstream's answer, not ours.
            "upstream_fields": entry.upstream.as_ref().map(|_| &req.extra),
        }),
    );
    let replayed = response_cache::replay_completion(
        &state.cache,
        cache_key.as_ref(),
        head.clone(),
        logprobs.is_some(),
    );
    if let Some(response) = replayed.await {
        return Ok(response);
    }
    let n = req.sampling.n.unwrap_or(1);
    let upstream = state
        .registry
        .upstream(&entry, wants_to_wait(&headers))
        .await?;
    let (events, echoes) = match &upstream {
        Some(upstream) => {
            let events = upstream_events(&state, &entry, upstream, &req, logprobs, started).await?;
            (events.right_stream(), vec![String::new(); n as usize])
        }
        None => {
            let engine = state
                .registry
                .engine(&entry, wants_to_wait(&headers))
                .await?;
            let constraint = match output {
                Some(output) => {
                    let param = chat::output_param(req.grammar.as_deref());
                    Some(chat::compile(&engine, output, param).await?)
                }
                None => None,
            };
            let (streams, echoes) = submit(&engine, &entry, &req, logprobs, constraint)?;
            let choices = generation::start(streams, &state.metrics, &entry.id, started).await?;
            (
                generation::merge(choices, OutputParser::default).left_stream(),
                echoes,
            )
        }
    };
    let answer = TextAnswer::new(head, echoes, n as usize, logprobs.is_some());
    let delivery = Delivery {
        state,
        model_id: entry.id.clone(),
        endpoint: "completions",
        cache_key,
        started,
        keep: None,
        caller,
        ledger: Ledger::current(),
    };
    respond(answer, events, delivery, response_cache::Served::Generated).await
}

/// A completion from an upstream tier: one text prompt, forwarded under the
/// upstream's model name (echo and legacy logprobs are read from our own
/// tokens, which an upstream does not share).
async fn upstream_events(
    state: &AppState,
    entry: &ModelEntry,
    upstream: &std::sync::Arc<crate::upstream::Upstream>,
    req: &CompletionRequest,
    logprobs: Option<u32>,
    started: Instant,
) -> Result<
    impl futures_util::Stream<
            Item = (
                u32,
                Result<generation::ChoiceEvent, crate::error::RequestError>,
            ),
        > + Send
        + 'static,
    ApiError,
> {
    if !matches!(req.prompt, PromptField::Text(_)) || req.echo == Some(true) || logprobs.is_some() {
        return Err(ApiError::unsupported(
            "prompt",
            "an upstream tier completes one text prompt, without echo or logprobs",
        ));
    }
    let mut body = serde_json::to_value(req)
        .map_err(|e| ApiError::internal(format!("cannot forward the request: {e}")))?;
    body["model"] = upstream.model_for(&req.model).into();
    upstream.fill_sampling(&mut body);
    let n = req.sampling.n.unwrap_or(1);
    let timer = state.metrics.token_timer(&entry.id, started);
    Ok(crate::upstream::completion_events(upstream, body, n, timer).await?)
}

/// Queues every prompt's `n` choices, prompt-major (prompt p, choice c has
/// index p * n + c), with the text each choice repeats first under `echo`;
/// each choice's text follows `constraint` when there is one.
fn submit(
    engine: &Engine,
    entry: &ModelEntry,
    req: &CompletionRequest,
    logprobs: Option<u32>,
    constraint: Option<CompiledConstraint>,
) -> Result<(Vec<EventStream>, Vec<String>), ApiError> {
    let prompts = prompts(engine, &req.prompt)?;
    let echo = req.echo.unwrap_or(false);
    let n = req.sampling.n.unwrap_or(1);
    if prompts.len() * n as usize > engine.capacity() {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts x {n} choices exceed what this model can queue at once ({}); split the request",
                prompts.len(),
                engine.capacity()
            ),
        ));
    }
    let mut streams = Vec::with_capacity(prompts.len() * n as usize);
    let mut echoes = Vec::with_capacity(prompts.len() * n as usize);
    for (tokens, text) in prompts {
        let mut request =
            generation::build_request(&req.sampling, &entry.defaults(), engine, tokens, logprobs)
                .map_err(|e| ApiError::from(e).for_prompt_param("prompt"))?;
        request.constraint = constraint.clone();
        streams.extend(
            engine
                .submit_n(request, n)
                .map_err(|e| ApiError::from(e).for_prompt_param("prompt"))?,
        );
        echoes.extend(std::iter::repeat_n(
            if echo { text } else { String::new() },
            n as usize,
        ));
    }
    Ok((streams, echoes))
}

/// Each prompt's tokens, with the text `echo` repeats.
fn prompts(engine: &Engine, prompt: &PromptField) -> Result<Vec<(Vec<TokenId>, String)>, ApiError> {
    let prompts: Vec<(Vec<TokenId>, String)> = match prompt {
        PromptField::Text(text) => vec![(engine.tokenize(text, true, true), text.clone())],
        PromptField::Texts(texts) => texts
            .iter()
            .map(|t| (engine.tokenize(t, true, true), t.clone()))
            .collect(),
        PromptField::Tokens(tokens) => vec![token_prompt(engine, tokens)?],
        PromptField::TokenLists(lists) => lists
            .iter()
            .map(|t| token_prompt(engine, t))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt must hold between 1 and {MAX_PROMPTS} prompts"),
        ));
    }
    if prompts.iter().any(|(tokens, _)| tokens.is_empty()) {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    Ok(prompts)
}

/// Legacy completions ask with `logprobs: k` (0-5 in OpenAI's API; up to 20 here).
fn completion_logprobs_request(sampling: &SamplingFields) -> Result<Option<u32>, ApiError> {
    match &sampling.logprobs {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(k)) => match k.as_u64() {
            Some(k) if k <= u64::from(generation::MAX_TOP_LOGPROBS) => Ok(Some(k as u32)),
            _ => Err(ApiError::invalid(
                "logprobs",
                "logprobs must be an integer between 0 and 20",
            )),
        },
        Some(_) => Err(ApiError::invalid(
            "logprobs",
            "logprobs must be an integer between 0 and 20",
        )),
    }
}

fn token_prompt(
    engine: &engine::Engine,
    tokens: &[i64],
) -> Result<(Vec<TokenId>, String), ApiError> {
    let n_vocab = engine.info().n_vocab as i64;
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {n_vocab})"),
        ));
    }
    let tokens: Vec<TokenId> = tokens.iter().map(|&t| t as TokenId).collect();
    let text = engine.detokenize(&tokens, true)?;
    Ok((tokens, text))
}
