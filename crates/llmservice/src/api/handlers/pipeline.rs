//! The chat pipeline the chat-shaped APIs share: a checked chat request run
//! on its model, as a stream of each choice's events.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use engine::chat::{ChatTemplate, OutputParser, ReasoningStream, ToolCallStream};
use engine::Engine;
use futures_util::{Stream, StreamExt};

use super::{text_model, wants_to_wait};
use crate::api::answer::ChatAnswer;
use crate::api::error::ApiError;
use crate::api::response_cache;
use crate::cache::CacheKey;
use crate::chat::{self, ChatJob, ChatPrompt, Rounds};
use crate::error::RequestError;
use crate::generation::{self, ChoiceEvent};
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::upstream::Upstream;
use crate::wire::ChatCompletionRequest;

/// A chat request checked, and the model it names: the job and the model's
/// entry (the model is not loaded yet: a cached answer needs none).
pub(super) async fn check(
    state: &AppState,
    chat: &ChatCompletionRequest,
) -> Result<(ChatJob, Arc<ModelEntry>), ApiError> {
    let job = ChatJob::new(chat)?;
    let entry = text_model(state, &chat.model).await?;
    Ok((job, entry))
}

/// What runs a model: its engine here, or the upstream servers of an
/// `openai` tier.
pub(super) enum Runner {
    Engine(Arc<Engine>),
    Upstream(Arc<Upstream>),
}

/// The model's runner, loading its engine if need be.
pub(super) async fn load(
    state: &AppState,
    headers: &HeaderMap,
    entry: &Arc<ModelEntry>,
) -> Result<Runner, ApiError> {
    let wait = wants_to_wait(headers);
    if let Some(upstream) = state.registry.upstream(entry, wait).await? {
        return Ok(Runner::Upstream(upstream));
    }
    Ok(Runner::Engine(state.registry.engine(entry, wait).await?))
}

/// The response cache's key for a chat request, or `None` when its answer
/// must not be reused. The APIs translated onto chat use the key of the chat
/// request they stand for, so the same question shares one entry whichever
/// API asks it.
pub(super) fn cache_key(
    state: &AppState,
    entry: &ModelEntry,
    chat: &ChatCompletionRequest,
    job: &ChatJob,
) -> Option<CacheKey> {
    // Built-in functions read the clock: their answers are never reused.
    if job.builtins {
        return None;
    }
    let mut payload = job.cache_payload(chat);
    // Fields we do not read change an upstream's answer, not ours.
    if entry.upstream.is_some() && !chat.extra.is_empty() {
        payload["upstream_fields"] = chat.extra.clone().into();
    }
    response_cache::key_for(
        &state.cache,
        "chat",
        entry,
        &chat.sampling,
        &entry.defaults(),
        payload,
    )
}

/// The events that replay the cached chat answer under `key`, for an API
/// translated onto chat to answer in its own shape.
pub(super) async fn cached_events(
    state: &AppState,
    key: Option<&CacheKey>,
) -> Option<Vec<(u32, ChoiceEvent)>> {
    let body = response_cache::lookup(&state.cache, key?).await?;
    let cached = serde_json::from_value(body).ok()?;
    Some(ChatAnswer::events_of(cached))
}

/// Replayed events as the stream a generation gives.
pub(super) fn replayed(
    events: Vec<(u32, ChoiceEvent)>,
) -> impl Stream<Item = Events> + Send + 'static {
    futures_util::stream::iter(events.into_iter().map(|(index, event)| (index, Ok(event))))
}

/// The prompt's length recorded with replayed events.
pub(super) fn replayed_prompt_tokens(events: &[(u32, ChoiceEvent)]) -> u32 {
    events
        .iter()
        .find_map(|(_, event)| match event {
            ChoiceEvent::Done(_, usage) => Some(usage.prompt_tokens),
            ChoiceEvent::Delta(..) => None,
        })
        .unwrap_or(0)
}

/// One choice's event, by the choice's index.
type Events = (u32, Result<ChoiceEvent, RequestError>);

/// Every choice's events: one generation, or the built-in function rounds.
/// Errors before any output are returned here, so they keep their HTTP status.
/// With the events comes the prompt's length in tokens (0 for built-in rounds,
/// whose prompt grows round by round).
pub(super) async fn generate(
    state: &AppState,
    entry: &ModelEntry,
    runner: &Runner,
    req: &ChatCompletionRequest,
    job: ChatJob,
    started: Instant,
) -> Result<(impl Stream<Item = Events> + Send + 'static, u32), ApiError> {
    match runner {
        Runner::Engine(engine) => {
            let (events, prompt_tokens) =
                generate_here(state, entry, engine, req, job, started).await?;
            Ok((events.left_stream(), prompt_tokens))
        }
        Runner::Upstream(upstream) => {
            let events = generate_upstream(state, entry, upstream, req, &job, started).await?;
            Ok((events.right_stream(), 0))
        }
    }
}

/// The request as the upstream takes it: as the client sent it, under the
/// upstream's model name. Its prompt's length is known only at the end.
async fn generate_upstream(
    state: &AppState,
    entry: &ModelEntry,
    upstream: &Arc<Upstream>,
    req: &ChatCompletionRequest,
    job: &ChatJob,
    started: Instant,
) -> Result<impl Stream<Item = Events> + Send + 'static, ApiError> {
    if job.builtins {
        return Err(ApiError::unsupported(
            "execute_builtin_functions",
            "built-in function rounds run on models loaded here, not on an upstream tier",
        ));
    }
    let mut body = serde_json::to_value(req)
        .map_err(|e| ApiError::internal(format!("cannot forward the request: {e}")))?;
    body["model"] = upstream.model_for(&req.model).into();
    upstream.fill_sampling(&mut body);
    if let Some(map) = body.as_object_mut() {
        map.remove("execute_builtin_functions");
        map.remove("rag");
    }
    let timer = state.metrics.token_timer(&entry.id, started);
    Ok(crate::upstream::chat_events(upstream, body, job.n, timer).await?)
}

async fn generate_here(
    state: &AppState,
    entry: &ModelEntry,
    engine: &Arc<Engine>,
    req: &ChatCompletionRequest,
    job: ChatJob,
    started: Instant,
) -> Result<(impl Stream<Item = Events> + Send + 'static, u32), ApiError> {
    chat::check_text_only(req)?;
    let info = engine.info();
    let template = chat_template(info)?;
    let format = template.tool_call_format();
    let reasoning = job.splits_reasoning(template);
    let prompt = ChatPrompt {
        template,
        extra: req.chat_template_kwargs.as_ref(),
    };
    let plan = job.active_plan();
    let prompt = prompt.tokens(engine, &job.messages, plan)?;
    // A client's GBNF grammar spells the whole output, block or not.
    let gbnf = matches!(job.output, Some(engine::Constraint::Gbnf(_)));
    let open = prompt.thinking_open && !gbnf;
    // A block the prompt closed is not to be opened again.
    let thought = (reasoning && !prompt.thinking_closed).then_some(open);
    let constraint = chat::compile_for(
        engine,
        &job,
        format,
        chat::output_param(req.grammar.as_deref()),
        thought,
    )
    .await?;
    if job.builtins {
        let rounds = Rounds {
            metrics: state.metrics.clone(),
            model_id: entry.id.clone(),
            defaults: entry.defaults(),
            engine: engine.clone(),
            format,
            reasoning,
            plan: job.plan.expect("built-in rounds come with a plan"),
            extra: req.chat_template_kwargs.clone(),
            sampling: req.sampling.clone(),
            logprobs: job.logprobs,
            started,
        };
        let mut events = Box::pin(rounds.run(job.messages, prompt, constraint));
        let first = match events.next().await {
            Some(Err(error)) => return Err(error.into()),
            first => first,
        };
        let events = futures_util::stream::iter(first).chain(events);
        return Ok((events.map(|event| (0, event)).left_stream(), 0));
    }
    let prompt_tokens = prompt.tokens.len() as u32;
    let mut request = generation::build_request(
        &req.sampling,
        &entry.defaults(),
        engine,
        prompt.tokens,
        job.logprobs,
    )?;
    request.constraint = constraint;
    request.special_text = plan.is_some();
    // A forced or opened call list ends rather than start a call it cannot finish.
    request.finish_within_budget = plan.is_some();
    request.thought = reasoning.then_some(open);
    let streams = engine.submit_n(request, job.n)?;
    let choices = generation::start(streams, &state.metrics, &entry.id, started).await?;
    let parse = plan.is_some();
    let events = generation::merge(choices, move || OutputParser {
        reasoning: reasoning.then(|| ReasoningStream::new(open)),
        calls: parse.then(|| ToolCallStream::new(format)),
    });
    Ok((events.right_stream(), prompt_tokens))
}

pub(super) fn chat_template(info: &engine::ModelInfo) -> Result<&ChatTemplate, ApiError> {
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
