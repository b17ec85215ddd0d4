//! `POST /v1/embeddings` and `POST /v1/rerank` requests. Their answers are
//! built as JSON: their shape depends on what the request asked for.

use serde::Deserialize;
use utoipa::ToSchema;

use super::common::PromptField;

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

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RerankDocument {
    Text(String),
    Object { text: String },
}

impl RerankDocument {
    pub fn text(&self) -> &str {
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
    /// How many results to return; selects the `data[{index, score, document}]` shape (raw scores).
    pub top_k: Option<usize>,
    /// Cohere's and Jina's name; selects the `results[{index, relevance_score, document: {text}}]` shape.
    pub top_n: Option<usize>,
    /// Include each document's text (default true).
    pub return_documents: Option<bool>,
    /// Cut (query, document) pairs longer than the model's limit instead of answering 400.
    pub truncate: Option<bool>,
}
