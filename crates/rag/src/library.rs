//! The async operations the server calls, over either store (see
//! [`crate::store`]): ingest (chunk, embed in shared batches, write), search
//! (embed the query, retrieve, rerank, threshold), the listings and deletes.

use std::path::PathBuf;

use crate::chunk::{self, ChunkSize};
use crate::collection::Prepared;
use crate::local::LocalStore;
use crate::qdrant::{QdrantConfig, QdrantStore};
use crate::search::{above_threshold, candidates, relevance};
use crate::store::{PageRequest, PointQuery, Store, StoredDocument};
use crate::{
    CollectionMeta, CollectionStats, DocumentPage, Encoder, Filter, Hit, Ingested, NewDocument,
    Progress, RagError, Reranker, SearchOptions, Want,
};

/// Chunks embedded per encoder call (a group of whole documents reaching at
/// least this many): large enough to fill the encoder's batches, small
/// enough that other requests' inputs interleave and writes follow soon.
const ENCODE_GROUP: usize = 64;

/// Where collections live.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// Embedded, on disk under this directory, surviving restarts.
    Disk(PathBuf),
    /// Embedded, in a temporary directory removed at exit (`QDRANT_USE_MEMORY=true`).
    Memory,
    /// A Qdrant server (`QDRANT_URL`, or `QDRANT_HOST` / `QDRANT_PORT`).
    Qdrant(QdrantConfig),
}

pub struct Library {
    store: Box<dyn Store>,
}

impl Library {
    /// Opens the store: every embedded collection under its directory, or a
    /// client of the Qdrant server (which is not reached until it is used).
    pub fn open(storage: &Storage) -> Result<Self, RagError> {
        let store: Box<dyn Store> = match storage {
            Storage::Disk(dir) => Box::new(LocalStore::open(Some(dir))?),
            Storage::Memory => Box::new(LocalStore::open(None)?),
            Storage::Qdrant(config) => Box::new(QdrantStore::new(config)?),
        };
        Ok(Self { store })
    }

    /// Where the collections are, for logs.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Refuses names that cannot be collections: letters, digits, `_` and
    /// `-` (embedded collections are file names; Qdrant's take the same).
    pub fn check_collection_name(name: &str) -> Result<(), RagError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(())
        } else {
            Err(RagError::invalid(
                "collection",
                format!(
                    "collection names have 1 to 64 letters, digits, '_' or '-': {:?} does not",
                    name.chars().take(80).collect::<String>()
                ),
            ))
        }
    }

    /// The error for a collection that does not exist.
    pub fn not_found(name: &str) -> RagError {
        RagError::NotFound(format!("collection {name:?} does not exist"))
    }

    /// Collection `name`'s record; `None` if there is none.
    pub async fn meta(&self, name: &str) -> Result<Option<CollectionMeta>, RagError> {
        Self::check_collection_name(name)?;
        self.store.meta(name).await
    }

    /// Collection `name`'s record, or a 404 naming it.
    async fn existing(&self, name: &str) -> Result<CollectionMeta, RagError> {
        self.meta(name).await?.ok_or_else(|| Self::not_found(name))
    }

    /// Every collection with its counts.
    pub async fn collections(&self) -> Result<Vec<(CollectionMeta, CollectionStats)>, RagError> {
        self.store.collections().await
    }

    /// Removes a collection and its documents; `false` if there was none.
    pub async fn delete_collection(&self, name: &str) -> Result<bool, RagError> {
        Self::check_collection_name(name)?;
        self.store.delete_collection(name).await
    }

    /// A page of collection `name`'s documents.
    pub async fn documents(
        &self,
        name: &str,
        filter: Option<Filter>,
        limit: usize,
        offset: Option<String>,
    ) -> Result<DocumentPage, RagError> {
        self.existing(name).await?;
        let page = PageRequest {
            filter,
            limit,
            offset,
        };
        self.store.documents(name, page).await
    }

    /// A document's metadata and chunks; `None` if there is none.
    pub async fn document(&self, name: &str, id: &str) -> Result<Option<StoredDocument>, RagError> {
        self.existing(name).await?;
        self.store.document(name, id).await
    }

    /// Deletes a document; `false` if there was none.
    pub async fn delete_document(&self, name: &str, id: &str) -> Result<bool, RagError> {
        // A collection that is not ours (on a shared Qdrant server) is refused here.
        self.existing(name).await?;
        self.store.delete_document(name, id).await
    }

    /// Refuses an ingest into `name` before any work is done: a bad name, a
    /// collection on disk that would not open, or one whose vectors came
    /// from another model.
    pub async fn check_ingest(&self, name: &str, encoder: &dyn Encoder) -> Result<(), RagError> {
        match self.meta(name).await? {
            Some(existing) => existing.check_encoder(encoder.info()),
            None => Ok(()),
        }
    }

    /// The record of collection `name` for vectors from `encoder`, created
    /// on first use.
    async fn for_ingest(
        &self,
        name: &str,
        encoder: &dyn Encoder,
        chunk: ChunkSize,
    ) -> Result<CollectionMeta, RagError> {
        let meta = match self.meta(name).await? {
            Some(existing) => existing,
            None => {
                let meta = CollectionMeta::new(name, encoder.info(), chunk);
                self.store.create(meta).await?
            }
        };
        meta.check_encoder(encoder.info())?;
        Ok(meta)
    }

    /// Chunks, embeds and writes documents into collection `name` (created on
    /// first use). Each document is written whole; a document whose id is
    /// already there replaces it. `progress` hears after each group of
    /// documents is written.
    pub async fn ingest(
        &self,
        name: &str,
        encoder: &dyn Encoder,
        documents: Vec<NewDocument>,
        chunk_size: ChunkSize,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Vec<Ingested>, RagError> {
        let meta = self.for_ingest(name, encoder, chunk_size).await?;
        let size = meta.chunk;
        let want = Want {
            sparse: meta.sparse == crate::Sparse::Model,
            colbert: meta.colbert,
        };
        // Every document is chunked first (so a bad one fails the request
        // before anything is written); then groups of documents are embedded
        // together and written, each document in its own transaction.
        let mut pending: Vec<Prepared> = Vec::with_capacity(documents.len());
        for (index, document) in documents.into_iter().enumerate() {
            let chunks = chunk::split(encoder, &document.text, size, document.markdown);
            if chunks.is_empty() {
                return Err(RagError::invalid(
                    "texts",
                    format!("document {index} has no text to index"),
                ));
            }
            pending.push(Prepared {
                id: document
                    .id
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                chunks,
                encoded: Vec::new(),
                tokens: Vec::new(),
                metadata: document.metadata,
            });
        }
        let mut done = Progress {
            documents: 0,
            documents_total: pending.len(),
            chunks: 0,
            chunks_total: pending.iter().map(|d| d.chunks.len()).sum(),
        };
        progress(done);
        let mut ingested = Vec::with_capacity(pending.len());
        let mut pending = pending.into_iter().peekable();
        while pending.peek().is_some() {
            let mut group = Vec::new();
            let mut texts = Vec::new();
            while let Some(document) = pending.next_if(|_| texts.len() < ENCODE_GROUP) {
                texts.extend(document.chunks.iter().cloned());
                group.push(document);
            }
            // At most a group's worth of chunks per call, even from one long document.
            let mut encoded = Vec::with_capacity(texts.len());
            for slice in texts.chunks(ENCODE_GROUP) {
                encoded.extend(encoder.encode(slice, want).await?);
            }
            if encoded.len() != texts.len() {
                return Err(RagError::store(
                    "the encoder returned fewer embeddings than texts",
                ));
            }
            let mut encoded = encoded.into_iter();
            let token_ids = meta.sparse == crate::Sparse::Bm25 && self.store.bm25_over_token_ids();
            for document in &mut group {
                document.encoded = encoded.by_ref().take(document.chunks.len()).collect();
                if token_ids {
                    document.tokens = document
                        .chunks
                        .iter()
                        .map(|c| encoder.token_ids(c))
                        .collect();
                }
            }
            let counts: Vec<(String, usize)> = group
                .iter()
                .map(|d| (d.id.clone(), d.chunks.len()))
                .collect();
            let replaced = self.store.write(&meta, group).await?;
            ingested.extend(
                counts
                    .into_iter()
                    .zip(replaced)
                    .map(|((id, chunks), replaced)| Ingested {
                        id,
                        chunks,
                        replaced,
                    }),
            );
            done.documents = ingested.len();
            done.chunks = ingested.iter().map(|d| d.chunks).sum();
            progress(done);
        }
        Ok(ingested)
    }

    /// The chunks of collection `name` that best answer `query`.
    pub async fn search(
        &self,
        name: &str,
        encoder: &dyn Encoder,
        reranker: Option<&dyn Reranker>,
        query: &str,
        options: &SearchOptions,
    ) -> Result<Vec<Hit>, RagError> {
        let meta = self.existing(name).await?;
        meta.check_encoder(encoder.info())?;
        if query.trim().is_empty() {
            return Err(RagError::invalid("query", "query is empty"));
        }
        let want = Want {
            sparse: meta.sparse == crate::Sparse::Model,
            colbert: meta.colbert && options.mode == crate::Mode::Hybrid,
        };
        // BM25 alone needs no embedding of the query.
        let bm25_only = options.mode == crate::Mode::Sparse && !want.sparse;
        let encoded = if bm25_only {
            crate::Encoded::default()
        } else {
            let texts = [query.to_owned()];
            encoder
                .encode(&texts, want)
                .await?
                .pop()
                .ok_or_else(|| RagError::store("the encoder returned no embedding"))?
        };
        let query_points = PointQuery {
            text: query.to_owned(),
            encoded,
            mode: options.mode,
            filter: options.filter.clone(),
            limit: candidates(options),
            tokens: if meta.sparse == crate::Sparse::Bm25 && self.store.bm25_over_token_ids() {
                encoder.token_ids(query)
            } else {
                Vec::new()
            },
        };
        let mut hits = self.store.search(&meta, query_points).await?;
        if let Some(reranker) = reranker.filter(|_| options.rerank && !hits.is_empty()) {
            let texts: Vec<String> = hits.iter().map(|h| h.text.clone()).collect();
            let scores = reranker.scores(query, &texts).await?;
            for (hit, score) in hits.iter_mut().zip(scores) {
                hit.score = relevance(score);
            }
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        let options = SearchOptions {
            rerank: options.rerank && reranker.is_some(),
            ..options.clone()
        };
        above_threshold(&mut hits, &options);
        hits.truncate(options.top_k);
        Ok(hits)
    }
}
