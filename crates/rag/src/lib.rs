//! Retrieval for chat, without HTTP: documents are cut into chunks sized in
//! the embedding model's tokens ([`chunk`]), embedded through the caller's
//! [`Encoder`], and kept in collections ([`Library`], [`Collection`]: a
//! SQLite file each, on disk or in a temporary directory, with an exact dense
//! index in memory). A search fuses dense and sparse (BM25 or learned lexical
//! weights) retrieval by reciprocal rank fusion, may rescore with ColBERT
//! vectors and a [`Reranker`], and [`prompt`] turns the hits into numbered
//! sources the model is asked to cite. Collections live in the embedded
//! store or on a Qdrant server ([`Storage`]). [`extract`] turns uploaded files
//! (text, Markdown, HTML, PDF) into text to ingest.

pub mod chunk;
mod collection;
mod dense;
mod encoder;
mod error;
pub mod extract;
mod filter;
mod library;
mod local;
pub mod prompt;
mod qdrant;
mod search;
mod store;
mod terms;

pub use collection::{
    ChunkText, Collection, CollectionMeta, CollectionStats, DocumentPage, DocumentSummary, Sparse,
};
pub use encoder::{BoxFuture, Encoded, Encoder, EncoderInfo, Reranker, Want};
pub use error::RagError;
pub use filter::Filter;
pub use library::{Library, Storage};
pub use qdrant::QdrantConfig;
pub use search::{Hit, Mode, SearchOptions};

/// A document to ingest: its text, metadata and id (generated when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDocument {
    pub id: Option<String>,
    pub text: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Whether the text is Markdown (split at its structure).
    pub markdown: bool,
}

/// How far an ingest has come: documents and chunks written of those sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    pub documents: usize,
    pub documents_total: usize,
    pub chunks: usize,
    pub chunks_total: usize,
}

/// What ingesting one document did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ingested {
    pub id: String,
    pub chunks: usize,
    /// Whether an earlier document with this id was replaced.
    pub replaced: bool,
}
