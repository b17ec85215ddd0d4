//! `POST /v1/completions`: the legacy prompt-completion API.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::{Event, ModelKind, TokenId, Usage};
use futures_util::StreamExt;

use super::error::ApiError;
use super::generate::{
    self, build_request, collect, finish_reason_str, new_id, now_unix, sse, sse_error,
};
use super::json::Json;
use super::types::*;
use super::AppState;

/// Most prompts one request may batch.
const MAX_PROMPTS: usize = 64;

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
    let entry = state.registry.resolve(&req.model)?;
    if entry.kind != ModelKind::Chat {
        return Err(ApiError::invalid(
            "model",
            format!(
                "'{}' is a {} model and cannot generate text",
                entry.id,
                entry.kind.as_str()
            ),
        ));
    }
    let engine = entry.engine(generate::wants_to_wait(&headers)).await?;

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
    let mut streams = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    for (tokens, text) in prompts {
        let request = build_request(&req.sampling, &entry.defaults, &engine, tokens)?;
        streams.push(engine.submit(request)?);
        echoes.push(if echo { text } else { String::new() });
    }

    let id = new_id("cmpl");
    let created = now_unix();
    let model = req.model.clone();
    if !req.sampling.stream.unwrap_or(false) {
        let mut choices = Vec::with_capacity(streams.len());
        let mut total = Usage::default();
        let results = futures_util::future::join_all(streams.into_iter().map(collect)).await;
        for (index, (result, prefix)) in results.into_iter().zip(echoes).enumerate() {
            let done = result?;
            total.prompt_tokens += done.usage.prompt_tokens;
            total.completion_tokens += done.usage.completion_tokens;
            total.cached_tokens += done.usage.cached_tokens;
            choices.push(CompletionChoice {
                text: prefix + &done.text,
                index: index as u32,
                logprobs: None,
                finish_reason: Some(finish_reason_str(done.finish_reason)),
            });
        }
        generate::log_done(&entry.id, "completions", &total, started);
        return Ok(axum::Json(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: Some(Some(total.into())),
            system_fingerprint: None,
        })
        .into_response());
    }

    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let chunk = move |choices: Vec<CompletionChoice>| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage: include_usage.then_some(None),
        system_fingerprint: None,
    };
    // One stream of (choice index, event) for all prompts, interleaved as they come.
    let merged = futures_util::stream::select_all(streams.into_iter().zip(echoes).enumerate().map(
        |(index, (mut stream, prefix))| {
            Box::pin(async_stream::stream! {
                if !prefix.is_empty() {
                    yield (index, Event::Text(prefix));
                }
                while let Some(event) = stream.recv().await {
                    let last = !matches!(event, Event::Text(_));
                    yield (index, event);
                    if last { break; }
                }
            })
        },
    ));
    let n = echoes_len(&req);
    let entry_id = entry.id.clone();
    let payloads = async_stream::stream! {
        let mut merged = merged;
        let mut total = Usage::default();
        let mut remaining = n;
        while let Some((index, event)) = merged.next().await {
            let choice = |text: String, finish: Option<&'static str>| CompletionChoice {
                text, index: index as u32, logprobs: None, finish_reason: finish,
            };
            match event {
                Event::Text(text) => yield json(&chunk(vec![choice(text, None)])),
                Event::Done { finish_reason, usage } => {
                    total.prompt_tokens += usage.prompt_tokens;
                    total.completion_tokens += usage.completion_tokens;
                    total.cached_tokens += usage.cached_tokens;
                    yield json(&chunk(vec![choice(String::new(), Some(finish_reason_str(finish_reason)))]));
                    remaining -= 1;
                    if remaining == 0 {
                        if include_usage {
                            let mut last = chunk(Vec::new());
                            last.usage = Some(Some(total.into()));
                            yield json(&last);
                        }
                        generate::log_done(&entry_id, "completions", &total, started);
                        break;
                    }
                }
                Event::Error(error) => {
                    yield sse_error(error);
                    break;
                }
            }
        }
    };
    Ok(sse(payloads))
}

fn echoes_len(req: &CompletionRequest) -> usize {
    match &req.prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(t) => t.len(),
        PromptField::TokenLists(l) => l.len(),
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

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types always serialize")
}
