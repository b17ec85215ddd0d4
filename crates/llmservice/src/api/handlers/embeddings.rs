//! `POST /v1/embeddings`: OpenAI's API plus BGE-M3's sparse and ColBERT outputs.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use engine::{EmbedOutputs, Embedding, ModelKind};
use serde_json::{json, Map, Value};

use super::{log_encoded, require_kind, tokenize_inputs, wants_to_wait};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::{self, Served};
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{EmbeddingRequest, ErrorResponse};

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
    caller: Caller,
    Json(req): Json<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (encoding, kind, outputs) = read_options(&req)?;
    let entry = super::resolve(&state, &req.model).await?;
    require_kind(&entry, ModelKind::Embedding, "/v1/embeddings")?;
    let dimensions = req.dimensions.or(entry.embedding_dimension);
    let cache_key = response_cache::key_for_deterministic(
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
    let replayed = response_cache::replay_json(&state.cache, cache_key.as_ref(), |body| {
        body["model"] = req.model.clone().into();
    });
    if let Some(response) = replayed.await {
        return Ok(response);
    }
    let upstream = state
        .registry
        .upstream(&entry, wants_to_wait(&headers))
        .await?;
    let body = match &upstream {
        Some(upstream) => upstream_embeddings(upstream, &req, kind, dimensions).await?,
        None => {
            embed_here(
                &state,
                &headers,
                &entry,
                &req,
                (encoding, kind, outputs),
                dimensions,
            )
            .await?
        }
    };
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
    log_encoded(
        &state,
        caller,
        &entry.id,
        "embeddings",
        prompt_tokens,
        started,
    );
    if let Some(key) = cache_key {
        response_cache::store(&state.cache, key, body.clone());
    }
    Ok(response_cache::mark(
        axum::Json(body).into_response(),
        Served::Generated,
    ))
}

/// Embeddings from an upstream tier: the request forwarded under the
/// upstream's model name, its answer under the client's. BGE-M3's sparse
/// and ColBERT outputs are this server's own.
async fn upstream_embeddings(
    upstream: &std::sync::Arc<crate::upstream::Upstream>,
    req: &EmbeddingRequest,
    kind: EmbeddingType,
    dimensions: Option<u32>,
) -> Result<Value, ApiError> {
    if kind != EmbeddingType::Dense || req.return_sparse == Some(true) {
        return Err(ApiError::unsupported(
            "embedding_type",
            "sparse and ColBERT embeddings come from models loaded here, not from an upstream tier",
        ));
    }
    let input = serde_json::to_value(&req.input).unwrap_or_default();
    let mut answer = upstream
        .embeddings(
            &req.model,
            input,
            dimensions,
            req.encoding_format.as_deref(),
        )
        .await?;
    answer["model"] = req.model.clone().into();
    Ok(answer)
}

/// Embeddings from the model loaded here.
async fn embed_here(
    state: &AppState,
    headers: &HeaderMap,
    entry: &std::sync::Arc<crate::models::ModelEntry>,
    req: &EmbeddingRequest,
    (encoding, kind, outputs): (Encoding, EmbeddingType, EmbedOutputs),
    dimensions: Option<u32>,
) -> Result<Value, ApiError> {
    let engine = state.registry.engine(entry, wants_to_wait(headers)).await?;
    let n_embd = engine.info().n_embd;
    if let Some(d) = req.dimensions.filter(|&d| d > n_embd) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("dimensions {d} is larger than the model's {n_embd}"),
        ));
    }
    let mut inputs = tokenize_inputs(&engine, &req.input).await?;
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
    Ok(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
}

/// What the request asks for: its encoding, which embedding, and the outputs
/// the engine must produce for it.
fn read_options(
    req: &EmbeddingRequest,
) -> Result<(Encoding, EmbeddingType, EmbedOutputs), ApiError> {
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
    if req.dimensions.is_some() && kind != EmbeddingType::Dense {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions applies to dense embeddings only",
        ));
    }
    Ok((encoding, kind, outputs))
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
