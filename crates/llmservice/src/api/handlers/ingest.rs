//! Ingestion: `POST /v1/rag/documents` (texts in JSON) and `POST
//! /v1/rag/files` (uploads: text, Markdown, HTML, PDF). Both answer the
//! document ids and chunk counts, whole or, with `stream`, as server-sent
//! progress while groups of documents are written. A streamed ingest goes on
//! when its client leaves: every document is written whole, so what was sent
//! ends up stored (or refused with a reason) either way.

use std::collections::HashSet;
use std::time::Instant;

use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use rag::extract::FileKind;
use serde_json::{json, Map, Value};

use super::retrieval::{collection_name, encoder, library};
use crate::analytics::Ledger;
use crate::api::error::ApiError;
use crate::api::json::Json;
use crate::api::sse;
use crate::keys::Caller;
use crate::retrieval::ModelEncoder;
use crate::state::AppState;
use crate::wire::{
    ErrorResponse, IngestedDocument, RagDocumentsAnswer, RagDocumentsRequest, SseEvent,
};

/// Most texts one ingest request may carry.
const MAX_TEXTS: usize = 2048;
/// Most files one upload may carry.
const MAX_FILES: usize = 100;

#[utoipa::path(post, path = "/v1/rag/documents", request_body = RagDocumentsRequest, responses(
    (status = 200, description = "Each text's document id and chunk count; with `stream: true`, SSE events `{type: \"progress\", documents, documents_total, chunks, chunks_total}`…, `{type: \"done\", ...answer}`, then `[DONE]`", content((RagDocumentsAnswer = "application/json"), (SseEvent = "text/event-stream"))),
    (status = 400, description = "No texts, metadata or ids not one per text, a bad collection name", body = ErrorResponse),
    (status = 409, description = "The collection holds vectors of another embedding model", body = ErrorResponse),
    (status = 503, description = "No embedding model, or it is loading or busy", body = ErrorResponse),
    (status = 507, description = "The server's disk is full: the document that met it and those after it were not stored", body = ErrorResponse)))]
pub async fn add_documents(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    Json(req): Json<RagDocumentsRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let documents = new_documents(&req)?;
    let job = Ingest {
        collection: collection_name(req.collection.as_ref()).to_owned(),
        sources: None,
        endpoint: "rag_documents",
        started,
        caller,
    };
    let encoder = job.accepted(&state, &headers).await?;
    job.run(state, encoder, documents, req.stream.unwrap_or(false))
        .await
}

#[utoipa::path(post, path = "/v1/rag/files", request_body(content_type = "multipart/form-data", description = "Parts: `file` (one or more, each with its file name: .txt, .md, .html, .pdf, or a matching Content-Type), `collection`, `metadata` (a JSON object for every file), `id` (one per file, in order; an id sent again replaces its document), `stream` (true for progress events). Each document's metadata has `source` (the file name) and `file_type`."), responses(
    (status = 200, description = "Each file's document id, chunk count and source, in order; with `stream`, progress events as for `/v1/rag/documents`", content((RagDocumentsAnswer = "application/json"), (SseEvent = "text/event-stream"))),
    (status = 400, description = "No file, a file of a kind not read, one without text or that does not parse, a bad field", body = ErrorResponse),
    (status = 409, description = "The collection holds vectors of another embedding model", body = ErrorResponse),
    (status = 413, description = "The upload is larger than RAG_MAX_UPLOAD_BYTES", body = ErrorResponse),
    (status = 503, description = "No embedding model, or it is loading or busy", body = ErrorResponse)))]
pub async fn add_files(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::bad_request(format!(
            "expected a multipart/form-data upload: {}",
            rejection.body_text()
        ))
    })?;
    let form = Form::read(&mut multipart).await?;
    let job = Ingest {
        collection: form
            .collection
            .clone()
            .unwrap_or_else(|| collection_name(None).to_owned()),
        sources: Some(form.files.iter().map(|f| f.name.clone()).collect()),
        endpoint: "rag_files",
        started,
        caller,
    };
    // Refused before the files are parsed where no parsing is needed to tell.
    let encoder = job.accepted(&state, &headers).await?;
    let stream = form.stream;
    let documents = form.documents(&state).await?;
    job.run(state, encoder, documents, stream).await
}

/// One uploaded file.
struct Upload {
    name: String,
    kind: FileKind,
    bytes: Vec<u8>,
}

/// An upload's fields, checked.
#[derive(Default)]
struct Form {
    files: Vec<Upload>,
    collection: Option<String>,
    metadata: Map<String, Value>,
    ids: Vec<String>,
    stream: bool,
}

impl Form {
    async fn read(multipart: &mut Multipart) -> Result<Self, ApiError> {
        let mut form = Self::default();
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            match name.as_str() {
                "file" | "files" | "file[]" | "files[]" => {
                    if form.files.len() == MAX_FILES {
                        return Err(ApiError::invalid(
                            "file",
                            format!("at most {MAX_FILES} files per upload"),
                        ));
                    }
                    form.files.push(upload(field).await?);
                }
                "collection" => form.collection = Some(text(field).await?),
                "metadata" => {
                    form.metadata = serde_json::from_str(&text(field).await?).map_err(|e| {
                        ApiError::invalid(
                            "metadata",
                            format!("metadata must be a JSON object: {e}"),
                        )
                    })?;
                }
                "id" | "ids" | "id[]" | "ids[]" => form.ids.push(text(field).await?),
                "stream" => {
                    form.stream = match text(field).await?.trim() {
                        "true" | "1" => true,
                        "false" | "0" | "" => false,
                        other => {
                            return Err(ApiError::invalid(
                                "stream",
                                format!("stream is true or false, not {other:?}"),
                            ))
                        }
                    }
                }
                other => {
                    return Err(ApiError::invalid(
                        "file",
                        format!(
                            "unknown form field {other:?}: send file, collection, metadata, id \
                             or stream"
                        ),
                    ))
                }
            }
        }
        if form.files.is_empty() {
            return Err(ApiError::invalid(
                "file",
                "no file: send each file as a part named \"file\" with its file name",
            ));
        }
        if !form.ids.is_empty() && form.ids.len() != form.files.len() {
            return Err(ApiError::invalid(
                "id",
                format!(
                    "{} ids for {} files: give one per file, in order, or none",
                    form.ids.len(),
                    form.files.len()
                ),
            ));
        }
        if let Some(name) = &form.collection {
            rag::Library::check_collection_name(name)?;
        }
        check_ids(&form.ids, "id")?;
        Ok(form)
    }

    /// Each file's text (HTML and PDF read in a child process) as a document
    /// whose metadata names the file.
    async fn documents(self, state: &AppState) -> Result<Vec<rag::NewDocument>, ApiError> {
        let mut documents = Vec::with_capacity(self.files.len());
        for (index, file) in self.files.into_iter().enumerate() {
            let text = crate::extract::file_text(
                &state.settings.rag.extractor,
                state.settings.rag.extract_timeout,
                file.kind,
                file.bytes,
            )
            .await
            .map_err(|e| match e {
                rag::RagError::Invalid { param, message } => {
                    ApiError::invalid(param, format!("{}: {message}", file.name))
                }
                other => other.into(),
            })?;
            let mut metadata = Map::new();
            metadata.insert("source".into(), file.name.into());
            metadata.insert("file_type".into(), file.kind.name().into());
            metadata.extend(self.metadata.clone());
            documents.push(rag::NewDocument {
                id: self.ids.get(index).cloned(),
                text,
                metadata,
                markdown: file.kind.markdown(),
            });
        }
        Ok(documents)
    }
}

async fn upload(field: Field<'_>) -> Result<Upload, ApiError> {
    let name = field
        .file_name()
        .map(|n| n.rsplit(['/', '\\']).next().unwrap_or(n).to_owned())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "file",
                "a file part has no file name (filename= in its Content-Disposition)",
            )
        })?;
    let content_type = field.content_type().map(str::to_owned);
    let bytes = field.bytes().await.map_err(multipart_error)?.to_vec();
    if bytes.is_empty() {
        return Err(ApiError::invalid("file", format!("{name} is empty")));
    }
    let kind = FileKind::detect(&name, content_type.as_deref(), &bytes).ok_or_else(|| {
        ApiError::invalid(
            "file",
            format!(
                "{name} ({}): only text (.txt), Markdown (.md), HTML (.html) and PDF (.pdf) \
                 files are read",
                content_type.as_deref().unwrap_or("no content type")
            ),
        )
        .with_code("unsupported_file_type")
    })?;
    Ok(Upload { name, kind, bytes })
}

async fn text(field: Field<'_>) -> Result<String, ApiError> {
    let name = field.name().unwrap_or_default().to_owned();
    field.text().await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            multipart_error(e)
        } else {
            ApiError::bad_request(format!("form field {name:?}: {e}"))
        }
    })
}

fn multipart_error(error: MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::bad_request(
                "the upload is larger than this server accepts (RAG_MAX_UPLOAD_BYTES)",
            )
        }
        .with_code("request_too_large")
    } else {
        ApiError::bad_request(format!("could not read the upload: {}", error.body_text()))
    }
}

/// Ids given for documents: 1 to 256 characters without control characters,
/// none twice.
fn check_ids(ids: &[String], param: &'static str) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    for (index, id) in ids.iter().enumerate() {
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                param,
                format!("{param}[{index}]: ids have 1 to 256 characters, none of them control characters"),
            ));
        }
        if !seen.insert(id) {
            return Err(ApiError::invalid(
                param,
                format!("{param}[{index}]: {id:?} is given twice"),
            ));
        }
    }
    Ok(())
}

/// The request's documents, checked: texts present, metadata and ids one per
/// text, ids unique.
fn new_documents(req: &RagDocumentsRequest) -> Result<Vec<rag::NewDocument>, ApiError> {
    let n = req.texts.len();
    if n == 0 {
        return Err(ApiError::invalid(
            "texts",
            "texts is empty: send at least one text",
        ));
    }
    if n > MAX_TEXTS {
        return Err(ApiError::invalid(
            "texts",
            format!("{n} texts in one request; send at most {MAX_TEXTS}"),
        ));
    }
    if let Some(index) = req.texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::invalid(
            "texts",
            format!("texts[{index}] is empty"),
        ));
    }
    for (param, len) in [
        ("metadata", req.metadata.as_ref().map(Vec::len)),
        ("ids", req.ids.as_ref().map(Vec::len)),
    ] {
        if let Some(len) = len.filter(|&len| len != n) {
            return Err(ApiError::invalid(
                param,
                format!("{param} has {len} entries for {n} texts: give one per text"),
            ));
        }
    }
    if let Some(ids) = &req.ids {
        check_ids(ids, "ids")?;
    }
    Ok(req
        .texts
        .iter()
        .enumerate()
        .map(|(index, text)| rag::NewDocument {
            id: req.ids.as_ref().map(|ids| ids[index].clone()),
            text: text.clone(),
            metadata: req
                .metadata
                .as_ref()
                .and_then(|m| m[index].clone())
                .unwrap_or_default(),
            markdown: req.markdown.unwrap_or(false),
        })
        .collect())
}

/// An ingest to run, and what its answer and log line say.
struct Ingest {
    collection: String,
    /// The uploaded files' names, one per document.
    sources: Option<Vec<String>>,
    endpoint: &'static str,
    started: Instant,
    caller: Caller,
}

/// What a streamed ingest sends its client.
enum Event {
    Progress(rag::Progress),
    Done(RagDocumentsAnswer),
    Failed(ApiError),
}

impl Ingest {
    /// The encoder to ingest with, once the store, the embedding model and
    /// the collection accept the ingest: refusals that need no work come
    /// before any is done or any answer starts.
    async fn accepted(
        &self,
        state: &AppState,
        headers: &HeaderMap,
    ) -> Result<ModelEncoder, ApiError> {
        library(state)?;
        let encoder = encoder(state, headers).await?;
        library(state)?
            .check_ingest(&self.collection, &encoder)
            .await?;
        Ok(encoder)
    }

    async fn run(
        self,
        state: AppState,
        encoder: ModelEncoder,
        documents: Vec<rag::NewDocument>,
        stream: bool,
    ) -> Result<Response, ApiError> {
        if !stream {
            let answer = self.write(&state, &encoder, documents, &|_| {}).await?;
            return Ok(axum::Json(answer).into_response());
        }
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let work = async move {
            let progress = |p| {
                let _ = sender.send(Event::Progress(p));
            };
            let event = match self.write(&state, &encoder, documents, &progress).await {
                Ok(answer) => Event::Done(answer),
                Err(error) => Event::Failed(error),
            };
            let _ = sender.send(event);
        };
        match Ledger::current() {
            Some(ledger) => tokio::spawn(ledger.scope(work)),
            None => tokio::spawn(work),
        };
        let events = tokio_stream_of(receiver).map(|event| {
            sse::data(match event {
                Event::Progress(p) => json!({
                    "type": "progress",
                    "documents": p.documents,
                    "documents_total": p.documents_total,
                    "chunks": p.chunks,
                    "chunks_total": p.chunks_total,
                })
                .to_string(),
                Event::Done(answer) => {
                    let mut body = serde_json::to_value(&answer).unwrap_or_default();
                    body["type"] = "done".into();
                    body.to_string()
                }
                Event::Failed(error) => sse::sse_error(error),
            })
        });
        Ok(sse::sse(
            events.chain(futures_util::stream::iter([sse::done()])),
        ))
    }

    /// Chunks, embeds and writes the documents, then logs and answers.
    async fn write(
        &self,
        state: &AppState,
        encoder: &ModelEncoder,
        documents: Vec<rag::NewDocument>,
        progress: &(dyn Fn(rag::Progress) + Sync),
    ) -> Result<RagDocumentsAnswer, ApiError> {
        let size = encoder.chunk_size(&state.settings.rag)?;
        let ingested = library(state)?
            .ingest(&self.collection, encoder, documents, size, progress)
            .await?;
        let tokens = encoder.tokens();
        super::log_encoded(
            state,
            self.caller.clone(),
            &rag::Encoder::info(encoder).model,
            self.endpoint,
            tokens as u32,
            self.started,
        );
        Ok(RagDocumentsAnswer {
            collection: self.collection.clone(),
            chunks: ingested.iter().map(|d| d.chunks).sum(),
            documents: ingested
                .into_iter()
                .enumerate()
                .map(|(index, d)| IngestedDocument {
                    id: d.id,
                    chunks: d.chunks,
                    replaced: d.replaced,
                    source: self.sources.as_ref().and_then(|s| s.get(index).cloned()),
                })
                .collect(),
            embedded_tokens: tokens,
        })
    }
}

/// The receiving end of a channel as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}
