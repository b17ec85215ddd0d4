//! What chat and legacy completions share: validating sampling fields, merging
//! them with the model's defaults into an engine request, and reading the
//! engine's events back.

use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use engine::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, SamplingParams,
    TokenId, TokenLogprob, Usage,
};
use futures_util::Stream;
use std::time::Instant;

use std::sync::Arc;

use crate::metrics::{Metrics, TokenTimer};
use crate::models::ModelEntry;

use super::error::ApiError;
use super::types::{SamplingFields, StopField};
use super::AppState;
use crate::config::GenerationDefaults;

/// Most stop strings a request may give.
const MAX_STOPS: usize = 16;
/// Most alternatives per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most choices per prompt, before the model's own parallel limit applies.
const MAX_CHOICES: u32 = 64;

/// The text-generating model a request names; embedding and reranker models
/// are the client's mistake.
pub fn text_model(state: &AppState, name: &str) -> Result<Arc<ModelEntry>, ApiError> {
    let entry = state.registry.resolve(name)?;
    if entry.kind != engine::ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!(
                "'{}' is a {} model and cannot generate text",
                entry.id,
                entry.kind.as_str()
            ),
        ));
    }
    Ok(entry)
}

/// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
pub fn include_usage(f: &SamplingFields) -> bool {
    f.stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

pub fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Clients that would rather be told "loading, retry" than wait say so with
/// `x-wait-for-model: false`.
pub fn wants_to_wait(headers: &HeaderMap) -> bool {
    headers
        .get("x-wait-for-model")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "0" | "no"))
}

fn check_range(param: &str, value: Option<f32>, min: f32, max: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) || v.is_nan() => Err(ApiError::invalid(
            param,
            format!("{param} must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Range checks and the features this server does not offer yet. Every error names its field.
pub fn validate(f: &SamplingFields) -> Result<(), ApiError> {
    check_range("temperature", f.temperature, 0.0, 2.0)?;
    check_range("top_p", f.top_p, 0.0, 1.0)?;
    check_range("min_p", f.min_p, 0.0, 1.0)?;
    check_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    check_range("repeat_penalty", f.repeat_penalty, 0.0, 10.0)?;
    if f.top_k.is_some_and(|k| k < 0) {
        return Err(ApiError::invalid(
            "top_k",
            "top_k must be 0 (disabled) or positive",
        ));
    }
    for (param, value) in [
        ("max_tokens", f.max_tokens),
        ("max_completion_tokens", f.max_completion_tokens),
    ] {
        if value == Some(0) {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
    }
    if let Some(n) = f.n {
        if n == 0 || n > MAX_CHOICES {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES} (and at most the model's parallel sequences)"),
            ));
        }
    }
    if f.repeat_penalty.is_some_and(|p| p <= 0.0) {
        return Err(ApiError::invalid(
            "repeat_penalty",
            "repeat_penalty must be greater than 0 (1 disables it)",
        ));
    }
    if f.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    if let Some(biases) = &f.logit_bias {
        for (key, bias) in biases {
            if key.parse::<TokenId>().is_err() {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys must be token ids, got {key:?}"),
                ));
            }
            check_range("logit_bias", Some(*bias), -100.0, 100.0)?;
        }
    }
    stops(f).map(|_| ())
}

fn stops(f: &SamplingFields) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match &f.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop sequences are allowed"),
        ));
    }
    Ok(stops)
}

/// Merges request fields with the model's defaults (the request wins) and checks
/// the prompt against the context.
pub fn build_request(
    f: &SamplingFields,
    defaults: &GenerationDefaults,
    engine: &Engine,
    prompt: Vec<TokenId>,
    logprobs: Option<u32>,
) -> Result<GenerateRequest, ApiError> {
    let n_ctx = engine.info().n_ctx;
    let n_vocab = engine.info().n_vocab;
    if let Some(bad) = f.logit_bias.iter().flatten().map(|(k, _)| k).find(|k| {
        k.parse::<TokenId>()
            .map_or(true, |t| t < 0 || t as u32 >= n_vocab)
    }) {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "logit_bias key {bad} is not a token id of this model (vocabulary size {n_vocab})"
            ),
        ));
    }
    let prompt_len = prompt.len() as u32;
    let explicit = f.max_completion_tokens.or(f.max_tokens);
    if let Some(max) = explicit {
        if prompt_len.saturating_add(max) > n_ctx {
            return Err(EngineError::ContextLengthExceeded {
                n_ctx,
                requested: prompt_len.saturating_add(max),
                prompt: prompt_len,
                completion: max,
            }
            .into());
        }
    }
    let sampling = SamplingParams {
        temperature: f.temperature.unwrap_or(defaults.temperature),
        top_p: f.top_p.unwrap_or(defaults.top_p),
        top_k: f.top_k.unwrap_or(defaults.top_k),
        min_p: f.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: f.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        // Seeds are 64-bit on the wire and 32-bit in llama.cpp: fold, never reject.
        seed: f.seed.map(|s| (s as u64 ^ ((s as u64) >> 32)) as u32),
        logit_bias: f
            .logit_bias
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.parse().ok()?, *v)))
            .collect(),
        ..SamplingParams::default()
    };
    Ok(GenerateRequest {
        prompt,
        max_tokens: explicit
            .unwrap_or(defaults.max_tokens)
            .min(n_ctx.saturating_sub(prompt_len).max(1)),
        stop: stops(f)?,
        sampling,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        constraint: None,
        special_text: false,
        span: tracing::Span::current(),
    })
}

/// One choice's generation, started: its first event is already in hand, so an
/// error before any output can still be answered with a proper HTTP status.
pub struct Choice {
    pub index: u32,
    first: Option<Event>,
    stream: EventStream,
    timer: TokenTimer,
}

/// Waits for every choice's first event; any error there fails the request.
/// Text events are timed for the model's latency metrics from `started`.
pub async fn start(
    streams: Vec<EventStream>,
    metrics: &Metrics,
    model: &str,
    started: Instant,
) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(streams.len());
    for (index, mut stream) in streams.into_iter().enumerate() {
        match stream.recv().await {
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(EngineError::ShutDown.into()),
            first => choices.push(Choice {
                index: index as u32,
                first,
                stream,
                timer: metrics.token_timer(model, started),
            }),
        }
    }
    Ok(choices)
}

impl Choice {
    pub async fn next(&mut self) -> Option<Event> {
        let event = match self.first.take() {
            Some(event) => Some(event),
            None => self.stream.recv().await,
        };
        if let Some(Event::Text { .. }) = &event {
            self.timer.text();
        }
        event
    }
}

/// A whole generation, read to its end.
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

pub async fn collect(mut choice: Choice) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = choice.next().await {
        match event {
            Event::Text {
                text: t,
                logprobs: l,
            } => {
                text.push_str(&t);
                logprobs.extend(l);
            }
            Event::Done {
                finish_reason,
                usage,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    finish_reason,
                    usage,
                })
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(EngineError::ShutDown.into())
}

pub async fn collect_all(choices: Vec<Choice>) -> Result<Vec<Collected>, ApiError> {
    futures_util::future::join_all(choices.into_iter().map(collect))
        .await
        .into_iter()
        .collect()
}

/// All choices' events as one stream of `(choice index, event)`, interleaved as they come.
pub fn merge(choices: Vec<Choice>) -> impl Stream<Item = (u32, Event)> + Send {
    futures_util::stream::select_all(choices.into_iter().map(|mut choice| {
        Box::pin(async_stream::stream! {
            while let Some(event) = choice.next().await {
                let last = !matches!(event, Event::Text { .. });
                yield (choice.index, event);
                if last {
                    break;
                }
            }
        })
    }))
}

/// Usage of a request with several choices per prompt: each prompt counts once
/// (as OpenAI counts it), completions add up. `usages` are in choice order.
pub fn total_usage(usages: &[Usage], choices_per_prompt: usize) -> Usage {
    let mut total = Usage::default();
    for (i, u) in usages.iter().enumerate() {
        if i % choices_per_prompt.max(1) == 0 {
            total.prompt_tokens += u.prompt_tokens;
            total.cached_tokens += u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
    }
    total
}

/// Serializes a wire value (they always serialize).
pub fn wire_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types always serialize")
}

/// OpenAI's chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(logprobs: &[TokenLogprob]) -> serde_json::Value {
    let entry = |token: &str, bytes: &[u8], logprob: f32| serde_json::json!({"token": token, "logprob": logprob, "bytes": bytes});
    let content: Vec<serde_json::Value> = logprobs
        .iter()
        .map(|l| {
            let mut e = entry(&l.token, &l.bytes, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(t, b, p)| entry(t, b, *p)).collect();
            e
        })
        .collect();
    serde_json::json!({"content": content, "refusal": null})
}

/// OpenAI's legacy completion logprobs: parallel arrays, offsets into the choice's text.
pub fn completion_logprobs(logprobs: &[TokenLogprob], start_offset: usize) -> serde_json::Value {
    let mut offset = start_offset;
    let mut offsets = Vec::with_capacity(logprobs.len());
    for l in logprobs {
        offsets.push(offset);
        offset += l.token.len();
    }
    serde_json::json!({
        "tokens": logprobs.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": logprobs.iter().map(|l| {
            l.top.iter().map(|(t, _, p)| (t.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Wraps a stream of JSON payloads as OpenAI-style SSE, closed by `data: [DONE]`.
pub fn sse<S>(payloads: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    use futures_util::StreamExt;
    let events = payloads
        .chain(futures_util::stream::once(async { "[DONE]".to_owned() }))
        .map(|data| Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)));
    Sse::new(events).into_response()
}

/// An error after the stream started: one `data: {"error": ...}` event.
pub fn sse_error(error: EngineError) -> String {
    ApiError::from(error).body().to_string()
}

pub fn log_done(metrics: &Metrics, model: &str, endpoint: &str, usage: &Usage, started: Instant) {
    metrics.observe_usage(model, usage);
    // The one line per generation: request id (from the span), model, tokens, latency.
    tracing::info!(
        model,
        endpoint,
        status = 200,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens,
        latency_ms = started.elapsed().as_millis() as u64,
        "generation finished"
    );
}
