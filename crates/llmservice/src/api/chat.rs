//! `POST /v1/chat/completions`.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::chat::{normalize_messages, RenderInput};
use engine::{Event, ModelKind};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::cached;
use super::error::ApiError;
use super::generate::{
    self, build_request, finish_reason_str, new_id, now_unix, sse, sse_error, wire_json,
};
use super::json::Json;
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

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest, responses((status = 200, description = "A completion, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending with `data: [DONE]`", body = ChatCompletion), (status = 400, description = "Bad parameters or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    generate::validate(&req.sampling)?;
    reject_unsupported(&req)?;
    let messages = prepare_messages(&req.messages)?;

    let entry = state.registry.resolve(&req.model)?;
    if entry.kind != ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!(
                "'{}' is a {} model and cannot chat",
                entry.id,
                entry.kind.as_str()
            ),
        ));
    }
    let stream = req.sampling.stream.unwrap_or(false);
    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let cache_key = cached::key_for(
        &state.cache,
        "chat",
        &entry,
        &req.sampling,
        &entry.defaults,
        json!({"messages": messages, "chat_template_kwargs": req.chat_template_kwargs}),
    );
    if let Some(key) = &cache_key {
        if let Some(mut body) = cached::lookup(&state.cache, key).await {
            body["model"] = req.model.clone().into();
            return Ok(cached::replay(body, true, stream, include_usage));
        }
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
    let prompt = template
        .render(&RenderInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: true,
            extra: req.chat_template_kwargs.as_ref(),
        })
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let tokens = engine.tokenize_chat_prompt(&prompt);
    let logprobs = chat_logprobs_request(&req.sampling)?;
    let request = build_request(&req.sampling, &entry.defaults, &engine, tokens, logprobs)?;
    let n = req.sampling.n.unwrap_or(1);
    let choices = generate::start(
        engine.submit_n(request, n)?,
        &state.metrics,
        &entry.id,
        started,
    )
    .await?;

    let id = new_id("chatcmpl");
    let created = now_unix();
    let model = req.model.clone();
    let with_logprobs = logprobs.is_some();
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
                .into_iter()
                .enumerate()
                .map(|(index, d)| ChatChoice {
                    index: index as u32,
                    logprobs: with_logprobs.then(|| generate::chat_logprobs(&d.logprobs)),
                    message: ChatMessage {
                        role: "assistant",
                        content: d.text,
                    },
                    finish_reason: finish_reason_str(d.finish_reason),
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
    let chunk = move |index: u32,
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
    };
    let entry_id = entry.id.clone();
    let metrics = state.metrics.clone();
    let mut events = Box::pin(generate::merge(choices));
    let payloads = async_stream::stream! {
        for index in 0..n {
            let first = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
            yield wire_json(&chunk(index, first, None, None));
        }
        let mut usages = vec![engine::Usage::default(); n as usize];
        let mut texts = vec![String::new(); n as usize];
        let mut all_logprobs = vec![Vec::new(); n as usize];
        let mut finishes = vec!["stop"; n as usize];
        let mut remaining = n;
        while let Some((index, event)) = events.next().await {
            let i = index as usize;
            match event {
                Event::Text { text, logprobs } => {
                    texts[i].push_str(&text);
                    let wire = with_logprobs.then(|| generate::chat_logprobs(&logprobs));
                    all_logprobs[i].extend(logprobs);
                    yield wire_json(&chunk(index, ChatDelta { role: None, content: Some(text) }, wire, None));
                }
                Event::Done { finish_reason, usage } => {
                    finishes[i] = finish_reason_str(finish_reason);
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
                                choices: (0..n as usize).map(|c| ChatChoice {
                                    index: c as u32,
                                    message: ChatMessage { role: "assistant", content: std::mem::take(&mut texts[c]) },
                                    logprobs: with_logprobs.then(|| generate::chat_logprobs(&all_logprobs[c])),
                                    finish_reason: finishes[c],
                                }).collect(),
                                usage: usage.into(),
                                system_fingerprint: None,
                            };
                            let body = serde_json::to_value(&whole).expect("wire types always serialize");
                            cached::store(cache, key.clone(), body);
                        }
                        if include_usage {
                            let mut last = chunk(0, ChatDelta::default(), None, None);
                            last.choices.clear();
                            last.usage = Some(Some(usage.into()));
                            yield wire_json(&last);
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

fn reject_unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported yet",
        ));
    }
    if req.functions.as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(ApiError::unsupported(
            "functions",
            "function calling is not supported yet",
        ));
    }
    if let Some(format) = &req.response_format {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(ApiError::unsupported(
                "response_format",
                format!("response_format type {kind:?} is not supported yet"),
            ));
        }
    }
    if req.grammar.is_some() {
        return Err(ApiError::unsupported(
            "grammar",
            "grammar-constrained output is not supported yet",
        ));
    }
    Ok(())
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
