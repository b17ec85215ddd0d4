//! `POST /v1/chat/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use engine::chat::{ChatTemplate, ToolCallStream};
use engine::Engine;
use futures_util::{Stream, StreamExt};

use super::{respond, text_model, wants_to_wait, Delivery};
use crate::api::answer::{AnswerHead, ChatAnswer, ChatShape};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache;
use crate::chat::{self, ChatJob, ChatPrompt, Rounds};
use crate::error::RequestError;
use crate::generation::{self, ChoiceEvent};
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::{ChatCompletion, ChatCompletionRequest, ErrorResponse};

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest, responses((status = 200, description = "A completion, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending with `data: [DONE]`", body = ChatCompletion), (status = 400, description = "Bad parameters, a schema or grammar that cannot be compiled, or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let job = ChatJob::new(&req)?;
    let entry = text_model(&state, &req.model).await?;
    let head = AnswerHead::new("chatcmpl", &req.model, &req.sampling);
    let shape = ChatShape {
        legacy: job.legacy(),
        logprobs: job.logprobs.is_some(),
    };
    let answer = ChatAnswer::new(head.clone(), job.n as usize, shape);
    // Built-in functions read the clock: their answers are never reused.
    let cache_key = (!job.builtins)
        .then(|| {
            let payload = job.cache_payload(&req);
            response_cache::key_for(
                &state.cache,
                "chat",
                &entry,
                &req.sampling,
                &entry.defaults,
                payload,
            )
        })
        .flatten();
    let replayed = response_cache::replay_chat(&state.cache, cache_key.as_ref(), head, shape);
    if let Some(response) = replayed.await {
        return Ok(response);
    }
    let engine = state
        .registry
        .engine(&entry, wants_to_wait(&headers))
        .await?;
    let events = generate(&state, &entry, &engine, &req, job, started).await?;
    let delivery = Delivery {
        state,
        model_id: entry.id.clone(),
        endpoint: "chat",
        cache_key,
        started,
    };
    respond(answer, events, delivery).await
}

/// Every choice's events: one generation, or the built-in function rounds.
/// Errors before any output are returned here, so they keep their HTTP status.
async fn generate(
    state: &AppState,
    entry: &ModelEntry,
    engine: &Arc<Engine>,
    req: &ChatCompletionRequest,
    job: ChatJob,
    started: Instant,
) -> Result<impl Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send + 'static, ApiError>
{
    let info = engine.info();
    let template = chat_template(info)?;
    let format = template.tool_call_format();
    let constraint = chat::compile_for(engine, &job, format, chat::output_param(req)).await?;
    if job.builtins {
        let rounds = Rounds {
            metrics: state.metrics.clone(),
            model_id: entry.id.clone(),
            defaults: entry.defaults.clone(),
            engine: engine.clone(),
            format,
            plan: job.plan.expect("built-in rounds come with a plan"),
            extra: req.chat_template_kwargs.clone(),
            sampling: req.sampling.clone(),
            logprobs: job.logprobs,
            started,
        };
        let mut events = Box::pin(rounds.run(job.messages, constraint));
        let first = match events.next().await {
            Some(Err(error)) => return Err(error.into()),
            first => first,
        };
        let events = futures_util::stream::iter(first).chain(events);
        return Ok(events.map(|event| (0, event)).left_stream());
    }
    let prompt = ChatPrompt {
        template,
        extra: req.chat_template_kwargs.as_ref(),
    };
    let plan = job.active_plan();
    let tokens = prompt.tokens(engine, &job.messages, plan)?;
    let mut request =
        generation::build_request(&req.sampling, &entry.defaults, engine, tokens, job.logprobs)?;
    request.constraint = constraint;
    request.special_text = plan.is_some();
    let streams = engine.submit_n(request, job.n)?;
    let choices = generation::start(streams, &state.metrics, &entry.id, started).await?;
    let parse = plan.is_some();
    let events = generation::merge(choices, move || parse.then(|| ToolCallStream::new(format)));
    Ok(events.right_stream())
}

fn chat_template(info: &engine::ModelInfo) -> Result<&ChatTemplate, ApiError> {
    info.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "model",
            info.chat_template_error
                .clone()
                .unwrap_or_else(|| "the model has no chat template".to_owned()),
        )
        .with_code("chat_template_missing")
    })
}
