//! Retrieval: `/v1/rag/documents` (ingest, list, read, delete),
//! `/v1/rag/search`, `/v1/rag/chat` (an answer from the retrieved sources,
//! run through the chat pipeline), and `/v1/rag/collections`. The work is in
//! the `rag` crate; the models behind it are our engines (`crate::retrieval`).

use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use rag::Mode;
use serde_json::{json, Map, Value};

use super::pipeline::{cache_key, cached_events, check, generate, load, replayed};
use super::retrieval::{collection_name, library, source, Asked, Retrieval, DEFAULT_COLLECTION};
use super::{respond, Delivery};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, RagAnswer};
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::response_cache::Served;
use crate::chat::rag::{chat_request, RagQuestion};
use crate::keys::Caller;
use crate::state::AppState;
use crate::wire::{
    ErrorResponse, RagChatAnswer, RagChatRequest, RagCollectionQuery, RagListQuery,
    RagSearchAnswer, RagSearchRequest, RagSource, SseEvent,
};

#[utoipa::path(get, path = "/v1/rag/documents", params(RagListQuery), responses(
    (status = 200, description = "`{object: \"list\", data: [{id, chunks, metadata, created_at, preview}], next_offset}`"),
    (status = 400, description = "A bad filter, limit or offset", body = ErrorResponse),
    (status = 404, description = "No such collection", body = ErrorResponse)))]
pub async fn list_documents(
    State(state): State<AppState>,
    query: Result<Query<RagListQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let library = library(&state)?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "limit is 1 to 1000"));
    }
    let filter = match &query.filter {
        Some(text) => {
            let object: Map<String, Value> = serde_json::from_str(text).map_err(|e| {
                ApiError::invalid("filter", format!("filter must be a JSON object: {e}"))
            })?;
            rag::Filter::from_object(&object)?
        }
        None => None,
    };
    let name = collection_name(query.collection.as_ref());
    let page = match library
        .documents(name, filter, limit, query.offset.clone())
        .await
    {
        // Before the first ingest the default collection is empty, not missing.
        Err(rag::RagError::NotFound(_)) if name == DEFAULT_COLLECTION => rag::DocumentPage {
            documents: Vec::new(),
            next_offset: None,
        },
        page => page?,
    };
    Ok(axum::Json(json!({
        "object": "list",
        "data": page.documents,
        "next_offset": page.next_offset,
    })))
}

#[utoipa::path(get, path = "/v1/rag/documents/{id}", params(("id" = String, Path, description = "The document's id"), RagCollectionQuery), responses(
    (status = 200, description = "`{id, collection, metadata, chunks: [{id, chunk, text}]}`"),
    (status = 400, description = "Not a collection name, or a bad query string", body = ErrorResponse),
    (status = 404, description = "No such document or collection", body = ErrorResponse)))]
pub async fn get_document(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RagCollectionQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let name = named_collection(query)?;
    let found = library(&state)?.document(&name, &id).await?;
    let (metadata, chunks) = found.ok_or_else(|| no_document(&id, &name))?;
    Ok(axum::Json(json!({
        "id": id,
        "collection": name,
        "metadata": metadata,
        "chunks": chunks,
    })))
}

/// The collection a document route's query string names (`default` when
/// it names none).
fn named_collection(
    query: Result<Query<RagCollectionQuery>, QueryRejection>,
) -> Result<String, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let name = collection_name(query.collection.as_ref()).to_owned();
    rag::Library::check_collection_name(&name)?;
    Ok(name)
}

fn no_document(id: &str, collection: &str) -> ApiError {
    ApiError::not_found(format!("no document {id:?} in collection {collection:?}"))
}

#[utoipa::path(delete, path = "/v1/rag/documents/{id}", params(("id" = String, Path, description = "The document's id"), RagCollectionQuery), responses(
    (status = 200, description = "`{id, collection, deleted: true}`"),
    (status = 400, description = "Not a collection name, or a bad query string", body = ErrorResponse),
    (status = 404, description = "No such document or collection", body = ErrorResponse)))]
pub async fn delete_document(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RagCollectionQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let name = named_collection(query)?;
    if !library(&state)?.delete_document(&name, &id).await? {
        return Err(no_document(&id, &name));
    }
    Ok(axum::Json(
        json!({"id": id, "collection": name, "deleted": true}),
    ))
}

#[utoipa::path(get, path = "/v1/rag/collections", responses(
    (status = 200, description = "`{object: \"list\", data: [{name, embedding_model, dimension, sparse, colbert, chunk_tokens, chunk_overlap, documents, chunks, bytes, created_at}]}`")))]
pub async fn list_collections(
    State(state): State<AppState>,
) -> Result<axum::Json<Value>, ApiError> {
    let library = library(&state)?;
    let data: Vec<Value> = library
        .collections()
        .await?
        .into_iter()
        .map(|(meta, stats)| {
            json!({
                "name": meta.name,
                "embedding_model": meta.embedding_model,
                "dimension": meta.dimension,
                "sparse": meta.sparse,
                "colbert": meta.colbert,
                "chunk_tokens": meta.chunk.tokens,
                "chunk_overlap": meta.chunk.overlap,
                "documents": stats.documents,
                "chunks": stats.chunks,
                "bytes": stats.bytes,
                "created_at": meta.created_at,
            })
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})))
}

#[utoipa::path(delete, path = "/v1/rag/collections/{name}", params(("name" = String, Path, description = "The collection")), responses(
    (status = 200, description = "`{name, deleted: true}`"),
    (status = 400, description = "Not a collection name", body = ErrorResponse),
    (status = 404, description = "No such collection", body = ErrorResponse)))]
pub async fn delete_collection(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let library = library(&state)?;
    if !library.delete_collection(&name).await? {
        return Err(rag::Library::not_found(&name).into());
    }
    Ok(axum::Json(json!({"name": name, "deleted": true})))
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Hybrid => "hybrid",
        Mode::Dense => "dense",
        Mode::Sparse => "sparse",
    }
}

#[utoipa::path(post, path = "/v1/rag/search", request_body = RagSearchRequest, responses(
    (status = 200, description = "The best chunks, best first", body = RagSearchAnswer),
    (status = 400, description = "Bad parameters or filter", body = ErrorResponse),
    (status = 404, description = "No such collection", body = ErrorResponse),
    (status = 409, description = "The collection holds vectors of another embedding model", body = ErrorResponse),
    (status = 503, description = "No embedding model, or it is loading or its queue is full", body = ErrorResponse)))]
pub async fn rag_search(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<RagSearchRequest>,
) -> Result<axum::Json<RagSearchAnswer>, ApiError> {
    let retrieval = Retrieval::new(
        &state,
        Asked {
            collection: req.collection.as_ref(),
            query: &req.query,
            top_k: req.top_k,
            top_k_param: "top_k",
            score_threshold: req.score_threshold,
            filter: req.filter.as_ref(),
            mode: req.mode.as_deref(),
        },
    )?;
    let (collection, mode) = (retrieval.collection.clone(), retrieval.options.mode);
    let (hits, reranked) = retrieval.run(&state, &headers, req.rerank).await?;
    Ok(axum::Json(RagSearchAnswer {
        results: hits.into_iter().map(source).collect(),
        collection,
        mode: mode_name(mode).to_owned(),
        reranked,
    }))
}

#[utoipa::path(post, path = "/v1/rag/chat", request_body = RagChatRequest, responses(
    (status = 200, description = "The answer and its numbered sources; with `stream: true`, SSE events `{type: \"sources\"}`, `{type: \"delta\"}`…, `{type: \"done\"}`, then `[DONE]`", content((RagChatAnswer = "application/json"), (SseEvent = "text/event-stream"))),
    (status = 400, description = "Bad parameters", body = ErrorResponse),
    (status = 404, description = "No such collection or chat model", body = ErrorResponse),
    (status = 409, description = "The collection holds vectors of another embedding model", body = ErrorResponse),
    (status = 503, description = "A model is loading or the queue is full", body = ErrorResponse)))]
pub async fn rag_chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<RagChatRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let retrieval = Retrieval::new(
        &state,
        Asked {
            collection: req.collection.as_ref(),
            query: &req.query,
            top_k: req.num_context_docs,
            top_k_param: "num_context_docs",
            score_threshold: req.score_threshold,
            filter: req.filter.as_ref(),
            mode: req.mode.as_deref(),
        },
    )?;
    let model = req
        .model
        .clone()
        .or_else(|| state.settings.rag.chat_model.clone())
        .unwrap_or_else(|| "default".to_owned());
    let history = req.messages.clone().unwrap_or_default();
    let question = RagQuestion {
        model: &model,
        query: &req.query,
        history: &history,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        stream: req.stream.unwrap_or(false),
    };
    // Checked before any retrieval, so a bad request costs no embedding.
    chat_request(&question, String::new())?;
    let (hits, _) = retrieval.run(&state, &headers, req.rerank).await?;
    let chat = chat_request(&question, rag::prompt::system_message(&hits))?;
    let sources: Vec<RagSource> = hits.into_iter().map(source).collect();
    let (job, entry) = check(&state, &chat).await?;
    let head = AnswerHead {
        include_usage: false,
        ..AnswerHead::new("rag", &model, &chat.sampling)
    };
    let cache_key = cache_key(&state, &entry, &chat, &job);
    let delivery = Delivery {
        state: state.clone(),
        model_id: entry.id.clone(),
        endpoint: "rag_chat",
        cache_key: cache_key.clone(),
        started,
        keep: None,
        caller,
        ledger: Ledger::current(),
    };
    if let Some(events) = cached_events(&state, cache_key.as_ref()).await {
        let answer = RagAnswer::new(head, sources);
        return respond(answer, replayed(events), delivery, Served::FromCache).await;
    }
    let engine = load(&state, &headers, &entry).await?;
    let (events, _) = generate(&state, &entry, &engine, &chat, job, started).await?;
    respond(
        RagAnswer::new(head, sources),
        events,
        delivery,
        Served::Generated,
    )
    .await
}

/// A query string that does not parse, in our error shape.
fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(rejection.body_text()).with_code("invalid_query_string")
}
