//! Retrieval: `/v1/rag/documents`, `/v1/rag/search`, `/v1/rag/chat` and
//! `/v1/rag/collections` (seed 003's requests work as they are).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Documents to index. `metadata` and `ids`, when given, have one entry per text.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RagDocumentsRequest {
    pub texts: Vec<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub metadata: Option<Vec<Option<Map<String, Value>>>>,
    /// Ids to give the documents; ingesting an id again replaces its document.
    pub ids: Option<Vec<String>>,
    /// Default `default`; created on first use for the embedding model.
    pub collection: Option<String>,
    /// Split the texts as Markdown (at headings, lists, code blocks).
    pub markdown: Option<bool>,
    /// Answer as server-sent events: `{type: "progress", documents,
    /// documents_total, chunks, chunks_total}` as groups of documents are
    /// written, then `{type: "done", ...}` with the answer, then `[DONE]`.
    pub stream: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RagDocumentsAnswer {
    pub collection: String,
    /// One entry per text, in order.
    pub documents: Vec<IngestedDocument>,
    /// Chunks written in all.
    pub chunks: usize,
    /// The embedding model's tokens over every chunk.
    pub embedded_tokens: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IngestedDocument {
    pub id: String,
    pub chunks: usize,
    /// Whether a document with this id was there and is now replaced.
    pub replaced: bool,
    /// The uploaded file's name (`/v1/rag/files`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A search of one collection.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RagSearchRequest {
    pub query: String,
    /// Default `RAG_TOP_K` (3).
    pub top_k: Option<usize>,
    /// The least relevance a result must have: the reranker's (0..1) when
    /// reranked, else the cosine similarity of the chunk's embedding (dense and
    /// hybrid). Not applied to sparse search. Default `RAG_SCORE_THRESHOLD`.
    pub score_threshold: Option<f32>,
    /// Metadata fields a result must have: `{"source": "docker-docs"}`, or a
    /// list of accepted values (`{"type": ["faq", "guide"]}`).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Map<String, Value>>,
    /// `hybrid` (default), `dense` or `sparse`.
    pub mode: Option<String>,
    /// Rescore with the reranker (default: true when one is configured).
    pub rerank: Option<bool>,
    pub collection: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RagSearchAnswer {
    pub results: Vec<RagSource>,
    pub collection: String,
    /// Which retrieval ranked the results, and whether a reranker rescored them.
    pub mode: String,
    pub reranked: bool,
}

/// A retrieved chunk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RagSource {
    /// The chunk's id.
    pub id: String,
    pub document_id: String,
    pub chunk: u64,
    pub text: String,
    /// The ranking's score (see `score_threshold`).
    pub score: f32,
    /// Cosine similarity of the chunk's embedding to the query's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    #[schema(value_type = Object)]
    pub metadata: Value,
}

/// A question answered from a collection's documents.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RagChatRequest {
    pub query: String,
    pub max_tokens: Option<u32>,
    /// How many chunks to give the model (default `RAG_TOP_K`).
    pub num_context_docs: Option<usize>,
    /// The chat model (default: the default chat tier).
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub stream: Option<bool>,
    pub collection: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Map<String, Value>>,
    pub score_threshold: Option<f32>,
    pub mode: Option<String>,
    pub rerank: Option<bool>,
    /// Earlier turns of the conversation (OpenAI chat messages), before the query.
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<Value>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RagChatAnswer {
    pub answer: String,
    /// The chunks the model was given, in the order it cites them ([1] first).
    pub sources: Vec<RagSource>,
    pub model: String,
    /// `stop`, or `length` when `max_tokens` cut the answer.
    pub finish_reason: String,
    #[schema(value_type = Object)]
    pub usage: Value,
}

/// One event of a streamed `/v1/rag/chat` answer: the sources, then the
/// answer's text pieces, then the finish with usage.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RagChatEvent {
    Sources {
        sources: Vec<RagSource>,
        model: String,
    },
    Delta {
        delta: String,
    },
    Done {
        finish_reason: String,
        #[schema(value_type = Object)]
        usage: Value,
    },
}

/// `GET /v1/rag/documents` query string.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RagListQuery {
    pub collection: Option<String>,
    /// At most this many documents (default 20, at most 1000).
    pub limit: Option<usize>,
    /// The `next_offset` of the previous page.
    pub offset: Option<String>,
    /// A metadata filter as JSON (`{"source": "docker-docs"}`).
    pub filter: Option<String>,
}

/// `collection` in a query string.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RagCollectionQuery {
    pub collection: Option<String>,
}

/// `rag` on a chat completion request: which collection to answer from, and
/// how to search it (the fields of `/v1/rag/search`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct RagOptions {
    pub collection: Option<String>,
    pub top_k: Option<usize>,
    pub score_threshold: Option<f32>,
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Map<String, Value>>,
    pub mode: Option<String>,
    pub rerank: Option<bool>,
}
