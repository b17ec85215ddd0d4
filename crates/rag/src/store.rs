//! Where collections are kept. One data model (collections that record their
//! embedding model; documents written whole as numbered chunks with dense,
//! sparse and ColBERT vectors; metadata filters; dense, sparse and fused
//! search) in two places: the embedded store ([`crate::local`], a SQLite file
//! per collection) and a Qdrant server ([`crate::qdrant`], over its REST API).
//! [`crate::Library`] runs the shared work (chunking, embedding in shared
//! batches, reranking, thresholds) over either.

use serde_json::Value;

use crate::collection::Prepared;
use crate::{
    BoxFuture, ChunkText, CollectionMeta, CollectionStats, DocumentPage, Encoded, Filter, Hit,
    Mode, RagError,
};

/// A search as a store runs it: the query's text and embeddings, already
/// computed, and how many candidates to return.
#[derive(Debug, Clone)]
pub(crate) struct PointQuery {
    pub text: String,
    pub encoded: Encoded,
    pub mode: Mode,
    pub filter: Option<Filter>,
    pub limit: usize,
    /// The query's token ids, for stores that keep BM25 over them.
    pub tokens: Vec<u32>,
}

/// A page of a collection's document listing.
#[derive(Debug, Clone)]
pub(crate) struct PageRequest {
    pub filter: Option<Filter>,
    pub limit: usize,
    /// A `next_offset` an earlier page returned.
    pub offset: Option<String>,
}

/// A document and its chunks, in order.
pub(crate) type StoredDocument = (Value, Vec<ChunkText>);

/// The operations every store has. A collection that does not exist is a
/// [`RagError::NotFound`] wherever one is named.
pub(crate) trait Store: Send + Sync {
    /// Where the collections are, for logs.
    fn location(&self) -> String;

    /// Whether BM25 here is over the embedding tokenizer's ids: then
    /// [`Prepared::tokens`] and [`PointQuery::tokens`] are filled in.
    fn bm25_over_token_ids(&self) -> bool;

    /// Collection `name`'s record, `None` if there is no such collection.
    fn meta<'a>(&'a self, name: &'a str)
        -> BoxFuture<'a, Result<Option<CollectionMeta>, RagError>>;

    /// Creates the collection `meta` describes unless one of that name
    /// exists; either way, the record of the one there now.
    fn create(&self, meta: CollectionMeta) -> BoxFuture<'_, Result<CollectionMeta, RagError>>;

    /// Every collection with its counts.
    fn collections(
        &self,
    ) -> BoxFuture<'_, Result<Vec<(CollectionMeta, CollectionStats)>, RagError>>;

    /// Removes a collection and everything in it; `false` if there was none.
    fn delete_collection<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RagError>>;

    /// Writes each document whole, replacing a document with its id; for
    /// each, whether there was one.
    fn write<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        documents: Vec<Prepared>,
    ) -> BoxFuture<'a, Result<Vec<bool>, RagError>>;

    /// Deletes a document; `false` if there was none.
    fn delete_document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RagError>>;

    fn documents<'a>(
        &'a self,
        name: &'a str,
        page: PageRequest,
    ) -> BoxFuture<'a, Result<DocumentPage, RagError>>;

    /// A document's metadata and chunks; `None` if there is none.
    fn document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredDocument>, RagError>>;

    /// The best `query.limit` chunks, best first; each hit's `similarity` is
    /// its embedding's cosine similarity to the query's.
    fn search<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        query: PointQuery,
    ) -> BoxFuture<'a, Result<Vec<Hit>, RagError>>;
}
