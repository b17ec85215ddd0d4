//! One collection: a SQLite file holding its documents, their chunks with
//! their embeddings, an FTS5 index of the chunks' text (BM25), and the record
//! of which embedding model its vectors came from; plus the dense index and
//! the BM25 postings in memory, rebuilt from the file on open.
//!
//! Every method blocks (disk I/O, scans): the server calls them off its async
//! threads. Each document is written in one transaction, so a crash leaves
//! it whole or absent; SQLite's WAL recovers the file on the next open.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::chunk::ChunkSize;
use crate::dense::DenseIndex;
use crate::terms::{TermIndex, Terms};
use crate::{Encoded, EncoderInfo, Filter, RagError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    metadata TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    text TEXT NOT NULL,
    dense BLOB NOT NULL,
    colbert BLOB
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS sparse (chunk INTEGER NOT NULL, token INTEGER NOT NULL, weight REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sparse_token ON sparse(token);
CREATE INDEX IF NOT EXISTS sparse_chunk ON sparse(chunk);
CREATE TRIGGER IF NOT EXISTS chunks_added AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_removed AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    DELETE FROM sparse WHERE chunk = old.id;
END;
";

/// FTS5 as a tokenizer: texts written to `temp.tokenizer` (contentless,
/// emptied after each use; the same tokenizer as `chunks_fts`) are read back
/// as their terms, one row per token.
const TOKENIZER: &str = "
CREATE VIRTUAL TABLE IF NOT EXISTS temp.tokenizer USING fts5(
    text, content='', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE IF NOT EXISTS temp.tokenizer_terms USING fts5vocab(temp, tokenizer, instance);
CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunk_terms USING fts5vocab(main, chunks_fts, instance);
";

/// Where a collection's sparse scores come from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sparse {
    /// BM25 over the chunks' words (FTS5: Porter stemming, Unicode folding),
    /// its IDF from the collection's own statistics, current as documents
    /// come and go.
    Bm25,
    /// The embedding model's learned lexical weights (BGE-M3's sparse head).
    Model,
}

/// What a collection records about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionMeta {
    pub name: String,
    pub embedding_model: String,
    pub dimension: usize,
    pub sparse: Sparse,
    pub colbert: bool,
    pub chunk: ChunkSize,
    pub created_at: i64,
}

impl CollectionMeta {
    /// A new collection's record for vectors from `encoder`.
    pub fn new(name: &str, encoder: &EncoderInfo, chunk: ChunkSize) -> Self {
        Self {
            name: name.to_owned(),
            embedding_model: encoder.model.clone(),
            dimension: encoder.dimension,
            sparse: if encoder.sparse_head {
                Sparse::Model
            } else {
                Sparse::Bm25
            },
            colbert: encoder.colbert_head,
            chunk,
            created_at: chrono::Utc::now().timestamp(),
        }
    }

    /// A conflict unless `encoder` makes the vectors this collection holds.
    pub fn check_encoder(&self, encoder: &EncoderInfo) -> Result<(), RagError> {
        if self.embedding_model != encoder.model || self.dimension != encoder.dimension {
            return Err(RagError::Conflict(format!(
                "collection {:?} holds {}-dimensional vectors from {:?}, but the embedding \
                 model now is {:?} ({} dimensions): mixing them would make search \
                 meaningless; use another collection, or delete this one and ingest again",
                self.name, self.dimension, self.embedding_model, encoder.model, encoder.dimension
            )));
        }
        // The same model without the heads its vectors came from (head files
        // moved away): its sparse or ColBERT side would be empty.
        let sparse_lost = self.sparse == Sparse::Model && !encoder.sparse_head;
        if sparse_lost || (self.colbert && !encoder.colbert_head) {
            return Err(RagError::Conflict(format!(
                "collection {:?} holds vectors from {:?} with its sparse and ColBERT heads,                  which the model has no longer: put the head files back, or delete the                  collection and ingest again",
                self.name, self.embedding_model
            )));
        }
        Ok(())
    }
}

/// Counts for dashboards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectionStats {
    pub documents: u64,
    pub chunks: u64,
    /// Bytes on disk (the file and its WAL); not known for a Qdrant server.
    pub bytes: Option<u64>,
}

/// A document as listings show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocumentSummary {
    pub id: String,
    pub chunks: u64,
    pub metadata: Value,
    pub created_at: i64,
    /// The start of its first chunk.
    pub preview: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocumentPage {
    pub documents: Vec<DocumentSummary>,
    /// Pass as `offset` for the next page; `None` on the last page.
    pub next_offset: Option<String>,
}

/// One chunk of a document, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkText {
    pub id: String,
    pub chunk: u64,
    pub text: String,
}

/// A document ready to write: its chunks and their embeddings.
pub(crate) struct Prepared {
    pub id: String,
    pub chunks: Vec<String>,
    pub encoded: Vec<Encoded>,
    /// Each chunk's token ids, where the store keeps BM25 over them.
    pub tokens: Vec<Vec<u32>>,
    pub metadata: Map<String, Value>,
}

/// A stored chunk as search reads it.
pub(crate) struct StoredChunk {
    pub id: i64,
    pub chunk: u64,
    pub text: String,
    pub document_id: String,
    pub metadata: Value,
    pub colbert: Option<Vec<Vec<f32>>>,
}

pub struct Collection {
    meta: CollectionMeta,
    path: PathBuf,
    /// The file `conn` opened, to tell when the path no longer names it.
    file: Option<FileId>,
    conn: Mutex<Connection>,
    dense: RwLock<DenseIndex>,
    /// BM25's postings (empty when the model has its own lexical weights).
    terms: RwLock<TermIndex>,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("meta", &self.meta)
            .finish()
    }
}

fn sql_error(error: rusqlite::Error) -> RagError {
    match error.sqlite_error_code() {
        // The transaction rolled back: nothing of the write is stored.
        Some(rusqlite::ErrorCode::DiskFull) => RagError::Full(error.to_string()),
        _ => RagError::store(error),
    }
}

/// A file's identity (device and inode): a path that names another file, or
/// none, means the open one was deleted or replaced under the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Self(m.dev(), m.ino()))
    }

    #[cfg(not(unix))]
    fn of(_path: &Path) -> Option<Self> {
        None
    }
}

fn connect(path: &Path) -> Result<Connection, RagError> {
    let conn = Connection::open(path).map_err(sql_error)?;
    conn.execute_batch(
        // FULL: a document acknowledged is on disk, power loss included.
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; \
         PRAGMA temp_store = MEMORY;",
    )
    .map_err(sql_error)?;
    Ok(conn)
}

/// The terms of each text, by FTS5's tokenizer, keyed by the text's index.
fn tokenize(conn: &Connection, texts: &[&str]) -> Result<HashMap<i64, Terms>, RagError> {
    let result = (|| {
        let mut insert =
            conn.prepare_cached("INSERT INTO temp.tokenizer (rowid, text) VALUES (?1, ?2)")?;
        for (index, text) in texts.iter().enumerate() {
            insert.execute(params![index as i64, text])?;
        }
        let mut terms = conn.prepare_cached("SELECT doc, term FROM temp.tokenizer_terms")?;
        let instances = terms
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Terms::tally(instances))
    })();
    conn.execute(
        "INSERT INTO temp.tokenizer (tokenizer) VALUES ('delete-all')",
        [],
    )
    .map_err(sql_error)?;
    result.map_err(sql_error)
}

/// BM25's postings for every chunk in the file, read from its FTS5 index.
fn load_terms(conn: &Connection) -> Result<TermIndex, RagError> {
    let mut index = TermIndex::default();
    let mut statement = conn
        .prepare("SELECT doc, term FROM temp.chunk_terms")
        .map_err(sql_error)?;
    let mut rows = statement.query([]).map_err(sql_error)?;
    while let Some(row) = rows.next().map_err(sql_error)? {
        let doc: i64 = row.get(0).map_err(sql_error)?;
        let term = row
            .get_ref(1)
            .and_then(|v| Ok(v.as_str()?))
            .map_err(sql_error)?;
        index.load(doc, term);
    }
    drop(rows);
    // Chunks without a word (punctuation only) have no terms, but count.
    let mut chunks = conn.prepare("SELECT id FROM chunks").map_err(sql_error)?;
    let mut rows = chunks.query([]).map_err(sql_error)?;
    while let Some(row) = rows.next().map_err(sql_error)? {
        index.row(row.get(0).map_err(sql_error)?);
    }
    index.loaded();
    Ok(index)
}

impl Collection {
    /// Creates the collection's file at `path` (schema and record in one
    /// transaction: a crash leaves no half-made collection).
    pub(crate) fn create(path: &Path, meta: CollectionMeta) -> Result<Self, RagError> {
        let mut conn = connect(path)?;
        let tx = conn.transaction().map_err(sql_error)?;
        tx.execute_batch(SCHEMA).map_err(sql_error)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('collection', ?1)",
            [serde_json::to_string(&meta).expect("serializes")],
        )
        .map_err(sql_error)?;
        tx.commit().map_err(sql_error)?;
        conn.execute_batch(TOKENIZER).map_err(sql_error)?;
        Ok(Self {
            dense: RwLock::new(DenseIndex::new(meta.dimension)),
            terms: RwLock::default(),
            meta,
            path: path.to_owned(),
            file: FileId::of(path),
            conn: Mutex::new(conn),
        })
    }

    /// Opens the collection in `path`; `None` if the file holds no record
    /// (its creation never committed).
    pub(crate) fn open(path: &Path) -> Result<Option<Self>, RagError> {
        let conn = connect(path)?;
        let record: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'collection'", [], |r| {
                r.get(0)
            })
            .optional()
            .or_else(|e| match e {
                // Only a file whose creation never committed lacks the table.
                rusqlite::Error::SqliteFailure(_, Some(ref message))
                    if message.starts_with("no such table") =>
                {
                    Ok(None)
                }
                other => Err(other),
            })
            .map_err(sql_error)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let meta: CollectionMeta = serde_json::from_str(&record).map_err(RagError::store)?;
        conn.execute_batch(TOKENIZER).map_err(sql_error)?;
        let mut dense = DenseIndex::new(meta.dimension);
        {
            let mut rows = conn
                .prepare("SELECT id, dense FROM chunks")
                .map_err(sql_error)?;
            let mut rows = rows.query([]).map_err(sql_error)?;
            while let Some(row) = rows.next().map_err(sql_error)? {
                let id: i64 = row.get(0).map_err(sql_error)?;
                let blob: Vec<u8> = row.get(1).map_err(sql_error)?;
                let vector = floats(&blob);
                if vector.len() != meta.dimension {
                    return Err(RagError::store(format!(
                        "chunk {id} has {} dimensions, the collection {}",
                        vector.len(),
                        meta.dimension
                    )));
                }
                dense.insert(id, &vector);
            }
        }
        let terms = if meta.sparse == Sparse::Bm25 {
            load_terms(&conn)?
        } else {
            TermIndex::default()
        };
        Ok(Some(Self {
            meta,
            path: path.to_owned(),
            file: FileId::of(path),
            conn: Mutex::new(conn),
            dense: RwLock::new(dense),
            terms: RwLock::new(terms),
        }))
    }

    pub fn meta(&self) -> &CollectionMeta {
        &self.meta
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses a write when the collection's file was deleted or replaced
    /// while open: SQLite would go on writing to the unlinked file, and every
    /// document acknowledged from then on would be gone at the next start.
    fn check_file(&self) -> Result<(), RagError> {
        if self.file.is_some() && FileId::of(&self.path) != self.file {
            return Err(RagError::Store(format!(
                "collection {:?}: its file was deleted or replaced while the server ran; \
                 restart the server to open the data directory as it is now",
                self.meta.name
            )));
        }
        Ok(())
    }

    pub(crate) fn dense(&self) -> std::sync::RwLockReadGuard<'_, DenseIndex> {
        self.dense.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a document in one transaction, replacing any document with its
    /// id. Returns whether there was one.
    pub(crate) fn write_document(&self, document: Prepared) -> Result<bool, RagError> {
        for encoded in &document.encoded {
            if encoded.dense.len() != self.meta.dimension {
                return Err(RagError::Store(format!(
                    "the encoder gave {} dimensions; collection {:?} holds {}",
                    encoded.dense.len(),
                    self.meta.name,
                    self.meta.dimension
                )));
            }
        }
        self.check_file()?;
        let mut conn = self.conn();
        let mut terms = if self.meta.sparse == Sparse::Bm25 {
            let texts: Vec<&str> = document.chunks.iter().map(String::as_str).collect();
            tokenize(&conn, &texts)?
        } else {
            HashMap::new()
        };
        let tx = conn.transaction().map_err(sql_error)?;
        let removed = remove_document(&tx, &document.id)?;
        tx.execute(
            "INSERT INTO documents (id, metadata, chunks, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                document.id,
                Value::Object(document.metadata).to_string(),
                document.chunks.len() as i64,
                chrono::Utc::now().timestamp()
            ],
        )
        .map_err(sql_error)?;
        let seq = tx.last_insert_rowid();
        let mut added = Vec::with_capacity(document.chunks.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO chunks (document, chunk, text, dense, colbert) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql_error)?;
            let mut sparse = tx
                .prepare("INSERT INTO sparse (chunk, token, weight) VALUES (?1, ?2, ?3)")
                .map_err(sql_error)?;
            for (index, (text, encoded)) in document.chunks.iter().zip(document.encoded).enumerate()
            {
                let colbert = if self.meta.colbert {
                    Some(rows_blob(encoded.colbert.as_deref().unwrap_or_default()))
                } else {
                    None
                };
                insert
                    .execute(params![
                        seq,
                        index as i64,
                        text,
                        blob(&encoded.dense),
                        colbert
                    ])
                    .map_err(sql_error)?;
                let id = tx.last_insert_rowid();
                if self.meta.sparse == Sparse::Model {
                    for (token, weight) in encoded.sparse.unwrap_or_default() {
                        sparse
                            .execute(params![id, i64::from(token), f64::from(weight)])
                            .map_err(sql_error)?;
                    }
                }
                let chunk_terms = terms.remove(&(index as i64)).unwrap_or_default();
                added.push((id, encoded.dense, chunk_terms));
            }
        }
        tx.commit().map_err(sql_error)?;
        let mut dense = self.dense.write().unwrap_or_else(|e| e.into_inner());
        let mut index = self.terms.write().unwrap_or_else(|e| e.into_inner());
        for id in &removed {
            dense.remove(*id);
            index.remove(*id);
        }
        for (id, vector, chunk_terms) in &added {
            dense.insert(*id, vector);
            index.insert(*id, chunk_terms);
        }
        // A document has at least one chunk: none removed, none replaced.
        Ok(!removed.is_empty())
    }

    /// Deletes a document; `false` if there was none.
    pub fn delete_document(&self, id: &str) -> Result<bool, RagError> {
        self.check_file()?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql_error)?;
        let exists: bool = tx
            .query_row("SELECT 1 FROM documents WHERE id = ?1", [id], |_| Ok(true))
            .optional()
            .map_err(sql_error)?
            .unwrap_or(false);
        if !exists {
            return Ok(false);
        }
        let removed = remove_document(&tx, id)?;
        tx.commit().map_err(sql_error)?;
        let mut dense = self.dense.write().unwrap_or_else(|e| e.into_inner());
        let mut terms = self.terms.write().unwrap_or_else(|e| e.into_inner());
        for chunk in removed {
            dense.remove(chunk);
            terms.remove(chunk);
        }
        Ok(true)
    }

    pub fn stats(&self) -> Result<CollectionStats, RagError> {
        let conn = self.conn();
        let count = |sql: &str| -> Result<u64, RagError> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(sql_error)
        };
        let bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut name = self.path.clone().into_os_string();
                name.push(suffix);
                std::fs::metadata(name).ok()
            })
            .map(|m| m.len())
            .sum();
        Ok(CollectionStats {
            documents: count("SELECT count(*) FROM documents")?,
            chunks: count("SELECT count(*) FROM chunks")?,
            bytes: Some(bytes),
        })
    }

    /// A page of documents, `limit` at most, after the cursor `offset` a
    /// previous page returned.
    pub fn documents(
        &self,
        filter: Option<&Filter>,
        limit: usize,
        offset: Option<&str>,
    ) -> Result<DocumentPage, RagError> {
        let after: i64 = match offset {
            Some(text) => text.parse().map_err(|_| {
                RagError::invalid(
                    "offset",
                    "offset must be a next_offset from an earlier page",
                )
            })?,
            None => 0,
        };
        let (condition, mut values) = filter.map(|f| f.sql("d.metadata")).unwrap_or_default();
        let condition = if condition.is_empty() {
            String::new()
        } else {
            format!("AND {condition}")
        };
        let sql = format!(
            "SELECT d.seq, d.id, d.metadata, d.chunks, d.created_at, \
             (SELECT substr(c.text, 1, 200) FROM chunks c WHERE c.document = d.seq AND c.chunk = 0) \
             FROM documents d WHERE d.seq > ? {condition} ORDER BY d.seq LIMIT ?"
        );
        values.insert(0, SqlValue::Integer(after));
        values.push(SqlValue::Integer(limit as i64 + 1));
        let conn = self.conn();
        let mut statement = conn.prepare(&sql).map_err(sql_error)?;
        let rows = statement
            .query_map(params_from_iter(values), |r| {
                let metadata: String = r.get(2)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    DocumentSummary {
                        id: r.get(1)?,
                        metadata: serde_json::from_str(&metadata).unwrap_or_else(|_| json!({})),
                        chunks: r.get::<_, i64>(3)? as u64,
                        created_at: r.get(4)?,
                        preview: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                    },
                ))
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        let more = rows.len() > limit;
        let rows = &rows[..rows.len().min(limit)];
        Ok(DocumentPage {
            next_offset: more
                .then(|| rows.last().map(|(seq, _)| seq.to_string()))
                .flatten(),
            documents: rows.iter().map(|(_, d)| d.clone()).collect(),
        })
    }

    /// A document's metadata and chunks, in order; `None` if there is none.
    pub fn document(&self, id: &str) -> Result<Option<(Value, Vec<ChunkText>)>, RagError> {
        let conn = self.conn();
        let found: Option<(i64, String)> = conn
            .query_row(
                "SELECT seq, metadata FROM documents WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql_error)?;
        let Some((seq, metadata)) = found else {
            return Ok(None);
        };
        let mut statement = conn
            .prepare("SELECT id, chunk, text FROM chunks WHERE document = ?1 ORDER BY chunk")
            .map_err(sql_error)?;
        let chunks = statement
            .query_map([seq], |r| {
                Ok(ChunkText {
                    id: r.get::<_, i64>(0)?.to_string(),
                    chunk: r.get::<_, i64>(1)? as u64,
                    text: r.get(2)?,
                })
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        let metadata = serde_json::from_str(&metadata).unwrap_or_else(|_| json!({}));
        Ok(Some((metadata, chunks)))
    }

    /// Chunks whose document matches `filter`.
    pub(crate) fn allowed(&self, filter: &Filter) -> Result<HashSet<i64>, RagError> {
        let (condition, values) = filter.sql("d.metadata");
        let sql = format!(
            "SELECT c.id FROM chunks c JOIN documents d ON d.seq = c.document WHERE {condition}"
        );
        let conn = self.conn();
        let mut statement = conn.prepare(&sql).map_err(sql_error)?;
        let ids = statement
            .query_map(params_from_iter(values), |r| r.get::<_, i64>(0))
            .map_err(sql_error)?
            .collect::<Result<HashSet<_>, _>>()
            .map_err(sql_error)?;
        Ok(ids)
    }

    /// The best `limit` chunks by BM25 for `query`'s words, best first
    /// (FTS5's `bm25()` scores, from the postings in memory).
    pub(crate) fn bm25(
        &self,
        query: &str,
        allowed: Option<&HashSet<i64>>,
        limit: usize,
    ) -> Result<Vec<(i64, f32)>, RagError> {
        let words = query_words(query);
        if words.is_empty() {
            return Ok(Vec::new());
        }
        // One text per word: each occurrence counts, as each quoted word of
        // an FTS5 `OR` query does.
        let mut by_word: Vec<(i64, Terms)> = tokenize(&self.conn(), &words)?.into_iter().collect();
        // In the query's order, so that scores add up the same way every time.
        by_word.sort_by_key(|(word, _)| *word);
        let tokens: Vec<String> = by_word
            .into_iter()
            .map(|(_, terms)| terms)
            .flat_map(|t| {
                t.counts
                    .into_iter()
                    .flat_map(|(term, n)| std::iter::repeat_n(term, n as usize))
            })
            .collect();
        let terms = self.terms.read().unwrap_or_else(|e| e.into_inner());
        Ok(terms.search(&tokens, limit, allowed))
    }

    /// The best `limit` chunks by the model's lexical weights, best first.
    pub(crate) fn lexical(
        &self,
        weights: &[(u32, f32)],
        filter: Option<&Filter>,
        limit: usize,
    ) -> Result<Vec<(i64, f32)>, RagError> {
        if weights.is_empty() {
            return Ok(Vec::new());
        }
        let rows = vec!["(?, ?)"; weights.len()].join(", ");
        let (condition, filter_values) = filter.map(|f| f.sql("d.metadata")).unwrap_or_default();
        let condition = if condition.is_empty() {
            String::new()
        } else {
            format!("WHERE {condition}")
        };
        let sql = format!(
            "WITH q(token, weight) AS (VALUES {rows}) \
             SELECT s.chunk, SUM(s.weight * q.weight) AS score FROM sparse s \
             JOIN q ON q.token = s.token JOIN chunks c ON c.id = s.chunk \
             JOIN documents d ON d.seq = c.document {condition} \
             GROUP BY s.chunk ORDER BY score DESC LIMIT ?"
        );
        let mut values: Vec<SqlValue> = weights
            .iter()
            .flat_map(|&(t, w)| {
                [
                    SqlValue::Integer(i64::from(t)),
                    SqlValue::Real(f64::from(w)),
                ]
            })
            .collect();
        values.extend(filter_values);
        values.push(SqlValue::Integer(limit as i64));
        self.scored(&sql, values)
    }

    fn scored(&self, sql: &str, values: Vec<SqlValue>) -> Result<Vec<(i64, f32)>, RagError> {
        let conn = self.conn();
        let mut statement = conn.prepare(sql).map_err(sql_error)?;
        let rows = statement
            .query_map(params_from_iter(values), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)? as f32))
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        Ok(rows)
    }

    /// The stored chunks with these ids (those still there), in no order.
    pub(crate) fn chunks(
        &self,
        ids: &[i64],
        with_colbert: bool,
    ) -> Result<Vec<StoredChunk>, RagError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; ids.len()].join(", ");
        let colbert = if with_colbert { "c.colbert" } else { "NULL" };
        let sql = format!(
            "SELECT c.id, c.chunk, c.text, d.id, d.metadata, {colbert} FROM chunks c \
             JOIN documents d ON d.seq = c.document WHERE c.id IN ({marks})"
        );
        let conn = self.conn();
        let mut statement = conn.prepare(&sql).map_err(sql_error)?;
        let rows = statement
            .query_map(params_from_iter(ids.iter()), |r| {
                let metadata: String = r.get(4)?;
                let colbert: Option<Vec<u8>> = r.get(5)?;
                Ok(StoredChunk {
                    id: r.get(0)?,
                    chunk: r.get::<_, i64>(1)? as u64,
                    text: r.get(2)?,
                    document_id: r.get(3)?,
                    metadata: serde_json::from_str(&metadata).unwrap_or_else(|_| json!({})),
                    colbert: colbert.map(|b| colbert_rows(&b)),
                })
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        Ok(rows)
    }
}

/// Deletes the document `id` and its chunks; returns the chunks' ids.
fn remove_document(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Vec<i64>, RagError> {
    let Some(seq) = tx
        .query_row("SELECT seq FROM documents WHERE id = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })
        .optional()
        .map_err(sql_error)?
    else {
        return Ok(Vec::new());
    };
    let chunks = {
        let mut statement = tx
            .prepare("SELECT id FROM chunks WHERE document = ?1")
            .map_err(sql_error)?;
        let ids = statement
            .query_map([seq], |r| r.get::<_, i64>(0))
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        ids
    };
    tx.execute("DELETE FROM chunks WHERE document = ?1", [seq])
        .map_err(sql_error)?;
    tx.execute("DELETE FROM documents WHERE seq = ?1", [seq])
        .map_err(sql_error)?;
    Ok(chunks)
}

/// Words too common to tell chunks apart: BM25 gives them almost no weight,
/// but an OR query over them would score nearly every chunk (the English
/// list Lucene and Qdrant's BM25 start from, plus question words).
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "from",
    "had", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "no",
    "not", "of", "on", "or", "our", "so", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "we", "what", "when", "where", "which", "who", "why", "will",
    "with", "would", "you", "your",
];

/// The query's words that BM25 scores: stop words left out unless nothing
/// else is left (an `OR` over them would score nearly every chunk).
fn query_words(text: &str) -> Vec<&str> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(64)
        .collect();
    let telling: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !STOP_WORDS.contains(&w.to_lowercase().as_str()))
        .collect();
    if telling.is_empty() {
        words
    } else {
        telling
    }
}

fn blob(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// ColBERT rows as a blob: their width (u32, little-endian), then the values.
fn rows_blob(rows: &[Vec<f32>]) -> Vec<u8> {
    let width = rows.first().map_or(0, Vec::len) as u32;
    let mut bytes = width.to_le_bytes().to_vec();
    bytes.extend(rows.iter().flat_map(|r| blob(r)));
    bytes
}

fn colbert_rows(bytes: &[u8]) -> Vec<Vec<f32>> {
    let Some((width, values)) = bytes.split_first_chunk::<4>() else {
        return Vec::new();
    };
    let width = u32::from_le_bytes(*width) as usize;
    if width == 0 {
        return Vec::new();
    }
    floats(values)
        .chunks_exact(width)
        .map(<[f32]>::to_vec)
        .collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_keep_telling_words_and_drop_syntax() {
        assert_eq!(
            query_words("How do Docker's \"NEAR\" work?"),
            ["Docker", "s", "NEAR", "work"]
        );
        assert_eq!(query_words("What is it?"), ["What", "is", "it"]);
        assert!(query_words(" ?! ").is_empty());
    }

    fn document(id: &str, chunks: &[&str]) -> Prepared {
        Prepared {
            id: id.to_owned(),
            chunks: chunks.iter().map(|c| (*c).to_owned()).collect(),
            encoded: chunks
                .iter()
                .map(|_| Encoded {
                    dense: vec![1.0, 0.0],
                    ..Encoded::default()
                })
                .collect(),
            tokens: Vec::new(),
            metadata: Map::new(),
        }
    }

    /// FTS5's own ranking of the query, for comparison.
    fn fts5_bm25(collection: &Collection, query: &str) -> Vec<(i64, f32)> {
        let matching = query_words(query)
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(" OR ");
        collection
            .scored(
                "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? \
                 ORDER BY bm25(chunks_fts), rowid LIMIT 50",
                vec![SqlValue::Text(matching)],
            )
            .unwrap()
    }

    fn assert_same_ranking(collection: &Collection, query: &str) {
        let ours = collection.bm25(query, None, 50).unwrap();
        let theirs = fts5_bm25(collection, query);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{query:?}: {ours:?} vs {theirs:?}"
        );
        for ((id, score), (fts_id, fts_score)) in ours.iter().zip(&theirs) {
            assert!(
                (score - fts_score).abs() <= 1e-4 * fts_score.abs().max(1.0),
                "{query:?}: {ours:?} vs {theirs:?}"
            );
            // Ties may come in either order; scores must not.
            if id != fts_id {
                let tied = ours
                    .iter()
                    .any(|(i, s)| i == fts_id && (s - fts_score).abs() < 1e-5);
                assert!(tied, "{query:?}: {ours:?} vs {theirs:?}");
            }
        }
    }

    #[test]
    fn a_collection_refuses_an_encoder_that_cannot_make_its_vectors() {
        let m3 = EncoderInfo {
            model: "m3".into(),
            dimension: 4,
            sparse_head: true,
            colbert_head: true,
            max_tokens: 512,
        };
        let meta = CollectionMeta::new("c", &m3, ChunkSize::new(64, 8).unwrap());
        assert!(meta.check_encoder(&m3).is_ok());
        let headless = EncoderInfo {
            sparse_head: false,
            colbert_head: false,
            ..m3.clone()
        };
        assert!(matches!(
            meta.check_encoder(&headless),
            Err(RagError::Conflict(_))
        ));
        let elsewhere = EncoderInfo {
            model: "m3 (upstream)".into(),
            ..m3
        };
        assert!(matches!(
            meta.check_encoder(&elsewhere),
            Err(RagError::Conflict(_))
        ));
    }

    #[test]
    fn bm25_in_memory_scores_as_fts5_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let encoder = EncoderInfo {
            model: "m".into(),
            dimension: 2,
            sparse_head: false,
            colbert_head: false,
            max_tokens: 512,
        };
        let meta = CollectionMeta::new("c", &encoder, ChunkSize::new(64, 8).unwrap());
        let collection = Collection::create(&path, meta).unwrap();
        let texts = [
            "Docker is a containerization platform; containers run anywhere.",
            "Kubernetes orchestrates containers across a cluster of machines.",
            "Running containers: the Docker daemon runs them, Kubernetes schedules them.",
            "Café crème and naïve résumés: diacritics fold away.",
            "Python's asyncio runs coroutines on an event loop.",
            "The event loop runs callbacks, tasks and coroutines.",
            "--- | --- | ---",
        ];
        for (i, text) in texts.iter().enumerate() {
            collection
                .write_document(document(&format!("d{i}"), &[text, "filler words here"]))
                .unwrap();
        }
        let queries = [
            "How do Docker and Kubernetes work together?",
            "running container",
            "cafe resume",
            "event loop coroutines coroutines",
            "what is it",
            "nothing matches zebra",
        ];
        for query in queries {
            assert_same_ranking(&collection, query);
        }
        assert!(!collection
            .bm25("run containers", None, 50)
            .unwrap()
            .is_empty());
        // Replaced and deleted documents leave the statistics as FTS5's.
        collection
            .write_document(document("d0", &["Docker Docker Docker images"]))
            .unwrap();
        collection.delete_document("d2").unwrap();
        for query in queries {
            assert_same_ranking(&collection, query);
        }
        // Reopened: the postings are read back from the file's index.
        drop(collection);
        let collection = Collection::open(&path).unwrap().unwrap();
        for query in queries {
            assert_same_ranking(&collection, query);
        }
        let allowed: HashSet<i64> = collection
            .bm25("containers", None, 50)
            .unwrap()
            .iter()
            .map(|h| h.0)
            .skip(1)
            .collect();
        let filtered = collection.bm25("containers", Some(&allowed), 50).unwrap();
        assert_eq!(filtered.len(), allowed.len());
        assert!(filtered.iter().all(|h| allowed.contains(&h.0)));
    }

    #[test]
    fn vectors_round_trip_through_blobs() {
        let v = vec![0.5, -1.25, 3.0];
        assert_eq!(floats(&blob(&v)), v);
        let rows = vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]];
        assert_eq!(colbert_rows(&rows_blob(&rows)), rows);
        assert!(colbert_rows(&rows_blob(&[])).is_empty());
        assert!(colbert_rows(&[1, 2]).is_empty());
    }
}
