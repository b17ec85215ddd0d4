//! `POST /v1/embeddings` (OpenAI's API plus BGE-M3's sparse and ColBERT outputs)
//! and `POST /v1/rerank` (seed 000's shape and Cohere/Jina's).

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use engine::{EmbedOutputs, Embedding, ModelKind, TokenId};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::cached;
use super::error::ApiError;
use super::generate::{self, new_id};
use super::json::Json;
use super::types::{ErrorResponse, PromptField};
use super::AppState;
use crate::models::ModelEntry;

/// OpenAI's limit on inputs in one embeddings request.
const MAX_INPUTS: usize = 2048;
/// Documents one rerank request may score.
const MAX_DOCUMENTS: usize = 1024;

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub model: String,
    /// A string, an array of strings, an array of token ids, or an array of such arrays.
    pub input: PromptField,
    /// `float` (default) or `base64` (little-endian f32, what the OpenAI Python client asks for).
    pub encoding_format: Option<String>,
    /// Keep the first `dimensions` values of the dense vector, then re-normalize.
    pub dimensions: Option<u32>,
    /// BGE-M3: `dense` (default), `sparse` (lexical weights) or `colbert` (one vector per token).
    pub embedding_type: Option<String>,
    /// BGE-M3 hybrid: also return `sparse_embedding` with a dense request.
    pub return_sparse: Option<bool>,
    /// Cut inputs longer than the model's limit instead of answering 400.
    pub truncate: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Float,
    Base64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum EmbeddingType {
    Dense,
    Sparse,
    Colbert,
}

#[utoipa::path(post, path = "/v1/embeddings", request_body = EmbeddingRequest, responses(
    (status = 200, description = "`{object: \"list\", data: [{object: \"embedding\", index, embedding, sparse_embedding?, colbert_embedding?}], model, usage}`"),
    (status = 400, description = "Bad parameters, an input over the model's limit, or an output the model cannot give", body = ErrorResponse),
    (status = 404, description = "Unknown model", body = ErrorResponse),
    (status = 503, description = "Queue full or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
            ))
        }
    };
    let kind = match req.embedding_type.as_deref() {
        None | Some("dense") => EmbeddingType::Dense,
        Some("sparse") => EmbeddingType::Sparse,
        Some("colbert") => EmbeddingType::Colbert,
        Some(other) => {
            return Err(ApiError::invalid(
                "embedding_type",
                format!("embedding_type must be 'dense', 'sparse' or 'colbert', got '{other}'"),
            ))
        }
    };
    let outputs = EmbedOutputs {
        dense: kind == EmbeddingType::Dense,
        sparse: kind == EmbeddingType::Sparse || req.return_sparse == Some(true),
        colbert: kind == EmbeddingType::Colbert,
    };
    if req.dimensions == Some(0) {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions must be at least 1",
        ));
    }
    let entry = state.registry.resolve(&req.model)?;
    require_kind(&entry, ModelKind::Embedding, "/v1/embeddings")?;
    let dimensions = req.dimensions.or(entry.embedding_dimension);
    if req.dimensions.is_some() && kind != EmbeddingType::Dense {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions applies to dense embeddings only",
        ));
    }
    let cache_key = cached::key_for_deterministic(
        &state.cache,
        "embeddings",
        &entry,
        json!({
            "input": serde_json::to_value(&req.input).unwrap_or_default(),
            "encoding_format": format!("{encoding:?}"),
            "dimensions": dimensions,
            "embedding_type": format!("{kind:?}"),
            "return_sparse": req.return_sparse,
            "truncate": req.truncate,
        }),
    );
    if let Some(key) = &cache_key {
        if let Some(mut body) = cached::lookup(&state.cache, key).await {
            body["model"] = req.model.clone().into();
            return Ok(cached::mark(axum::Json(body).into_response(), true));
        }
    }
    let engine = state
        .registry
        .engine(&entry, generate::wants_to_wait(&headers))
        .await?;
    let n_embd = engine.info().n_embd;
    if let Some(d) = req.dimensions.filter(|&d| d > n_embd) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("dimensions {d} is larger than the model's {n_embd}"),
        ));
    }
    let empty_text = match &req.input {
        PromptField::Text(text) => text.is_empty().then_some(0),
        PromptField::Texts(texts) => texts.iter().position(String::is_empty),
        _ => None,
    };
    if let Some(index) = empty_text {
        return Err(ApiError::invalid(
            "input",
            format!("input {index} is an empty string"),
        ));
    }
    // Tokenizing up to 2048 long texts is real CPU work: keep it off the async threads.
    let (input, tokenizer) = (req.input.clone(), engine.clone());
    let mut inputs = off_async(move || -> Result<Vec<Vec<TokenId>>, ApiError> {
        Ok(match &input {
            PromptField::Text(text) => vec![tokenizer.tokenize_input(text)],
            PromptField::Texts(texts) => {
                check_count("input", texts.len(), MAX_INPUTS)?;
                texts.iter().map(|t| tokenizer.tokenize_input(t)).collect()
            }
            PromptField::Tokens(tokens) => vec![token_input(&tokenizer, tokens)?],
            PromptField::TokenLists(lists) => {
                check_count("input", lists.len(), MAX_INPUTS)?;
                lists
                    .iter()
                    .map(|t| token_input(&tokenizer, t))
                    .collect::<Result<_, _>>()?
            }
        })
    })
    .await?;
    if let Some(index) = inputs.iter().position(Vec::is_empty) {
        return Err(ApiError::invalid(
            "input",
            format!("input {index} is empty"),
        ));
    }
    if req.truncate == Some(true) {
        inputs.iter_mut().for_each(|i| engine.truncate_input(i));
    }
    let results = engine
        .embed(inputs, outputs)
        .map_err(|e| name_param(e, kind))?
        .wait()
        .await?;
    let prompt_tokens: u32 = results.iter().map(|r| r.n_tokens).sum();
    let data: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| embedding_item(index, r, encoding, dimensions))
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    log_done(&state, &entry.id, "embeddings", prompt_tokens, started);
    if let Some(key) = cache_key {
        cached::store(&state.cache, key, body.clone());
    }
    Ok(cached::mark(axum::Json(body).into_response(), false))
}

/// `Unsupported` from the engine concerns the kind of embedding asked for.
fn name_param(error: engine::EngineError, kind: EmbeddingType) -> ApiError {
    let unsupported = matches!(error, engine::EngineError::Unsupported(_));
    let mut api = ApiError::from(error);
    if unsupported {
        api.param = Some(
            if kind == EmbeddingType::Dense {
                "return_sparse"
            } else {
                "embedding_type"
            }
            .to_owned(),
        );
    }
    api
}

fn embedding_item(
    index: usize,
    result: Embedding,
    encoding: Encoding,
    dimensions: Option<u32>,
) -> Value {
    let mut item = Map::new();
    item.insert("object".into(), "embedding".into());
    item.insert("index".into(), index.into());
    if let Some(mut dense) = result.dense {
        if let Some(d) = dimensions.filter(|&d| (d as usize) < dense.len()) {
            dense.truncate(d as usize);
            engine::normalize(&mut dense);
        }
        item.insert("embedding".into(), encode(&dense, encoding));
    }
    if let Some(sparse) = result.sparse {
        let weights: Map<String, Value> = sparse
            .into_iter()
            .map(|(id, w)| (id.to_string(), json!(w)))
            .collect();
        item.insert("sparse_embedding".into(), Value::Object(weights));
    }
    if let Some(colbert) = result.colbert {
        let vectors: Vec<Value> = colbert.iter().map(|v| encode(v, encoding)).collect();
        item.insert("colbert_embedding".into(), Value::Array(vectors));
    }
    Value::Object(item)
}

fn encode(vector: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(vector),
        Encoding::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into()
        }
    }
}

fn require_kind(entry: &ModelEntry, kind: ModelKind, endpoint: &str) -> Result<(), ApiError> {
    if entry.kind == kind {
        return Ok(());
    }
    let hint = match entry.kind {
        ModelKind::Chat => "use /v1/chat/completions or /v1/completions",
        ModelKind::Embedding => "use /v1/embeddings",
        ModelKind::Reranker => "use /v1/rerank",
    };
    Err(ApiError::invalid(
        "model",
        format!(
            "'{}' is a {} model and cannot serve {endpoint}; {hint}",
            entry.id,
            entry.kind.as_str()
        ),
    ))
}

fn check_count(param: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n == 0 || n > max {
        return Err(ApiError::invalid(
            param,
            format!("{param} must hold between 1 and {max} items, got {n}"),
        ));
    }
    Ok(())
}

fn token_input(engine: &engine::Engine, tokens: &[i64]) -> Result<Vec<TokenId>, ApiError> {
    let n_vocab = i64::from(engine.info().n_vocab);
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(ApiError::invalid(
            "input",
            format!("token id {bad} is outside the vocabulary (size {n_vocab})"),
        ));
    }
    Ok(tokens.iter().map(|&t| t as TokenId).collect())
}

fn log_done(state: &AppState, model: &str, endpoint: &str, prompt_tokens: u32, started: Instant) {
    state.metrics.observe_usage(
        model,
        &engine::Usage {
            prompt_tokens,
            ..Default::default()
        },
    );
    tracing::info!(
        model,
        endpoint,
        status = 200,
        prompt_tokens,
        latency_ms = started.elapsed().as_millis() as u64,
        "request finished"
    );
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RerankDocument {
    Text(String),
    Object { text: String },
}

impl RerankDocument {
    fn text(&self) -> &str {
        match self {
            RerankDocument::Text(text) | RerankDocument::Object { text } => text,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RerankRequest {
    /// Defaults to the `reranker` tier.
    pub model: Option<String>,
    pub query: String,
    /// Strings, or objects with a `text` field.
    pub documents: Vec<RerankDocument>,
    /// Seed 000's name for how many results to return; selects its `data[{index, score, document}]` shape.
    pub top_k: Option<usize>,
    /// Cohere's and Jina's name; selects the `results[{index, relevance_score, document: {text}}]` shape.
    pub top_n: Option<usize>,
    /// Include each document's text (default true).
    pub return_documents: Option<bool>,
    /// Cut (query, document) pairs longer than the model's limit instead of answering 400.
    pub truncate: Option<bool>,
}

#[utoipa::path(post, path = "/v1/rerank", request_body = RerankRequest, responses(
    (status = 200, description = "Documents by descending score. With `top_n`: Cohere/Jina's `{id, results: [{index, relevance_score, document: {text}}], model, usage}`, where relevance_score = sigmoid(score). With `top_k`: seed 000's `{object: \"list\", data: [{index, score, document}], model, usage}`, where score is the model's raw score. With neither, both `data` and `results`."),
    (status = 400, description = "Bad parameters or a pair over the model's limit", body = ErrorResponse),
    (status = 404, description = "Unknown model", body = ErrorResponse),
    (status = 503, description = "Queue full or model loading (with Retry-After)", body = ErrorResponse)))]
pub async fn rerank(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<RerankRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
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
    let model = req.model.as_deref().unwrap_or("reranker");
    let entry = state.registry.resolve(model)?;
    require_kind(&entry, ModelKind::Reranker, "/v1/rerank")?;
    let cache_key = cached::key_for_deterministic(
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
    if let Some(key) = &cache_key {
        if let Some(mut body) = cached::lookup(&state.cache, key).await {
            body["model"] = model.into();
            if body.get("id").is_some() {
                body["id"] = new_id("rerank").into();
            }
            return Ok(cached::mark(axum::Json(body).into_response(), true));
        }
    }
    let engine = state
        .registry
        .engine(&entry, generate::wants_to_wait(&headers))
        .await?;
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
    let mut scored: Vec<(usize, f32)> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let score = r.dense.as_ref().and_then(|s| s.first()).copied();
            (i, score.unwrap_or(f32::NEG_INFINITY))
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(req.top_n.or(req.top_k).unwrap_or(scored.len()));
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
    log_done(&state, &entry.id, "rerank", prompt_tokens, started);
    if let Some(key) = cache_key {
        cached::store(&state.cache, key, body.clone());
    }
    Ok(cached::mark(axum::Json(body).into_response(), false))
}

/// Runs CPU-bound request preparation on the blocking pool.
async fn off_async<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("tokenization failed: {e}"))))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
