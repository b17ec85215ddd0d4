//! The response cache at the HTTP edge: which requests may be answered from it,
//! what identifies an answer, and how a cached answer is replayed, as JSON or as
//! the same SSE stream a fresh generation would send.

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::generate::sse;
use super::types::SamplingFields;
use crate::cache::{is_cacheable, CacheKey, CachedResponse, ResponseCache};
use crate::config::GenerationDefaults;
use crate::models::ModelEntry;

/// Header telling clients (and tests) whether the cache answered.
const CACHE_HEADER: &str = "x-llmservice-cache";

/// The key for a request, or `None` when it must not be cached (caching off,
/// or sampling that is not deterministic). `payload` is what the endpoint adds:
/// messages and template variables for chat, prompts and echo for completions.
pub fn key_for(
    cache: &ResponseCache,
    endpoint: &str,
    entry: &ModelEntry,
    f: &SamplingFields,
    defaults: &GenerationDefaults,
    payload: Value,
) -> Option<CacheKey> {
    let temperature = f.temperature.unwrap_or(defaults.temperature);
    if !cache.is_enabled() || !is_cacheable(temperature, f.seed, cache.settings().cache_all) {
        return None;
    }
    let file = file_identity(entry)?;
    Some(CacheKey::new(&json!({
        "endpoint": endpoint,
        "model": file,
        "context": entry.engine_config.n_ctx,
        "chat_template": entry.engine_config.chat_template,
        "payload": payload,
        "temperature": temperature,
        "top_p": f.top_p.unwrap_or(defaults.top_p),
        "top_k": f.top_k.unwrap_or(defaults.top_k),
        "min_p": f.min_p.unwrap_or(defaults.min_p),
        "repeat_penalty": f.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        "presence_penalty": f.presence_penalty.unwrap_or(0.0),
        "frequency_penalty": f.frequency_penalty.unwrap_or(0.0),
        "seed": f.seed,
        "logit_bias": f.logit_bias,
        "max_tokens": f.max_completion_tokens.or(f.max_tokens).unwrap_or(defaults.max_tokens),
        "stop": f.stop.as_ref().map(|s| match s {
            super::types::StopField::One(one) => vec![one.clone()],
            super::types::StopField::Many(many) => many.clone(),
        }),
        "n": f.n.unwrap_or(1),
        "logprobs": f.logprobs,
        "top_logprobs": f.top_logprobs,
        "ignore_eos": f.ignore_eos,
    })))
}

/// The model file's identity, not just its name: a replaced model must not
/// answer from the old one's cache.
fn file_identity(entry: &ModelEntry) -> Option<Value> {
    let m = std::fs::metadata(&entry.path).ok()?;
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(
        json!({"path": entry.path.display().to_string(), "len": m.len(), "modified": modified.to_string()}),
    )
}

/// The key for a deterministic request (embeddings, rerank): the model file and
/// everything in `payload`. `None` when caching is off.
pub fn key_for_deterministic(
    cache: &ResponseCache,
    endpoint: &str,
    entry: &ModelEntry,
    payload: Value,
) -> Option<CacheKey> {
    if !cache.is_enabled() {
        return None;
    }
    Some(CacheKey::new(&json!({
        "endpoint": endpoint,
        "model": file_identity(entry)?,
        "context": entry.engine_config.n_ctx,
        "batch": entry.engine_config.n_batch,
        "payload": payload,
    })))
}

/// A cached answer, read off the async threads (the disk tier does file I/O).
pub async fn lookup(cache: &Arc<ResponseCache>, key: &CacheKey) -> Option<Value> {
    let (cache, key) = (cache.clone(), key.clone());
    tokio::task::spawn_blocking(move || cache.get(&key).map(|c| c.body))
        .await
        .ok()
        .flatten()
}

/// The cached answer to a request under `key`, replayed as this request asked
/// (`model` is the name the client used).
pub async fn answer(
    cache: &Arc<ResponseCache>,
    key: Option<&CacheKey>,
    model: &str,
    chat: bool,
    stream: bool,
    include_usage: bool,
) -> Option<Response> {
    let mut body = lookup(cache, key?).await?;
    body["model"] = model.into();
    Some(replay(body, chat, stream, include_usage))
}

/// Stores a finished answer without making the client wait for the disk.
pub fn store(cache: &Arc<ResponseCache>, key: CacheKey, body: Value) {
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || {
        cache.put(
            &key,
            CachedResponse {
                body,
                created: chrono::Utc::now().timestamp(),
            },
        )
    });
}

pub fn mark(mut response: Response, hit: bool) -> Response {
    response.headers_mut().insert(
        CACHE_HEADER,
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    );
    response
}

/// Replays a cached answer. A streaming client gets the chunks a generation
/// would have sent: the role (chat), the text with its logprobs, the finish
/// reason, then usage when asked.
pub fn replay(mut body: Value, chat: bool, stream: bool, include_usage: bool) -> Response {
    // Same answer, but a response of its own, as every OpenAI response is.
    body["id"] = super::generate::new_id(if chat { "chatcmpl" } else { "cmpl" }).into();
    body["created"] = super::generate::now_unix().into();
    if !stream {
        return mark(axum::Json(body).into_response(), true);
    }
    mark(stream_body(body, chat, include_usage), true)
}

/// A finished answer as the SSE stream a generation would have sent: the role
/// (chat), the text with its logprobs, each tool call (its header, then its
/// arguments), the finish reason, then usage when asked.
pub fn stream_body(body: Value, chat: bool, include_usage: bool) -> Response {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let base = |choices: Value| {
        let mut chunk = json!({
            "id": body["id"], "object": object, "created": body["created"], "model": body["model"],
            "choices": choices, "system_fingerprint": null,
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk.to_string()
    };
    let mut payloads = Vec::new();
    let choices = body["choices"].as_array().cloned().unwrap_or_default();
    for choice in &choices {
        let index = &choice["index"];
        if chat {
            payloads.push(base(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])));
            let message = &choice["message"];
            if message["content"].is_string() || !choice["logprobs"].is_null() {
                payloads.push(base(json!([{"index": index, "delta": {"content": message["content"]}, "logprobs": choice["logprobs"], "finish_reason": null}])));
            }
            for (i, call) in message["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                payloads.push(base(json!([{"index": index, "delta": {"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}]}, "logprobs": null, "finish_reason": null}])));
                payloads.push(base(json!([{"index": index, "delta": {"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]}, "logprobs": null, "finish_reason": null}])));
            }
            if let Some(call) = message.get("function_call").filter(|c| c.is_object()) {
                payloads.push(base(json!([{"index": index, "delta": {"function_call": {"name": call["name"], "arguments": ""}}, "logprobs": null, "finish_reason": null}])));
                payloads.push(base(json!([{"index": index, "delta": {"function_call": {"arguments": call["arguments"]}}, "logprobs": null, "finish_reason": null}])));
            }
            payloads.push(base(json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": choice["finish_reason"]}])));
        } else {
            payloads.push(base(json!([{"text": choice["text"], "index": index, "logprobs": choice["logprobs"], "finish_reason": null}])));
            payloads.push(base(json!([{"text": "", "index": index, "logprobs": null, "finish_reason": choice["finish_reason"]}])));
        }
    }
    if include_usage {
        let mut last: Value = serde_json::from_str(&base(json!([]))).expect("just serialized");
        last["usage"] = body["usage"].clone();
        payloads.push(last.to_string());
    }
    sse(futures_util::stream::iter(payloads))
}
