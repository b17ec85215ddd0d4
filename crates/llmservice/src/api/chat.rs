//! `POST /v1/chat/completions`.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::chat::{
    normalize_messages, ChatTemplate, ParsedOutput, RenderInput, StreamDelta, ToolCallFormat,
    ToolCallStream,
};
use engine::Event;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::cached;
use super::error::ApiError;
use super::functions;
use super::generate::{
    self, build_request, finish_reason_str, new_id, now_unix, sse, sse_error, wire_json,
};
use super::json::Json;
use super::tools::{self, ToolChoice, ToolPlan};
use super::types::*;
use super::AppState;

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest, responses((status = 200, description = "A completion, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending with `data: [DONE]`", body = ChatCompletion), (status = 400, description = "Bad parameters, a schema or grammar that cannot be compiled, or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    generate::validate(&req.sampling)?;
    let messages = prepare_messages(&req.messages)?;
    let plan = tools::plan(&req)?;
    let output = tools::output_constraint(&req)?;
    let tools_active = plan.as_ref().is_some_and(ToolPlan::active);
    if output.is_some() && tools_active {
        return Err(ApiError::unsupported(
            if req.grammar.is_some() {
                "grammar"
            } else {
                "response_format"
            },
            "a response_format or grammar cannot be combined with tools the model may call; \
             send tool_choice \"none\" or leave the tools out",
        ));
    }
    let builtins = plan
        .as_ref()
        .is_some_and(|p| p.execute_builtins && p.active());
    let n = req.sampling.n.unwrap_or(1);
    if builtins && n > 1 {
        return Err(ApiError::invalid(
            "n",
            "execute_builtin_functions runs one conversation: n must be 1",
        ));
    }

    let entry = generate::text_model(&state, &req.model)?;
    let stream = req.sampling.stream.unwrap_or(false);
    let include_usage = generate::include_usage(&req.sampling);
    // Built-in functions read the clock: their answers are never reused.
    let cache_key = (!builtins)
        .then(|| {
            cached::key_for(
                &state.cache,
                "chat",
                &entry,
                &req.sampling,
                &entry.defaults,
                // The key sorts object keys; schemas go in as text because
                // their property order is what the model writes (and sees).
                json!({
                    "messages": messages,
                    "chat_template_kwargs": req.chat_template_kwargs,
                    "tools": plan.as_ref().map(|p| (Value::Array(p.template_tools()).to_string(), format!("{:?}", p.choice), p.parallel, p.legacy)),
                    "response_format": req.response_format.as_ref().map(Value::to_string),
                    "grammar": req.grammar,
                }),
            )
        })
        .flatten();
    let hit = cached::answer(
        &state.cache,
        cache_key.as_ref(),
        &req.model,
        true,
        stream,
        include_usage,
    );
    if let Some(response) = hit.await {
        return Ok(response);
    }
    let engine = state
        .registry
        .engine(&entry, generate::wants_to_wait(&headers))
        .await?;
    let info = engine.info();
    let template = info.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "model",
            info.chat_template_error
                .clone()
                .unwrap_or_else(|| "the model has no chat template".to_owned()),
        )
        .with_code("chat_template_missing")
    })?;
    let format = template.tool_call_format();
    let compiled = match (&output, &plan) {
        (Some(c), _) => {
            let param = if req.grammar.is_some() {
                "grammar"
            } else {
                "response_format"
            };
            Some(compile(&engine, c.clone(), param).await?)
        }
        (None, Some(p)) if p.forced() => {
            let calls = tools::call_constraint(p, format, &|t| engine.control_token(t));
            let param = if p.legacy { "functions" } else { "tools" };
            Some(compile(&engine, calls, param).await?)
        }
        // Free to answer, but a call the model opens is made valid.
        (None, Some(p)) if p.active() => triggered_calls(&engine, p, format).await,
        _ => None,
    };
    let job = Job {
        template,
        extra: req.chat_template_kwargs.as_ref(),
    };
    let logprobs = chat_logprobs_request(&req.sampling)?;
    let id = new_id("chatcmpl");
    let created = now_unix();
    let model = req.model.clone();
    let with_logprobs = logprobs.is_some();
    // One choice's chunk of a stream.
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |index: u32,
              delta: ChatDelta,
              logprobs: Option<Value>,
              finish: Option<&'static str>| {
            ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices: vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason: finish,
                }],
                system_fingerprint: None,
                usage: include_usage.then_some(None),
            }
        }
    };

    if builtins {
        let plan = plan.expect("builtins come with a plan");
        let legacy = plan.legacy;
        let mut rounds = Box::pin(builtin_rounds(
            Rounds {
                metrics: state.metrics.clone(),
                entry_id: entry.id.clone(),
                defaults: entry.defaults.clone(),
                engine: engine.clone(),
                format,
                plan,
                extra: req.chat_template_kwargs.clone(),
                sampling: req.sampling.clone(),
                logprobs,
                started,
            },
            messages,
            compiled,
        ));
        // An error before anything was said is still an HTTP status.
        let first = match rounds.next().await {
            Some(Err(error)) => return Err(error),
            first => first,
        };
        if !stream {
            let mut output = ParsedOutput::default();
            let mut all_logprobs = Vec::new();
            let mut next = first;
            let (finish, usage) = loop {
                match next {
                    Some(Ok(RoundEvent::Delta(delta, logprobs))) => {
                        all_logprobs.extend(logprobs);
                        stream_delta(&mut output, delta, legacy);
                    }
                    Some(Ok(RoundEvent::Done(finish, usage))) => break (finish, usage),
                    Some(Err(error)) => return Err(error),
                    None => return Err(engine::EngineError::ShutDown.into()),
                }
                next = rounds.next().await;
            };
            generate::log_done(&state.metrics, &entry.id, "chat", &usage, started);
            let finish = finish_str(finish, &output, legacy);
            let mut choice = message_choice(0, output, legacy, finish);
            choice.logprobs = with_logprobs.then(|| generate::chat_logprobs(&all_logprobs));
            let completion = ChatCompletion {
                id,
                object: "chat.completion",
                created,
                model,
                choices: vec![choice],
                usage: usage.into(),
                system_fingerprint: None,
            };
            return Ok(cached::mark(axum::Json(completion).into_response(), false));
        }
        let (metrics, entry_id) = (state.metrics.clone(), entry.id.clone());
        let payloads = async_stream::stream! {
            let first_delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
            yield wire_json(&chunk(0, first_delta, None, None));
            let mut output = ParsedOutput::default();
            let mut pending_logprobs = Vec::new();
            let mut next = first;
            loop {
                match next {
                    Some(Ok(RoundEvent::Delta(delta, logprobs))) => {
                        pending_logprobs.extend(logprobs);
                        if let Some(delta) = stream_delta(&mut output, delta, legacy) {
                            let wire = with_logprobs.then(|| generate::chat_logprobs(&std::mem::take(&mut pending_logprobs)));
                            yield wire_json(&chunk(0, delta, wire, None));
                        }
                    }
                    Some(Ok(RoundEvent::Done(finish, usage))) => {
                        let finish = finish_str(finish, &output, legacy);
                        yield wire_json(&chunk(0, ChatDelta::default(), None, Some(finish)));
                        if include_usage {
                            yield wire_json(&usage_chunk(chunk(0, ChatDelta::default(), None, None), usage));
                        }
                        generate::log_done(&metrics, &entry_id, "chat", &usage, started);
                        break;
                    }
                    Some(Err(error)) => {
                        yield error.body().to_string();
                        break;
                    }
                    None => {
                        yield sse_error(engine::EngineError::ShutDown);
                        break;
                    }
                }
                next = rounds.next().await;
            }
        };
        return Ok(cached::mark(sse(payloads), false));
    }

    let tokens = job.prompt(&engine, &messages, plan.as_ref())?;
    let mut request = build_request(&req.sampling, &entry.defaults, &engine, tokens, logprobs)?;
    request.constraint = compiled;
    request.special_text = tools_active;
    let choices = generate::start(
        engine.submit_n(request, n)?,
        &state.metrics,
        &entry.id,
        started,
    )
    .await?;

    let plan = plan.filter(ToolPlan::active);
    if !stream {
        let done = generate::collect_all(choices).await?;
        let usages: Vec<_> = done.iter().map(|d| d.usage).collect();
        let usage = generate::total_usage(&usages, n as usize);
        generate::log_done(&state.metrics, &entry.id, "chat", &usage, started);
        let completion = ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: done
                .iter()
                .enumerate()
                .map(|(index, d)| {
                    let parsed = parse_output(plan.as_ref(), format, &d.text);
                    choice_of(index as u32, parsed, plan.as_ref(), d, with_logprobs)
                })
                .collect(),
            usage: usage.into(),
            system_fingerprint: None,
        };
        let body = serde_json::to_value(&completion).expect("wire types always serialize");
        if let Some(key) = cache_key {
            cached::store(&state.cache, key, body.clone());
        }
        return Ok(cached::mark(axum::Json(body).into_response(), false));
    }

    // What a cache entry for this stream will hold once it ends.
    let record = cache_key.map(|key| (key, state.cache.clone(), id.clone(), model.clone()));
    let entry_id = entry.id.clone();
    let metrics = state.metrics.clone();
    let mut events = Box::pin(generate::merge(choices));
    let legacy = plan.as_ref().is_some_and(|p| p.legacy);
    let payloads = async_stream::stream! {
        for index in 0..n {
            let first = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
            yield wire_json(&chunk(index, first, None, None));
        }
        let mut usages = vec![engine::Usage::default(); n as usize];
        let mut parsers: Vec<Option<ToolCallStream>> =
            (0..n).map(|_| plan.as_ref().map(|_| ToolCallStream::new(format))).collect();
        let mut outputs = vec![ParsedOutput::default(); n as usize];
        let mut all_logprobs = vec![Vec::new(); n as usize];
        let mut pending_logprobs = vec![Vec::new(); n as usize];
        let mut finishes = vec!["stop"; n as usize];
        let mut remaining = n;
        while let Some((index, event)) = events.next().await {
            let i = index as usize;
            match event {
                Event::Text { text, logprobs } => {
                    all_logprobs[i].extend(logprobs.iter().cloned());
                    pending_logprobs[i].extend(logprobs);
                    let deltas = match &mut parsers[i] {
                        Some(parser) => parser.push(&text),
                        None => vec![StreamDelta::Content(text)],
                    };
                    for delta in deltas {
                        if let Some(delta) = stream_delta(&mut outputs[i], delta, legacy) {
                            let wire = with_logprobs.then(|| generate::chat_logprobs(&std::mem::take(&mut pending_logprobs[i])));
                            yield wire_json(&chunk(index, delta, wire, None));
                        }
                    }
                }
                Event::Done { finish_reason, usage } => {
                    let mut deltas = parsers[i].as_mut().map(ToolCallStream::finish).unwrap_or_default();
                    // Tokens the parser took without a delta (a closing tag)
                    // still send their logprobs.
                    if with_logprobs && !pending_logprobs[i].is_empty() {
                        deltas.push(StreamDelta::Content(String::new()));
                    }
                    for delta in deltas {
                        if let Some(delta) = stream_delta(&mut outputs[i], delta, legacy) {
                            let wire = with_logprobs.then(|| generate::chat_logprobs(&std::mem::take(&mut pending_logprobs[i])));
                            yield wire_json(&chunk(index, delta, wire, None));
                        }
                    }
                    finishes[i] = finish_str(finish_reason, &outputs[i], legacy);
                    yield wire_json(&chunk(index, ChatDelta::default(), None, Some(finishes[i])));
                    usages[i] = usage;
                    remaining -= 1;
                    if remaining == 0 {
                        let usage = generate::total_usage(&usages, n as usize);
                        if let Some((key, cache, id, model)) = &record {
                            let whole = ChatCompletion {
                                id: id.clone(),
                                object: "chat.completion",
                                created,
                                model: model.clone(),
                                choices: (0..n as usize).map(|c| {
                                    let mut choice = message_choice(c as u32, std::mem::take(&mut outputs[c]), legacy, finishes[c]);
                                    choice.logprobs = with_logprobs.then(|| generate::chat_logprobs(&all_logprobs[c]));
                                    choice
                                }).collect(),
                                usage: usage.into(),
                                system_fingerprint: None,
                            };
                            let body = serde_json::to_value(&whole).expect("wire types always serialize");
                            cached::store(cache, key.clone(), body);
                        }
                        if include_usage {
                            yield wire_json(&usage_chunk(chunk(0, ChatDelta::default(), None, None), usage));
                        }
                        generate::log_done(&metrics, &entry_id, "chat", &usage, started);
                        break;
                    }
                }
                Event::Error(error) => {
                    yield sse_error(error);
                    remaining = 0;
                    break;
                }
            }
        }
        if remaining > 0 {
            // The engine went away without finishing every choice.
            yield sse_error(engine::EngineError::ShutDown);
        }
    };
    Ok(cached::mark(sse(payloads), false))
}

/// The stream's last chunk when usage was asked for: no choices, the usage.
fn usage_chunk(mut chunk: ChatCompletionChunk, usage: engine::Usage) -> ChatCompletionChunk {
    chunk.choices.clear();
    chunk.usage = Some(Some(usage.into()));
    chunk
}

/// Most rounds a request with built-in functions runs before answering with
/// whatever the model said last.
const MAX_BUILTIN_ROUNDS: usize = 5;

/// What rendering a conversation needs besides its messages.
struct Job<'a> {
    template: &'a ChatTemplate,
    extra: Option<&'a serde_json::Map<String, Value>>,
}

impl Job<'_> {
    /// The prompt tokens for `messages`, tools shown the way the template can.
    fn prompt(
        &self,
        engine: &engine::Engine,
        messages: &[Value],
        plan: Option<&ToolPlan>,
    ) -> Result<Vec<engine::TokenId>, ApiError> {
        let plan = plan.filter(|p| p.active());
        let tools = plan.map(ToolPlan::template_tools);
        let mut messages = messages.to_vec();
        let show_tools = self.template.supports_tools();
        if !show_tools {
            tools::adapt_for_generic(&mut messages, plan);
        }
        let prompt = self
            .template
            .render(&RenderInput {
                messages: &messages,
                tools: tools.as_deref().filter(|_| show_tools),
                add_generation_prompt: true,
                extra: self.extra,
            })
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        Ok(engine.tokenize_chat_prompt(&prompt))
    }
}

/// What the built-in rounds need that outlives the handler.
struct Rounds {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    entry_id: String,
    defaults: crate::config::GenerationDefaults,
    engine: std::sync::Arc<engine::Engine>,
    format: ToolCallFormat,
    plan: ToolPlan,
    extra: Option<serde_json::Map<String, Value>>,
    sampling: SamplingFields,
    logprobs: Option<u32>,
    started: Instant,
}

/// What the built-in rounds show the client, in order.
enum RoundEvent {
    /// Content as it is generated, or a call of the last round, with the
    /// logprobs of the tokens generated since the previous event.
    Delta(StreamDelta, Vec<engine::TokenLogprob>),
    /// The last round's finish reason and the usage of every round.
    Done(engine::FinishReason, engine::Usage),
}

/// Generates, runs the built-in functions the model calls, appends their
/// results and generates again, until the model answers (or calls something
/// the client must run). Content streams out as it is generated in every
/// round (rounds after the first are set off by a blank line); calls are held
/// to the end of their round, and only the last round's reach the client.
fn builtin_rounds(
    r: Rounds,
    mut messages: Vec<Value>,
    mut compiled: Option<engine::CompiledConstraint>,
) -> impl futures_util::Stream<Item = Result<RoundEvent, ApiError>> + Send {
    async_stream::stream! {
        let Rounds { metrics, entry_id, defaults, engine, format, mut plan, extra, sampling, logprobs, started } = r;
        let info = engine.info();
        let Some(template) = info.chat_template.as_ref() else {
            yield Err(ApiError::invalid("model", "the model has no chat template"));
            return;
        };
        let mut total = engine::Usage::default();
        let mut pending_logprobs = Vec::new();
        let mut said = false;
        for round in 0..MAX_BUILTIN_ROUNDS {
            let job = Job { template, extra: extra.as_ref() };
            if round > 0 {
                // Later rounds answer freely, but a call they open is made valid.
                compiled = triggered_calls(&engine, &plan, format).await;
            }
            let submitted = job
                .prompt(&engine, &messages, Some(&plan))
                .and_then(|tokens| build_request(&sampling, &defaults, &engine, tokens, logprobs))
                .and_then(|mut request| {
                    request.constraint = compiled.take();
                    request.special_text = true;
                    Ok(engine.submit_n(request, 1)?)
                });
            let started_round = match submitted {
                Ok(streams) => generate::start(streams, &metrics, &entry_id, started).await,
                Err(error) => Err(error),
            };
            let mut choice = match started_round {
                Ok(mut choices) => choices.remove(0),
                Err(error) => {
                    yield Err(error);
                    return;
                }
            };
            let mut parser = ToolCallStream::new(format);
            let mut content = String::new();
            let mut held = Vec::new();
            let mut set_off = said;
            let finish = loop {
                let (deltas, finish) = match choice.next().await {
                    Some(Event::Text { text, logprobs }) => {
                        pending_logprobs.extend(logprobs);
                        (parser.push(&text), None)
                    }
                    Some(Event::Done { finish_reason, usage }) => {
                        total.prompt_tokens += usage.prompt_tokens;
                        total.completion_tokens += usage.completion_tokens;
                        total.cached_tokens += usage.cached_tokens;
                        (parser.finish(), Some(finish_reason))
                    }
                    Some(Event::Error(error)) => {
                        yield Err(error.into());
                        return;
                    }
                    None => {
                        yield Err(engine::EngineError::ShutDown.into());
                        return;
                    }
                };
                for delta in deltas {
                    match delta {
                        StreamDelta::Content(text) => {
                            content.push_str(&text);
                            let text = if std::mem::take(&mut set_off) { format!("\n\n{text}") } else { text };
                            said = true;
                            yield Ok(RoundEvent::Delta(StreamDelta::Content(text), std::mem::take(&mut pending_logprobs)));
                        }
                        call => held.push(call),
                    }
                }
                if let Some(finish) = finish {
                    break finish;
                }
            };
            let calls = calls_of(&held);
            let runnable = !calls.is_empty()
                && round + 1 < MAX_BUILTIN_ROUNDS
                && calls.iter().all(|c| plan.builtin(&c.name).is_some());
            if !runnable {
                for delta in held {
                    yield Ok(RoundEvent::Delta(delta, std::mem::take(&mut pending_logprobs)));
                }
                if !pending_logprobs.is_empty() {
                    yield Ok(RoundEvent::Delta(StreamDelta::Content(String::new()), std::mem::take(&mut pending_logprobs)));
                }
                yield Ok(RoundEvent::Done(finish, total));
                return;
            }
            tracing::debug!(round, calls = calls.len(), "running built-in functions");
            messages.push(json!({
                "role": "assistant",
                "content": content,
                "tool_calls": calls.iter().map(tools::wire_call).collect::<Vec<_>>(),
            }));
            for call in &calls {
                let builtin = plan.builtin(&call.name).expect("checked above");
                let result = functions::execute(builtin, &call.arguments);
                messages.push(json!({
                    "role": "tool",
                    "tool_call_id": call.id,
                    "name": call.name,
                    "content": result.to_string(),
                }));
            }
            normalize_messages(&mut messages);
            // The call the client insisted on has been made: now the model answers.
            if plan.forced() {
                plan.choice = ToolChoice::Auto;
            }
        }
    }
}

/// Compiles what the request asked for; one that cannot be compiled is the
/// client's 400, naming `param`.
async fn compile(
    engine: &std::sync::Arc<engine::Engine>,
    constraint: engine::Constraint,
    param: &str,
) -> Result<engine::CompiledConstraint, ApiError> {
    let compiler = engine.clone();
    tokio::task::spawn_blocking(move || compiler.compile_constraint(&constraint))
        .await
        .map_err(|e| ApiError::internal(format!("grammar compiler failed: {e}")))?
        .map_err(|e| {
            let mut error = ApiError::from(e);
            if error.status.is_client_error() {
                error.param = Some(param.to_owned());
                error.message = format!("{param} cannot be used: {}", error.message);
            }
            error
        })
}

/// The compiled grammar that makes a call the model opens valid, if the
/// model's syntax has a marker to wait for and the tools compile.
async fn triggered_calls(
    engine: &std::sync::Arc<engine::Engine>,
    plan: &ToolPlan,
    format: ToolCallFormat,
) -> Option<engine::CompiledConstraint> {
    let constraint = tools::triggered_call_constraint(plan, format, &|t| engine.control_token(t))?;
    let compiler = engine.clone();
    tokio::task::spawn_blocking(move || compiler.compile_constraint(&constraint))
        .await
        .ok()?
        .ok()
}

/// The calls a round's held deltas spell out.
fn calls_of(deltas: &[StreamDelta]) -> Vec<engine::chat::ToolCall> {
    let mut output = ParsedOutput::default();
    for delta in deltas {
        stream_delta(&mut output, delta.clone(), false);
    }
    output.tool_calls
}

/// The output split into content and calls, when tools were offered.
fn parse_output(plan: Option<&ToolPlan>, format: ToolCallFormat, text: &str) -> ParsedOutput {
    match plan.filter(|p| p.active()) {
        Some(_) => engine::chat::parse(format, text),
        None => ParsedOutput {
            content: text.to_owned(),
            tool_calls: Vec::new(),
        },
    }
}

fn finish_str(reason: engine::FinishReason, output: &ParsedOutput, legacy: bool) -> &'static str {
    // A cut-off answer says so even when calls were read before the cut: the
    // text after them may be a call that never closed.
    if reason == engine::FinishReason::Length {
        return finish_reason_str(reason);
    }
    match (output.tool_calls.is_empty(), legacy) {
        (true, _) => finish_reason_str(reason),
        (false, false) => "tool_calls",
        (false, true) => "function_call",
    }
}

/// The assistant message for a parsed output: calls as `tool_calls`, or as
/// the legacy `function_call` (the first call) for `functions` requests.
fn message_choice(
    index: u32,
    output: ParsedOutput,
    legacy: bool,
    finish_reason: &'static str,
) -> ChatChoice {
    let has_calls = !output.tool_calls.is_empty();
    let content = if has_calls && output.content.trim().is_empty() {
        None
    } else {
        Some(output.content)
    };
    let (tool_calls, function_call) = match (has_calls, legacy) {
        (false, _) => (None, None),
        (true, false) => (
            Some(output.tool_calls.iter().map(tools::wire_call).collect()),
            None,
        ),
        (true, true) => {
            let first = &output.tool_calls[0];
            (
                None,
                Some(json!({"name": first.name, "arguments": first.arguments})),
            )
        }
    };
    ChatChoice {
        index,
        message: ChatMessage {
            role: "assistant",
            content,
            tool_calls,
            function_call,
        },
        logprobs: None,
        finish_reason,
    }
}

fn choice_of(
    index: u32,
    parsed: ParsedOutput,
    plan: Option<&ToolPlan>,
    done: &generate::Collected,
    with_logprobs: bool,
) -> ChatChoice {
    let legacy = plan.is_some_and(|p| p.legacy);
    let finish = finish_str(done.finish_reason, &parsed, legacy);
    let mut choice = message_choice(index, parsed, legacy, finish);
    choice.logprobs = with_logprobs.then(|| generate::chat_logprobs(&done.logprobs));
    choice
}

/// One parser delta as a chunk's delta, recorded into `output` too.
fn stream_delta(output: &mut ParsedOutput, delta: StreamDelta, legacy: bool) -> Option<ChatDelta> {
    let delta = match delta {
        StreamDelta::Content(text) => {
            output.content.push_str(&text);
            ChatDelta {
                content: Some(text),
                ..Default::default()
            }
        }
        StreamDelta::ToolCallStart { index, id, name } => {
            output.tool_calls.push(engine::chat::ToolCall {
                id: id.clone(),
                name: name.clone(),
                arguments: String::new(),
            });
            if legacy {
                // The legacy shape holds one call: later ones are not sent.
                return (index == 0).then(|| ChatDelta {
                    function_call: Some(json!({"name": name, "arguments": ""})),
                    ..Default::default()
                });
            }
            ChatDelta {
                tool_calls: Some(vec![json!({
                    "index": index,
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                })]),
                ..Default::default()
            }
        }
        StreamDelta::ToolCallArguments { index, fragment } => {
            if let Some(call) = output.tool_calls.get_mut(index) {
                call.arguments.push_str(&fragment);
            }
            if legacy {
                return (index == 0).then(|| ChatDelta {
                    function_call: Some(json!({"arguments": fragment})),
                    ..Default::default()
                });
            }
            ChatDelta {
                tool_calls: Some(vec![json!({
                    "index": index,
                    "function": {"arguments": fragment},
                })]),
                ..Default::default()
            }
        }
    };
    Some(delta)
}

/// Chat asks with `logprobs: true` and `top_logprobs: k`.
fn chat_logprobs_request(f: &SamplingFields) -> Result<Option<u32>, ApiError> {
    match &f.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {
            if f.top_logprobs.is_some_and(|k| k > 0) {
                return Err(ApiError::invalid(
                    "logprobs",
                    "top_logprobs requires logprobs: true",
                ));
            }
            Ok(None)
        }
        Some(Value::Bool(true)) => Ok(Some(f.top_logprobs.unwrap_or(0))),
        Some(_) => Err(ApiError::invalid(
            "logprobs",
            "logprobs must be true or false",
        )),
    }
}

/// Checks the history's shape and turns it into what chat templates expect:
/// text-only content, `developer` as `system`, tool-call arguments as objects.
pub(super) fn prepare_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let Some(object) = message.as_object() else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                "each message must be an object",
            ));
        };
        let role = object
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !ROLES.contains(&role) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "unknown role {role:?}; expected one of {}",
                    ROLES.join(", ")
                ),
            ));
        }
        let mut object = object.clone();
        if role == "developer" {
            object.insert("role".into(), "system".into());
        }
        let param = || format!("messages[{i}].content");
        let content = match object.get("content") {
            None | Some(Value::Null) => {
                let has_calls = object.get("tool_calls").is_some_and(|c| !c.is_null())
                    || object.get("function_call").is_some_and(|c| !c.is_null());
                if role == "assistant" && has_calls {
                    Value::Null
                } else {
                    return Err(ApiError::invalid(
                        &param(),
                        "content is required for this message",
                    ));
                }
            }
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                Value::String(text_of_parts(parts).map_err(|m| ApiError::invalid(&param(), m))?)
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    &param(),
                    "content must be a string or an array of content parts",
                ))
            }
        };
        object.insert("content".into(), content);
        out.push(Value::Object(object));
    }
    tools::check_history(&out)?;
    tools::legacy_history_as_tools(&mut out);
    normalize_messages(&mut out);
    Ok(out)
}

fn text_of_parts(parts: &[Value]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t),
                None => return Err("a text content part needs a string `text`".to_owned()),
            },
            Some(other) => {
                return Err(format!(
                "content parts of type {other:?} are not supported: this server takes text only"
            ))
            }
            None => return Err("each content part needs a `type`".to_owned()),
        }
    }
    Ok(texts.join("\n"))
}
