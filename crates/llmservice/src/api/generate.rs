//! What chat and legacy completions share: validating sampling fields, merging
//! them with the model's defaults into an engine request, and reading the
//! engine's events back.

use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use engine::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, SamplingParams,
    TokenId, Usage,
};
use futures_util::Stream;

use super::error::ApiError;
use super::types::{SamplingFields, StopField};
use crate::config::GenerationDefaults;

/// Most stop strings a request may give.
const MAX_STOPS: usize = 16;

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
        if n == 0 {
            return Err(ApiError::invalid("n", "n must be at least 1"));
        }
        if n > 1 {
            return Err(ApiError::unsupported(
                "n",
                "n > 1 is not supported yet; send separate requests",
            ));
        }
    }
    let wants_logprobs = match &f.logprobs {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::Number(n)) => n.as_u64() != Some(0),
        Some(_) => true,
    };
    if wants_logprobs || f.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported(
            "logprobs",
            "logprobs are not supported yet",
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
) -> Result<GenerateRequest, ApiError> {
    let n_ctx = engine.info().n_ctx;
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
        span: tracing::Span::current(),
    })
}

/// A whole generation, read to its end.
pub struct Collected {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

pub async fn collect(mut stream: EventStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(event) = stream.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                usage,
            } => {
                return Ok(Collected {
                    text,
                    finish_reason,
                    usage,
                })
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(EngineError::ShutDown.into())
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

pub fn log_done(model: &str, endpoint: &str, usage: &Usage, started: std::time::Instant) {
    tracing::info!(
        model,
        endpoint,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens,
        latency_ms = started.elapsed().as_millis() as u64,
        "generation finished"
    );
}
