//! The embedded store: one SQLite file per collection under a directory (on
//! disk, or a temporary directory with `QDRANT_USE_MEMORY=true`), each with
//! its exact dense index and BM25 postings in memory. Calls run on tokio's
//! blocking pool; a panic inside the store there becomes a
//! [`RagError::Store`], never a crashed server.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::collection::Prepared;
use crate::store::{PageRequest, PointQuery, Store, StoredDocument};
use crate::{
    BoxFuture, Collection, CollectionMeta, CollectionStats, DocumentPage, Hit, Library, RagError,
};

pub(crate) struct LocalStore {
    root: PathBuf,
    /// Keeps a memory store's directory until the store goes.
    _temp: Option<tempfile::TempDir>,
    collections: Mutex<BTreeMap<String, Arc<Collection>>>,
    /// Collections whose files are there but would not open: never created
    /// over, never deleted (an operator looks at them first).
    broken: Mutex<BTreeMap<String, String>>,
    /// Creations take turns, so two first ingests cannot both make the file.
    creating: tokio::sync::Mutex<()>,
}

impl LocalStore {
    /// Opens every collection under `root` (a temporary directory when
    /// `None`). A collection that cannot open is logged and left on disk,
    /// untouched.
    pub(crate) fn open(root: Option<&Path>) -> Result<Self, RagError> {
        let (root, temp) = match root {
            Some(dir) => (dir.to_owned(), None),
            None => {
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

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Collection>>> {
        self.collections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, name: &str) -> Option<Arc<Collection>> {
        self.map().get(name).cloned()
    }

    /// The collection, or a 404 naming it.
    fn existing(&self, name: &str) -> Result<Arc<Collection>, RagError> {
        self.get(name).ok_or_else(|| Library::not_found(name))
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
}

impl Store for LocalStore {
    fn location(&self) -> String {
        format!("embedded, under {}", self.root.display())
    }

    fn bm25_over_token_ids(&self) -> bool {
        // FTS5's words (Porter stemming, Unicode folding).
        false
    }

    fn meta<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<CollectionMeta>, RagError>> {
        Box::pin(async move {
            match self.get(name) {
                Some(collection) => Ok(Some(collection.meta().clone())),
                None => self.check_not_broken(name).map(|()| None),
            }
        })
    }

    fn create(&self, meta: CollectionMeta) -> BoxFuture<'_, Result<CollectionMeta, RagError>> {
        Box::pin(async move {
            self.check_not_broken(&meta.name)?;
            let _turn = self.creating.lock().await;
            // Another first ingest may have made it while this one waited.
            if let Some(existing) = self.get(&meta.name) {
                return Ok(existing.meta().clone());
            }
            let name = meta.name.clone();
            let path = self.root.join(format!("{name}.sqlite"));
            let collection = blocking(move || {
                // Only what a creation that never committed left: a collection
                // that exists is in the map, a broken one was refused above.
                remove_files(&path);
                Collection::create(&path, meta).map(Arc::new)
            })
            .await?;
            let meta = collection.meta().clone();
            self.map().insert(name, collection);
            Ok(meta)
        })
    }

    fn collections(
        &self,
    ) -> BoxFuture<'_, Result<Vec<(CollectionMeta, CollectionStats)>, RagError>> {
        let all: Vec<Arc<Collection>> = self.map().values().cloned().collect();
        Box::pin(blocking(move || {
            Ok(all
                .iter()
                .filter_map(|c| match c.stats() {
                    Ok(stats) => Some((c.meta().clone(), stats)),
                    Err(error) => {
                        tracing::warn!(collection = %c.meta().name, %error, "a collection's counts could not be read");
                        None
                    }
                })
                .collect())
        }))
    }

    fn delete_collection<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RagError>> {
        Box::pin(async move {
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
        })
    }

    fn write<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        documents: Vec<Prepared>,
    ) -> BoxFuture<'a, Result<Vec<bool>, RagError>> {
        Box::pin(async move {
            let target = self.existing(&meta.name)?;
            blocking(move || {
                documents
                    .into_iter()
                    .map(|document| target.write_document(document))
                    .collect()
            })
            .await
        })
    }

    fn delete_document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RagError>> {
        Box::pin(async move {
            let collection = self.existing(name)?;
            let id = id.to_owned();
            blocking(move || collection.delete_document(&id)).await
        })
    }

    fn documents<'a>(
        &'a self,
        name: &'a str,
        page: PageRequest,
    ) -> BoxFuture<'a, Result<DocumentPage, RagError>> {
        Box::pin(async move {
            let collection = self.existing(name)?;
            blocking(move || {
                collection.documents(page.filter.as_ref(), page.limit, page.offset.as_deref())
            })
            .await
        })
    }

    fn document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredDocument>, RagError>> {
        Box::pin(async move {
            let collection = self.existing(name)?;
            let id = id.to_owned();
            blocking(move || collection.document(&id)).await
        })
    }

    fn search<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        query: PointQuery,
    ) -> BoxFuture<'a, Result<Vec<Hit>, RagError>> {
        Box::pin(async move {
            let collection = self.existing(&meta.name)?;
            blocking(move || {
                collection.search_points(
                    &query.text,
                    &query.encoded,
                    query.mode,
                    query.filter.as_ref(),
                    query.limit,
                )
            })
            .await
        })
    }
}

/// The collection a file holds, by its name (`<name>.sqlite`).
fn collection_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".sqlite")?;
    Library::check_collection_name(name).ok()?;
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
