//! `POST /v1/completions`: the legacy prompt-completion API.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::{Event, TokenId};
use futures_util::StreamExt;

use super::cached;
use super::error::ApiError;
use super::generate::{
    self, build_request, finish_reason_str, new_id, now_unix, sse, sse_error, wire_json,
};
use super::json::Json;
use super::types::*;
use super::AppState;

/// Most prompts one request may batch.
const MAX_PROMPTS: usize = 64;

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest, responses((status = 200, description = "A legacy completion, or an SSE stream of them", body = Completion), (status = 400, description = "Bad parameters or context overflow", body = ErrorResponse), (status = 404, description = "Unknown model", body = ErrorResponse), (status = 503, description = "Queue full, queue timeout, or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    generate::validate(&req.sampling)?;
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
    let entry = generate::text_model(&state, &req.model)?;
    let stream = req.sampling.stream.unwrap_or(false);
    let include_usage = generate::include_usage(&req.sampling);
    let cache_key = cached::key_for(
        &state.cache,
        "completions",
        &entry,
        &req.sampling,
        &entry.defaults,
        serde_json::json!({"prompt": serde_json::to_value(&req.prompt).unwrap_or_default(), "echo": req.echo}),
    );
    let hit = cached::answer(
        &state.cache,
        cache_key.as_ref(),
        &req.model,
        false,
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

    // Each prompt becomes one choice; the text form keeps what `echo` repeats.
    let prompts: Vec<(Vec<TokenId>, String)> = match &req.prompt {
        PromptField::Text(text) => vec![(engine.tokenize(text, true, true), text.clone())],
        PromptField::Texts(texts) => texts
            .iter()
            .map(|t| (engine.tokenize(t, true, true), t.clone()))
            .collect(),
        PromptField::Tokens(tokens) => vec![token_prompt(&engine, tokens)?],
        PromptField::TokenLists(lists) => lists
            .iter()
            .map(|t| token_prompt(&engine, t))
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
    let echo = req.echo.unwrap_or(false);
    let logprobs = completion_logprobs_request(&req.sampling)?;
    let n = req.sampling.n.unwrap_or(1);
    // Choices are prompt-major: prompt p, choice c has index p * n + c.
    let mut streams = Vec::with_capacity(prompts.len() * n as usize);
    let mut echoes = Vec::with_capacity(prompts.len() * n as usize);
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
    for (tokens, text) in prompts {
        let request = build_request(&req.sampling, &entry.defaults, &engine, tokens, logprobs)
            .map_err(|e| e.for_prompt_param("prompt"))?;
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
    let choices = generate::start(streams, &state.metrics, &entry.id, started).await?;

    let id = new_id("cmpl");
    let created = now_unix();
    let model = req.model.clone();
    if !stream {
        let done = generate::collect_all(choices).await?;
        let usages: Vec<_> = done.iter().map(|d| d.usage).collect();
        let total = generate::total_usage(&usages, n as usize);
        let choices = done
            .into_iter()
            .zip(echoes)
            .enumerate()
            .map(|(index, (d, prefix))| CompletionChoice {
                logprobs: logprobs
                    .map(|_| generate::completion_logprobs(&d.logprobs, prefix.len())),
                text: prefix + &d.text,
                index: index as u32,
                finish_reason: Some(finish_reason_str(d.finish_reason)),
            })
            .collect();
        generate::log_done(&state.metrics, &entry.id, "completions", &total, started);
        let body = serde_json::to_value(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: Some(Some(total.into())),
            system_fingerprint: None,
        })
        .expect("wire types always serialize");
        if let Some(key) = cache_key {
            cached::store(&state.cache, key, body.clone());
        }
        return Ok(cached::mark(axum::Json(body).into_response(), false));
    }

    // What a cache entry for this stream will hold once it ends.
    let record = cache_key.map(|key| (key, state.cache.clone(), id.clone(), model.clone()));
    let chunk = move |choices: Vec<CompletionChoice>| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage: include_usage.then_some(None),
        system_fingerprint: None,
    };
    let total_choices = choices.len();
    let entry_id = entry.id.clone();
    let metrics = state.metrics.clone();
    let mut events = Box::pin(generate::merge(choices));
    let payloads = async_stream::stream! {
        let mut offsets: Vec<usize> = echoes.iter().map(String::len).collect();
        let mut texts = echoes.clone();
        let mut all_logprobs = vec![Vec::new(); total_choices];
        let mut finishes = vec!["stop"; total_choices];
        for (index, prefix) in echoes.iter().enumerate() {
            if !prefix.is_empty() {
                yield wire_json(&chunk(vec![CompletionChoice { text: prefix.clone(), index: index as u32, logprobs: None, finish_reason: None }]));
            }
        }
        let mut usages = vec![engine::Usage::default(); total_choices];
        let mut remaining = total_choices;
        while let Some((index, event)) = events.next().await {
            match event {
                Event::Text { text, logprobs: lp } => {
                    let i = index as usize;
                    let logprobs = logprobs.map(|_| generate::completion_logprobs(&lp, offsets[i]));
                    offsets[i] += text.len();
                    texts[i].push_str(&text);
                    all_logprobs[i].extend(lp);
                    yield wire_json(&chunk(vec![CompletionChoice { text, index, logprobs, finish_reason: None }]));
                }
                Event::Done { finish_reason, usage } => {
                    usages[index as usize] = usage;
                    finishes[index as usize] = finish_reason_str(finish_reason);
                    let done = CompletionChoice {
                        text: String::new(), index, logprobs: None,
                        finish_reason: Some(finish_reason_str(finish_reason)),
                    };
                    yield wire_json(&chunk(vec![done]));
                    remaining -= 1;
                    if remaining == 0 {
                        let total = generate::total_usage(&usages, n as usize);
                        if let Some((key, cache, id, model)) = &record {
                            let whole = Completion {
                                id: id.clone(),
                                object: "text_completion",
                                created,
                                model: model.clone(),
                                choices: (0..total_choices).map(|c| CompletionChoice {
                                    logprobs: logprobs.map(|_| generate::completion_logprobs(&all_logprobs[c], echoes[c].len())),
                                    text: std::mem::take(&mut texts[c]),
                                    index: c as u32,
                                    finish_reason: Some(finishes[c]),
                                }).collect(),
                                usage: Some(Some(total.into())),
                                system_fingerprint: None,
                            };
                            let body = serde_json::to_value(&whole).expect("wire types always serialize");
                            cached::store(cache, key.clone(), body);
                        }
                        if include_usage {
                            let mut last = chunk(Vec::new());
                            last.usage = Some(Some(total.into()));
                            yield wire_json(&last);
                        }
                        generate::log_done(&metrics, &entry_id, "completions", &total, started);
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

/// Legacy completions ask with `logprobs: k` (0-5 in OpenAI's API; up to 20 here).
fn completion_logprobs_request(f: &SamplingFields) -> Result<Option<u32>, ApiError> {
    match &f.logprobs {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(k)) => match k.as_u64() {
            Some(k) if k <= u64::from(generate::MAX_TOP_LOGPROBS) => Ok(Some(k as u32)),
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
