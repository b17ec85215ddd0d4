//! The chat pipeline the chat-shaped APIs share: a checked chat request run
//! on its model, as a stream of each choice's events.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use engine::chat::{ChatTemplate, ToolCallStream};
use engine::Engine;
use futures_util::{Stream, StreamExt};

use super::{text_model, wants_to_wait};
use crate::api::error::ApiError;
use crate::chat::{self, ChatJob, ChatPrompt, Rounds};
use crate::error::RequestError;
use crate::generation::{self, ChoiceEvent};
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::ChatCompletionRequest;

/// A translated chat request checked, and its model ready: the job, the
/// model's entry and its engine (the chat-shaped APIs other than chat itself,
/// which looks in the response cache before it loads a model).
pub(super) async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    chat: &ChatCompletionRequest,
) -> Result<(ChatJob, Arc<ModelEntry>, Arc<Engine>), ApiError> {
    let job = ChatJob::new(chat)?;
    let entry = text_model(state, &chat.model).await?;
    let engine = state
        .registry
        .engine(&entry, wants_to_wait(headers))
        .await?;
    Ok((job, entry, engine))
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
    engine: &Arc<Engine>,
    req: &ChatCompletionRequest,
    job: ChatJob,
    started: Instant,
) -> Result<(impl Stream<Item = Events> + Send + 'static, u32), ApiError> {
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
        return Ok((events.map(|event| (0, event)).left_stream(), 0));
    }
    let prompt = ChatPrompt {
        template,
        extra: req.chat_template_kwargs.as_ref(),
    };
    let plan = job.active_plan();
    let tokens = prompt.tokens(engine, &job.messages, plan)?;
    let prompt_tokens = tokens.len() as u32;
    let mut request =
        generation::build_request(&req.sampling, &entry.defaults, engine, tokens, job.logprobs)?;
    request.constraint = constraint;
    request.special_text = plan.is_some();
    let streams = engine.submit_n(request, job.n)?;
    let choices = generation::start(streams, &state.metrics, &entry.id, started).await?;
    let parse = plan.is_some();
    let events = generation::merge(choices, move || parse.then(|| ToolCallStream::new(format)));
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
