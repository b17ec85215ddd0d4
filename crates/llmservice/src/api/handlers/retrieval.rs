//! Retrieval as the handlers use it (`/v1/rag/*` and chat with `rag`): the
//! document store, the models behind it, and a search with the server's
//! defaults.

use std::sync::Arc;

use axum::http::HeaderMap;
use engine::ModelKind;
use rag::{Library, Mode, SearchOptions};
use serde_json::{Map, Value};

use super::{require_kind, wants_to_wait};
use crate::api::error::ApiError;
use crate::retrieval::{
    EngineEncoder, EngineReranker, ModelEncoder, UpstreamEncoder, UpstreamReranker,
};
use crate::state::AppState;
use crate::wire::RagSource;

pub(super) const DEFAULT_COLLECTION: &str = "default";

/// Most results a search may ask for.
pub(super) const MAX_TOP_K: usize = 100;

pub(super) fn library(state: &AppState) -> Result<&Library, ApiError> {
    state.rag.as_ref().as_ref().map_err(|reason| {
        ApiError::unavailable(format!("the document store is unavailable: {reason}"))
            .with_code("rag_unavailable")
    })
}

pub(super) fn collection_name(name: Option<&String>) -> &str {
    name.map_or(DEFAULT_COLLECTION, String::as_str)
}

/// The embedding model retrieval uses, loaded (or on another server).
pub(super) async fn encoder(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<ModelEncoder, ApiError> {
    let settings = &state.settings.rag;
    let entry = match &settings.embedding_model {
        Some(name) => state.registry.resolve_async(name).await?,
        None => {
            let hinted = match &settings.embedding_model_hint {
                Some(name) => state.registry.resolve_async(name).await.ok(),
                None => None,
            };
            let all = state.registry.list();
            hinted
                .filter(|e| e.kind == ModelKind::Embedding)
                .or_else(|| {
                    let embedding =
                        |e: &&Arc<crate::models::ModelEntry>| e.kind == ModelKind::Embedding;
                    all.iter()
                        .filter(|e| e.tier == Some(crate::settings::Tier::Embedding))
                        .find(embedding)
                        .or_else(|| all.iter().find(embedding))
                        .cloned()
                })
                .ok_or_else(|| {
                    ApiError::unavailable(
                        "retrieval needs an embedding model: set EMBEDDING_MODEL_PATH (the \
                         embedding tier), or RAG_EMBEDDING_MODEL to a model in MODELS_DIR",
                    )
                    .with_code("no_embedding_model")
                })?
        }
    };
    require_kind(&entry, ModelKind::Embedding, "retrieval")?;
    let wait = wants_to_wait(headers);
    if let Some(upstream) = state.registry.upstream(&entry, wait).await? {
        // The name the upstream knows it by, as for the reranker.
        let model = entry.path.display().to_string();
        let encoder = UpstreamEncoder::new(upstream, &entry.id, &model, settings.dimension).await?;
        return Ok(ModelEncoder::Upstream(encoder));
    }
    let engine = state.registry.engine(&entry, wait).await?;
    Ok(ModelEncoder::Engine(EngineEncoder::new(
        engine,
        &entry.id,
        settings.dimension,
    )))
}

/// The reranker, loaded, when one is configured (`RAG_RERANK_MODEL` or the
/// reranker tier), here or on another server.
pub(super) async fn reranker(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Box<dyn rag::Reranker>>, ApiError> {
    let entry = match &state.settings.rag.rerank_model {
        Some(name) => state.registry.resolve_async(name).await?,
        None => match state.registry.list().into_iter().find(|e| {
            e.tier == Some(crate::settings::Tier::Reranker) && e.kind == ModelKind::Reranker
        }) {
            Some(entry) => entry,
            None => return Ok(None),
        },
    };
    require_kind(&entry, ModelKind::Reranker, "reranking")?;
    let wait = wants_to_wait(headers);
    if let Some(upstream) = state.registry.upstream(&entry, wait).await? {
        // The name the upstream knows it by: its `{TIER}_MODEL_PATH` (what
        // `vllm serve` was given), as a client would name it.
        let model = entry.path.display().to_string();
        return Ok(Some(Box::new(UpstreamReranker::new(upstream, &model))));
    }
    let engine = state.registry.engine(&entry, wait).await?;
    Ok(Some(Box::new(EngineReranker::new(engine, &entry.id))))
}

/// The search the request asks for, with the server's defaults.
pub(super) struct Retrieval {
    pub collection: String,
    pub query: String,
    pub options: SearchOptions,
}

/// The search fields of a search or chat request.
pub(super) struct Asked<'a> {
    pub collection: Option<&'a String>,
    pub query: &'a str,
    pub top_k: Option<usize>,
    /// What the request calls `top_k`.
    pub top_k_param: &'static str,
    pub score_threshold: Option<f32>,
    pub filter: Option<&'a Map<String, Value>>,
    pub mode: Option<&'a str>,
}

impl Retrieval {
    pub fn new(state: &AppState, asked: Asked<'_>) -> Result<Self, ApiError> {
        let Asked {
            collection,
            query,
            top_k,
            top_k_param,
            score_threshold,
            filter,
            mode,
        } = asked;
        let settings = &state.settings.rag;
        let top_k = top_k.unwrap_or(settings.top_k);
        if !(1..=MAX_TOP_K).contains(&top_k) {
            return Err(ApiError::invalid(
                top_k_param,
                format!("{top_k_param} is 1 to {MAX_TOP_K}"),
            ));
        }
        if let Some(t) = score_threshold.filter(|t| !t.is_finite()) {
            return Err(ApiError::invalid(
                "score_threshold",
                format!("{t} is not a number"),
            ));
        }
        let mode = match mode {
            None | Some("hybrid") => Mode::Hybrid,
            Some("dense") => Mode::Dense,
            Some("sparse") => Mode::Sparse,
            Some(other) => {
                return Err(ApiError::invalid(
                    "mode",
                    format!("mode {other:?}: use hybrid, dense or sparse"),
                ))
            }
        };
        if query.trim().is_empty() {
            return Err(ApiError::invalid("query", "query is empty"));
        }
        let filter = match filter {
            Some(object) => rag::Filter::from_object(object)?,
            None => None,
        };
        Ok(Self {
            collection: collection_name(collection).to_owned(),
            query: query.to_owned(),
            options: SearchOptions {
                top_k,
                score_threshold: Some(score_threshold.unwrap_or(settings.score_threshold)),
                filter,
                mode,
                rerank: false,
            },
        })
    }

    /// The hits (none from a default collection nothing was ingested into
    /// yet), and whether a reranker rescored them.
    pub async fn run(
        mut self,
        state: &AppState,
        headers: &HeaderMap,
        rerank: Option<bool>,
    ) -> Result<(Vec<rag::Hit>, bool), ApiError> {
        let library = library(state)?;
        if library.meta(&self.collection).await?.is_none() {
            if self.collection == DEFAULT_COLLECTION {
                return Ok((Vec::new(), false));
            }
            return Err(rag::Library::not_found(&self.collection).into());
        }
        let encoder = encoder(state, headers).await?;
        let reranker = match rerank {
            Some(false) => None,
            _ => reranker(state, headers).await?,
        };
        if rerank == Some(true) && reranker.is_none() {
            return Err(ApiError::invalid(
                "rerank",
                "no reranker is configured: set RERANKER_MODEL_PATH (the reranker tier) or \
                 RAG_RERANK_MODEL",
            ));
        }
        self.options.rerank = reranker.is_some();
        let hits = library
            .search(
                &self.collection,
                &encoder,
                reranker.as_deref(),
                &self.query,
                &self.options,
            )
            .await?;
        Ok((hits, self.options.rerank))
    }
}

pub(super) fn source(hit: rag::Hit) -> RagSource {
    RagSource {
        id: hit.id,
        document_id: hit.document_id,
        chunk: hit.chunk,
        text: hit.text,
        score: hit.score,
        similarity: hit.similarity,
        metadata: hit.metadata,
    }
}
