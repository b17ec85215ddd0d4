//! The collections under one directory, and the async operations the server
//! calls: ingest (chunk, embed in shared batches, write), search (embed the
//! query, retrieve, rerank, threshold) and the collection listing. Store
//! calls run on tokio's blocking pool; a panic inside the store there becomes
//! a [`RagError::Store`], never a crashed server.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::chunk::{self, ChunkSize};
use crate::collection::Prepared;
use crate::search::{above_threshold, candidates, relevance};
use crate::{
    Collection, CollectionMeta, CollectionStats, Encoder, Hit, Ingested, NewDocument, Progress,
    RagError, Reranker, SearchOptions, Want,
};

/// Chunks embedded per encoder call (a group of whole documents reaching at
/// least this many): large enough to fill the encoder's batches, small
/// enough that other requests' inputs interleave and writes follow soon.
const ENCODE_GROUP: usize = 64;

/// Where collections live.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// On disk under this directory, surviving restarts.
    Disk(PathBuf),
    /// In a temporary directory removed at exit (`QDRANT_USE_MEMORY=true`).
    Memory,
}

pub struct Library {
    root: PathBuf,
    /// Keeps a memory library's directory until the library goes.
    _temp: Option<tempfile::TempDir>,
    collections: Mutex<BTreeMap<String, Arc<Collection>>>,
    /// Collections whose files are there but would not open: never created
    /// over, never deleted (an operator looks at them first).
    broken: Mutex<BTreeMap<String, String>>,
    /// Creations take turns, so two first ingests cannot both make the file.
    creating: tokio::sync::Mutex<()>,
}

impl Library {
    /// Opens every collection under the storage's directory. A collection
    /// that cannot open is logged and left on disk, untouched.
    pub fn open(storage: &Storage) -> Result<Self, RagError> {
        let (root, temp) = match storage {
            Storage::Disk(dir) => (dir.clone(), None),
            Storage::Memory => {
                let temp = tempfile::Builder::new()
                    .prefix("llmservice-rag-")
                    .tempdir()
                    .map_err(RagError::store)?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        fs::create_dir_all(&root).map_err(RagError::store)?;
        let mut collections = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for entry in fs::read_dir(&root).map_err(RagError::store)?.flatten() {
            let path = entry.path();
            let Some(name) = collection_of(&path) else {
                continue;
            };
            match Collection::open(&path) {
                Ok(Some(collection)) => {
                    collections.insert(name, Arc::new(collection));
                }
                Ok(None) => {
                    // Its creation never committed: nothing was ingested into it.
                    tracing::warn!(file = %path.display(), "removing an unfinished collection");
                    remove_files(&path);
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "a collection could not be opened; it is left as it is");
                    broken.insert(name, error.to_string());
                }
            }
        }
        Ok(Self {
            root,
            _temp: temp,
            collections: Mutex::new(collections),
            broken: Mutex::new(broken),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    /// Refuses names that cannot be collections (they are directory names).
    pub fn check_collection_name(name: &str) -> Result<(), RagError> {
        check_name(name)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Collection>>> {
        self.collections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every open collection.
    pub fn all(&self) -> Vec<Arc<Collection>> {
        self.map().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Collection>> {
        self.map().get(name).cloned()
    }

    /// The collection, or a 404 naming it.
    pub fn existing(&self, name: &str) -> Result<Arc<Collection>, RagError> {
        self.get(name).ok_or_else(|| Self::not_found(name))
    }

    /// The error for a collection that does not exist.
    pub fn not_found(name: &str) -> RagError {
        RagError::NotFound(format!("collection {name:?} does not exist"))
    }

    /// A store error if the collection's file is there but would not open.
    fn check_not_broken(&self, name: &str) -> Result<(), RagError> {
        let broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        match broken.get(name) {
            Some(reason) => Err(RagError::Store(format!(
                "collection {name:?} is on disk but could not be opened ({reason}); it is left untouched"
            ))),
            None => Ok(()),
        }
    }

    /// Every collection with its counts.
    pub async fn collections(&self) -> Result<Vec<(CollectionMeta, CollectionStats)>, RagError> {
        let all = self.all();
        blocking(move || {
            all.iter()
                .map(|c| Ok((c.meta().clone(), c.stats()?)))
                .collect()
        })
        .await
    }

    /// Removes a collection and its files; `false` if there was none.
    pub async fn delete_collection(&self, name: &str) -> Result<bool, RagError> {
        check_name(name)?;
        self.check_not_broken(name)?;
        let Some(collection) = self.map().remove(name) else {
            return Ok(false);
        };
        let path = collection.path().to_owned();
        // Requests still using it keep their handle; the files go now.
        blocking(move || {
            drop(collection);
            remove_files(&path);
            Ok(())
        })
        .await?;
        Ok(true)
    }

    /// Refuses an ingest into `name` before any work is done: a bad name, a
    /// collection on disk that would not open, or one whose vectors came
    /// from another model.
    pub fn check_ingest(&self, name: &str, encoder: &dyn Encoder) -> Result<(), RagError> {
        check_name(name)?;
        match self.get(name) {
            Some(existing) => existing.meta().check_encoder(encoder.info()),
            None => self.check_not_broken(name),
        }
    }

    /// The collection for vectors from `encoder`, created on first use.
    async fn for_ingest(
        &self,
        name: &str,
        encoder: &dyn Encoder,
        chunk: ChunkSize,
    ) -> Result<Arc<Collection>, RagError> {
        check_name(name)?;
        if let Some(existing) = self.get(name) {
            existing.meta().check_encoder(encoder.info())?;
            return Ok(existing);
        }
        self.check_not_broken(name)?;
        let _turn = self.creating.lock().await;
        // Another first ingest may have made it while this one waited.
        if let Some(existing) = self.get(name) {
            existing.meta().check_encoder(encoder.info())?;
            return Ok(existing);
        }
        let meta = CollectionMeta::new(name, encoder.info(), chunk);
        let path = self.root.join(format!("{name}.sqlite"));
        let created = blocking(move || {
            // Only what a creation that never committed left: a collection
            // that exists is in the map, a broken one was refused above.
            remove_files(&path);
            Collection::create(&path, meta).map(Arc::new)
        });
        let collection = created.await?;
        self.map().insert(name.to_owned(), collection.clone());
        Ok(collection)
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
        let collection = self.for_ingest(name, encoder, chunk_size).await?;
        let size = collection.meta().chunk;
        let want = Want {
            sparse: collection.meta().sparse == crate::Sparse::Model,
            colbert: collection.meta().colbert,
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
            for document in &mut group {
                document.encoded = encoded.by_ref().take(document.chunks.len()).collect();
            }
            let target = collection.clone();
            ingested.extend(
                blocking(move || {
                    group
                        .into_iter()
                        .map(|document| {
                            let (id, chunks) = (document.id.clone(), document.chunks.len());
                            let replaced = target.write_document(document)?;
                            Ok(Ingested {
                                id,
                                chunks,
                                replaced,
                            })
                        })
                        .collect::<Result<Vec<_>, RagError>>()
                })
                .await?,
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
        let collection = self.existing(name)?;
        collection.meta().check_encoder(encoder.info())?;
        if query.trim().is_empty() {
            return Err(RagError::invalid("query", "query is empty"));
        }
        let want = Want {
            sparse: collection.meta().sparse == crate::Sparse::Model,
            colbert: collection.meta().colbert && options.mode == crate::Mode::Hybrid,
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
        let limit = candidates(options);
        let (text, mode, filter) = (query.to_owned(), options.mode, options.filter.clone());
        let mut hits = blocking(move || {
            collection.search_points(&text, &encoded, mode, filter.as_ref(), limit)
        })
        .await?;
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

/// The collection a file holds, by its name (`<name>.sqlite`).
fn collection_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".sqlite")?;
    check_name(name).ok()?;
    path.is_file().then(|| name.to_owned())
}

/// Removes a collection's file and SQLite's companions (`-wal`, `-shm`).
fn remove_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = fs::remove_file(name);
    }
}

/// Runs store work on the blocking pool; a panic there is a store error.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RagError> + Send + 'static,
) -> Result<T, RagError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => Err(RagError::Store(format!("the vector store failed: {error}"))),
    }
}

/// Collection names are directory names: letters, digits, `_` and `-`.
pub(crate) fn check_name(name: &str) -> Result<(), RagError> {
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
