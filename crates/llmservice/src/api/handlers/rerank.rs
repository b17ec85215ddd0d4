//! `POST /v1/rerank`: a `data` list of raw scores, or Cohere/Jina's `results`
//! with relevance scores, as the request's fields choose.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use engine::{EmbedOutputs, Engine, ModelKind, TokenId};
use serde_json::{json, Value};

use super::{check_count, log_encoded, new_id, off_async, require_kind, wants_to_wait};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::{self, Served};
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{ErrorResponse, RerankDocument, RerankRequest};

/// Documents one rerank request may score.
const MAX_DOCUMENTS: usize = 1024;

#[utoipa::path(post, path = "/v1/rerank", request_body = RerankRequest, responses(
    (status = 200, description = "Documents by descending score. With `top_n`: Cohere/Jina's `{id, results: [{index, relevance_score, document: {text}}], model, usage}`, where relevance_score = sigmoid(score). With `top_k`: the list shape `{object: \"list\", data: [{index, score, document}], model, usage}`, where score is the model's raw score. With neither, both `data` and `results`."),
    (status = 400, description = "Bad parameters or a pair over the model's limit", body = ErrorResponse),
    (status = 404, description = "Unknown model", body = ErrorResponse),
    (status = 503, description = "Queue full or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn rerank(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<RerankRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    check(&req)?;
    let model = req.model.as_deref().unwrap_or("reranker");
    let entry = super::resolve(&state, model).await?;
    require_kind(&entry, ModelKind::Reranker, "/v1/rerank")?;
    let cache_key = response_cache::key_for_deterministic(
        &state.cache,
        "rerank",
        &entry,
        json!({
            "query": req.query,
            "documents": req.documents.iter().map(RerankDocument::text).collect::<Vec<_>>(),
            "top_k": req.top_k, "top_n": req.top_n,
            "return_documents": req.return_documents, "truncate": req.truncate,
        }),
    );
    let replayed = response_cache::replay_json(&state.cache, cache_key.as_ref(), |body| {
        body["model"] = model.into();
        if body.get("id").is_some() {
            body["id"] = new_id("rerank").into();
        }
    });
    if let Some(response) = replayed.await {
        return Ok(response);
    }
    let wait = wants_to_wait(&headers);
    let (scored, prompt_tokens) = match state.registry.upstream(&entry, wait).await? {
        // Another server scores; the answer keeps this API's shapes.
        Some(upstream) => {
            let texts: Vec<String> = req.documents.iter().map(|d| d.text().to_owned()).collect();
            let scores = upstream.rerank(model, &req.query, &texts).await?;
            (ranked(scores, &req), 0)
        }
        None => score(&state.registry.engine(&entry, wait).await?, &req).await?,
    };
    let body = answer(&req, model, &scored, prompt_tokens);
    log_encoded(&state, caller, &entry.id, "rerank", prompt_tokens, started);
    if let Some(key) = cache_key {
        response_cache::store(&state.cache, key, body.clone());
    }
    Ok(response_cache::mark(
        axum::Json(body).into_response(),
        Served::Generated,
    ))
}

/// The request's own checks, before any model is resolved.
fn check(req: &RerankRequest) -> Result<(), ApiError> {
    check_count("documents", req.documents.len(), MAX_DOCUMENTS)?;
    if req.query.is_empty() {
        return Err(ApiError::invalid("query", "query must not be empty"));
    }
    for (param, value) in [("top_k", req.top_k), ("top_n", req.top_n)] {
        if value == Some(0) {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
    }
    Ok(())
}

/// Every (query, document) pair scored by the model, best first (ties keep
/// the documents' order), cut to `top_n` / `top_k`; and the tokens it took.
async fn score(
    engine: &Arc<Engine>,
    req: &RerankRequest,
) -> Result<(Vec<(usize, f32)>, u32), ApiError> {
    let (query, documents, tokenizer) = (req.query.clone(), req.documents.clone(), engine.clone());
    let mut pairs = off_async(move || -> Result<Vec<Vec<TokenId>>, ApiError> {
        let query = tokenizer.tokenize(&query, false, false);
        Ok(documents
            .iter()
            .map(|d| tokenizer.rerank_pair(&query, &tokenizer.tokenize(d.text(), false, false)))
            .collect())
    })
    .await?;
    if req.truncate == Some(true) {
        pairs.iter_mut().for_each(|p| engine.truncate_input(p));
    }
    let results = engine
        .embed(pairs, EmbedOutputs {
            dense: true,
            ..Default::default()
        })
        .map_err(|e| match e {
            engine::EngineError::InputTooLong { index, tokens, limit } => ApiError {
                param: Some("documents".to_owned()),
                ..ApiError::from(e).with_message(format!(
                    "query + document {index} make {tokens} tokens, more than this model's limit of {limit}; shorten them or send truncate: true"
                ))
            },
            other => other.into(),
        })?
        .wait()
        .await?;
    let prompt_tokens: u32 = results.iter().map(|r| r.n_tokens).sum();
    let scores = results
        .iter()
        .map(|r| {
            let score = r.dense.as_ref().and_then(|s| s.first()).copied();
            score.unwrap_or(f32::NEG_INFINITY)
        })
        .collect();
    Ok((ranked(scores, req), prompt_tokens))
}

/// Each document's score by index, best first (ties keep the documents'
/// order), cut to `top_n` / `top_k`.
fn ranked(scores: Vec<f32>, req: &RerankRequest) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = scores.into_iter().enumerate().collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(req.top_n.or(req.top_k).unwrap_or(scored.len()));
    scored
}

/// The answer's body in the shape the request's fields choose.
fn answer(req: &RerankRequest, model: &str, scored: &[(usize, f32)], prompt_tokens: u32) -> Value {
    let with_docs = req.return_documents.unwrap_or(true);
    let doc = |i: usize| req.documents[i].text().to_owned();
    let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens});
    let mut body = json!({"model": model, "usage": usage});
    if req.top_n.is_some() || req.top_k.is_none() {
        let results: Vec<Value> = scored
            .iter()
            .map(|&(index, score)| {
                let mut r = json!({"index": index, "relevance_score": sigmoid(score)});
                if with_docs {
                    r["document"] = json!({"text": doc(index)});
                }
                r
            })
            .collect();
        body["id"] = new_id("rerank").into();
        body["results"] = results.into();
    }
    if req.top_k.is_some() || req.top_n.is_none() {
        let data: Vec<Value> = scored
            .iter()
            .map(|&(index, score)| {
                let mut r = json!({"index": index, "score": score});
                if with_docs {
                    r["document"] = doc(index).into();
                }
                r
            })
            .collect();
        body["object"] = "list".into();
        body["data"] = data.into();
    }
    body
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
