//! A Qdrant server as the store (`QDRANT_URL`, or `QDRANT_HOST` and
//! `QDRANT_PORT`; `QDRANT_API_KEY` goes in the `api-key` header), over
//! Qdrant's REST API. Hand-written on reqwest rather than the `qdrant-client`
//! crate: that crate speaks gRPC (port 6334, with tonic and prost), while
//! seed 003's settings name the REST port (6333), and the nine calls made
//! here are plain JSON.
//!
//! The same data model as the embedded store. A collection records its
//! embedding model in Qdrant's collection metadata (Qdrant 1.16 or later).
//! Each chunk is a point with the named vectors `dense` (cosine), `sparse`,
//! and `colbert` (a multivector compared by MaxSim) when the model has that
//! head. Its payload holds `document_id`, `chunk`, `chunks`, `text`,
//! `metadata`, `created_at` and `written_at`. Hybrid search is
//! Qdrant's own query API: the dense and sparse legs as prefetches fused by
//! reciprocal rank fusion (k = 60, as the embedded store uses), rescored by
//! the ColBERT vectors when there are any. Without BGE-M3's sparse head the
//! sparse leg is BM25 over the embedding tokenizer's ids: the points carry
//! BM25's term-frequency part and Qdrant applies IDF from the collection's
//! statistics (`modifier: idf`), current as documents come and go.
//!
//! A document's points carry the time it was written (`written_at`), and
//! their ids name it, so writing an id again puts a new version beside the
//! old one: its chunks in upserts of at most [`POINTS_PER_REQUEST`] points and
//! [`BYTES_PER_REQUEST`] of JSON, its first chunk last, then older versions
//! are deleted. A version with a first chunk is whole; listings read first
//! chunks, and a document is read as its newest whole version. A write that
//! fails deletes what it wrote; one cut off by a crash leaves chunks without
//! a first chunk, which searches may still find until the id is written
//! again. Of two writers of one id, the later version is kept.
//!
//! After creating a collection, payload indexes on `document_id`, `chunk`
//! and `written_at` keep the per-document filters from scanning it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::collection::Prepared;
use crate::dense::dot;
use crate::store::{PageRequest, PointQuery, Store, StoredDocument};
use crate::{
    BoxFuture, ChunkText, CollectionMeta, CollectionStats, DocumentPage, DocumentSummary, Encoded,
    Filter, Hit, Library, Mode, RagError, Sparse,
};

/// Most points sent in one upsert.
const POINTS_PER_REQUEST: usize = 256;
/// Most JSON sent in one upsert: half of a Qdrant server's default request
/// limit (`max_request_size_mb`, 32).
const BYTES_PER_REQUEST: usize = 16 << 20;
/// Points read per scroll request.
const SCROLL_PAGE: usize = 256;
/// Reciprocal rank fusion's constant, as [`crate::search`] uses it.
const RRF_K: u32 = 60;
/// BM25's term-frequency saturation and length normalization (the usual values).
const BM25_K1: f32 = 1.2;
const BM25_B: f32 = 0.75;
/// The key under which a collection's metadata holds our record.
const RECORD: &str = "llmservice";
/// Namespace of the point ids (UUID v5 of the document id and chunk number).
const POINT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6c6c_6d73_6572_7669_6365_2d72_6167_0001);

/// How to reach the server.
#[derive(Clone, PartialEq)]
pub struct QdrantConfig {
    /// The REST endpoint, e.g. `http://localhost:6333`.
    pub url: String,
    pub api_key: Option<String>,
    /// How long one request may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for QdrantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

pub(crate) struct QdrantStore {
    http: reqwest::Client,
    base: String,
    /// `base` as messages show it.
    shown: String,
    /// Set once the server has answered as a Qdrant recent enough.
    checked: tokio::sync::OnceCell<()>,
    /// Records of the collections seen; a record never changes while its
    /// collection exists.
    metas: Mutex<HashMap<String, CollectionMeta>>,
}

/// Qdrant's answer envelope.
#[derive(Deserialize)]
struct Envelope {
    result: Option<Value>,
    status: Option<Value>,
}

#[derive(Deserialize)]
struct ScoredPoint {
    id: Value,
    #[serde(default)]
    score: f32,
    #[serde(default)]
    payload: Map<String, Value>,
    #[serde(default)]
    vector: Option<Value>,
}

#[derive(Deserialize)]
struct ScrollPage {
    points: Vec<ScoredPoint>,
    next_page_offset: Option<Value>,
}

impl QdrantStore {
    pub(crate) fn new(config: &QdrantConfig) -> Result<Self, RagError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = &config.api_key {
            let mut value = reqwest::header::HeaderValue::from_str(key)
                .map_err(|_| RagError::store("QDRANT_API_KEY is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert("api-key", value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.timeout)
            .build()
            .map_err(RagError::store)?;
        let base = config.url.trim_end_matches('/').to_owned();
        // Messages and logs name the server without any user and password in its URL.
        let shown = match reqwest::Url::parse(&base) {
            Ok(mut url) => {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.as_str().trim_end_matches('/').to_owned()
            }
            Err(_) => base.clone(),
        };
        Ok(Self {
            http,
            base,
            shown,
            checked: tokio::sync::OnceCell::new(),
            metas: Mutex::new(HashMap::new()),
        })
    }

    fn metas(&self) -> std::sync::MutexGuard<'_, HashMap<String, CollectionMeta>> {
        self.metas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One call: its `result`, or `None` for a 404. The first makes sure
    /// the server is a Qdrant that keeps collection metadata.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, RagError> {
        self.checked.get_or_try_init(|| self.check_server()).await?;
        self.send(method, path, body).await
    }

    /// Refuses a server that does not answer `GET /` as Qdrant 1.16 or later
    /// does (a wrong port, another service): its 404s would otherwise read
    /// as "no such collection".
    async fn check_server(&self) -> Result<(), RagError> {
        let unreachable = |error: reqwest::Error| {
            RagError::Unavailable(format!(
                "the Qdrant server at {} could not be reached: {}",
                self.shown,
                without_url(&error)
            ))
        };
        let response = self
            .http
            .get(format!("{}/", self.base))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let banner: Option<Value> = response.json().await.ok();
        let version = banner
            .as_ref()
            .and_then(|b| b.get("version"))
            .and_then(Value::as_str);
        let Some(version) = version.filter(|_| status.is_success()) else {
            return Err(RagError::Store(format!(
                "{} does not answer as a Qdrant server ({status} to GET /, without a version): \
                 check QDRANT_URL (Qdrant's REST port, 6333 by default){}",
                self.shown,
                if matches!(status.as_u16(), 401 | 403) {
                    " and QDRANT_API_KEY"
                } else {
                    ""
                }
            )));
        };
        let number = |part: Option<&str>| {
            part.and_then(|p| {
                p.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse::<u32>()
                    .ok()
            })
        };
        let mut parts = version.split('.');
        let (major, minor) = (number(parts.next()), number(parts.next()));
        if (major, minor) < (Some(1), Some(16)) {
            return Err(RagError::Store(format!(
                "the Qdrant server at {} is version {version}; retrieval needs 1.16 or later \
                 (its collection metadata records each collection's embedding model)",
                self.shown
            )));
        }
        Ok(())
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, RagError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| {
            RagError::Unavailable(format!(
                "the Qdrant server at {} could not be reached: {}",
                self.shown,
                without_url(&error)
            ))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|error| {
            RagError::Unavailable(format!(
                "the Qdrant server at {} did not answer whole: {}",
                self.shown,
                without_url(&error)
            ))
        })?;
        let envelope: Option<Envelope> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return Ok(Some(envelope.and_then(|e| e.result).unwrap_or(Value::Null)));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reason = envelope
            .and_then(|e| e.status)
            .and_then(|s| s.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        Err(match status.as_u16() {
            401 | 403 => RagError::Store(format!(
                "the Qdrant server at {} refused the request ({status}): check QDRANT_API_KEY",
                self.shown
            )),
            502..=504 => RagError::Unavailable(format!(
                "the Qdrant server at {} is unavailable ({status}): {reason}",
                self.shown
            )),
            _ => RagError::Store(format!(
                "the Qdrant server at {} answered {status} to {path}: {reason}",
                self.shown
            )),
        })
    }

    /// A call on collection `name` that must exist.
    async fn on(&self, name: &str, path: &str, body: Value) -> Result<Value, RagError> {
        let path = format!("/collections/{name}{path}");
        match self.call(reqwest::Method::POST, &path, Some(body)).await? {
            Some(result) => Ok(result),
            None => {
                self.metas().remove(name);
                Err(Library::not_found(name))
            }
        }
    }

    async fn count(&self, name: &str, filter: Value) -> Result<u64, RagError> {
        let result = self
            .on(
                name,
                "/points/count",
                json!({"filter": filter, "exact": true}),
            )
            .await?;
        Ok(result.get("count").and_then(Value::as_u64).unwrap_or(0))
    }

    async fn scroll(
        &self,
        name: &str,
        filter: Value,
        limit: usize,
        offset: Option<Value>,
    ) -> Result<ScrollPage, RagError> {
        let mut body =
            json!({"filter": filter, "limit": limit, "with_payload": true, "with_vector": false});
        if let Some(offset) = offset {
            body["offset"] = offset;
        }
        let result = self.on(name, "/points/scroll", body).await?;
        serde_json::from_value(result).map_err(|e| bad_answer("scroll", e))
    }

    async fn upsert(&self, name: &str, points: Vec<Value>) -> Result<(), RagError> {
        let path = format!("/collections/{name}/points?wait=true");
        match self
            .call(reqwest::Method::PUT, &path, Some(json!({"points": points})))
            .await?
        {
            Some(_) => Ok(()),
            None => {
                self.metas().remove(name);
                Err(Library::not_found(name))
            }
        }
    }

    async fn delete_points(&self, name: &str, filter: Value) -> Result<(), RagError> {
        self.on(name, "/points/delete?wait=true", json!({"filter": filter}))
            .await
            .map(drop)
    }

    /// Writes one document; whether it replaced one. The new version's
    /// points go in beside the old ones (their ids name the version), its
    /// first chunk last, so a version with a first chunk is whole; then
    /// older versions are deleted. A write that fails takes its own points
    /// back out, as far as the server lets it.
    async fn write_document(
        &self,
        meta: &CollectionMeta,
        document: Prepared,
    ) -> Result<bool, RagError> {
        let name = meta.name.as_str();
        let id = json!(document.id);
        let replaced = self
            .count(name, json!({"must": [matches("document_id", &id)]}))
            .await?
            > 0;
        let written_at = written_at();
        let mut points = document_points(meta, document, written_at)?;
        // The first chunk makes the version visible: it goes last.
        points.rotate_left(1);
        let mine = json!({"must": [matches("document_id", &id), matches("written_at", &json!(written_at))]});
        for batch in batches(points) {
            if let Err(error) = self.upsert(name, batch).await {
                let _ = self.delete_points(name, mine.clone()).await;
                return Err(error);
            }
        }
        // Older versions go. Of two writers of one id, the later version
        // stays: the earlier one's delete never reaches it, and the earlier
        // one takes its own version back out if it finds a later one.
        let older = json!({"must": [matches("document_id", &id),
                                     {"key": "written_at", "range": {"lt": written_at}}]});
        self.delete_points(name, older).await?;
        let newer = json!({"must": [matches("document_id", &id),
                                     {"key": "written_at", "range": {"gt": written_at}}]});
        if self.count(name, newer).await? > 0 {
            self.delete_points(name, mine).await?;
        }
        Ok(replaced)
    }

    /// Points of a hybrid, dense or sparse query.
    fn query_body(&self, meta: &CollectionMeta, query: &PointQuery) -> Option<Value> {
        let filter = query.filter.as_ref().map(metadata_filter);
        let leg = query.limit.max(20);
        let dense = (!query.encoded.dense.is_empty()).then(|| {
            json!({"query": query.encoded.dense, "using": "dense", "limit": leg, "filter": filter})
        });
        let sparse = sparse_query(meta, query).map(|(indices, values)| {
            json!({"query": {"indices": indices, "values": values}, "using": "sparse",
                   "limit": leg, "filter": filter})
        });
        let mut body = match query.mode {
            Mode::Dense => dense?,
            Mode::Sparse => sparse?,
            Mode::Hybrid => {
                let legs: Vec<Value> = dense.into_iter().chain(sparse).collect();
                if legs.is_empty() {
                    return None;
                }
                let fused = json!({"prefetch": legs, "query": {"rrf": {"k": RRF_K}},
                                   "limit": query.limit, "filter": filter});
                match query.encoded.colbert.as_ref().filter(|_| meta.colbert) {
                    Some(rows) if !rows.is_empty() => json!({
                        "prefetch": [fused],
                        "query": rows,
                        "using": "colbert",
                        "filter": filter,
                    }),
                    _ => fused,
                }
            }
        };
        body["limit"] = json!(query.limit);
        body["with_payload"] = json!(true);
        body["with_vector"] = json!(["dense"]);
        Some(body)
    }
}

/// A match condition on a payload key.
fn matches(key: &str, value: &Value) -> Value {
    json!({"key": key, "match": {"value": value}})
}

/// A client's metadata filter as Qdrant's: every field must hold one of its values.
fn metadata_filter(filter: &Filter) -> Value {
    let must: Vec<Value> = filter
        .fields()
        .map(|(key, values)| {
            // Quoted: a field's name may hold any letter and '-'.
            let key = format!("metadata.\"{key}\"");
            match values {
                [one] => matches(&key, one),
                many => {
                    json!({"should": many.iter().map(|v| matches(&key, v)).collect::<Vec<_>>()})
                }
            }
        })
        .collect();
    json!({"must": must})
}

/// A point's id, from its document's id, the version's time and its chunk number.
fn point_id(document: &str, written_at: i64, chunk: usize) -> String {
    let name = format!("{document}\u{0}{written_at}\u{0}{chunk}");
    uuid::Uuid::new_v5(&POINT_NAMESPACE, name.as_bytes()).to_string()
}

/// A version's time: microseconds since the epoch, so later writes of an id
/// are larger, and each write of this process has its own. (Not nanoseconds:
/// Qdrant compares a range filter's bounds as doubles, exact to 2^53.)
fn written_at() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_micros();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    now.max(previous + 1)
}

/// A document's points, in chunk order.
fn document_points(
    meta: &CollectionMeta,
    document: Prepared,
    written_at: i64,
) -> Result<Vec<Value>, RagError> {
    let total = document.chunks.len();
    let created_at = written_at / 1_000_000;
    let tokens = document
        .tokens
        .into_iter()
        .map(Some)
        .chain(std::iter::repeat(None));
    let chunks = document
        .chunks
        .into_iter()
        .zip(document.encoded)
        .zip(tokens);
    chunks
        .enumerate()
        .map(|(index, ((text, encoded), tokens))| {
            Ok(json!({
                "id": point_id(&document.id, written_at, index),
                "vector": point_vectors(meta, encoded, tokens.as_deref())?,
                "payload": {
                    "document_id": document.id,
                    "chunk": index,
                    "chunks": total,
                    "text": text,
                    "metadata": document.metadata,
                    "created_at": created_at,
                    "written_at": written_at,
                },
            }))
        })
        .collect()
}

/// Points in upserts of at most [`POINTS_PER_REQUEST`] points and
/// [`BYTES_PER_REQUEST`] of JSON (ColBERT's vectors make points large).
fn batches(points: Vec<Value>) -> Vec<Vec<Value>> {
    let mut batches = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for point in points {
        let size = point.to_string().len();
        let full = batch.len() == POINTS_PER_REQUEST || bytes + size > BYTES_PER_REQUEST;
        if !batch.is_empty() && full {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(point);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// BM25's term-frequency part for each distinct token of a chunk, its
/// length normalized by the collection's chunk size (Qdrant adds IDF).
fn bm25_weights(tokens: &[u32], average_length: f32) -> (Vec<u32>, Vec<f32>) {
    let mut counts: HashMap<u32, f32> = HashMap::new();
    for &token in tokens {
        *counts.entry(token).or_default() += 1.0;
    }
    let norm = BM25_K1 * (1.0 - BM25_B + BM25_B * tokens.len() as f32 / average_length.max(1.0));
    let mut weights: Vec<(u32, f32)> = counts
        .into_iter()
        .map(|(token, tf)| (token, tf * (BM25_K1 + 1.0) / (tf + norm)))
        .collect();
    weights.sort_by_key(|w| w.0);
    weights.into_iter().unzip()
}

/// A sparse vector in Qdrant's form: indices ascending, one value each.
fn sparse_pairs(weights: &[(u32, f32)]) -> (Vec<u32>, Vec<f32>) {
    let mut merged: HashMap<u32, f32> = HashMap::new();
    for &(token, weight) in weights {
        let slot = merged.entry(token).or_default();
        *slot = slot.max(weight);
    }
    let mut pairs: Vec<(u32, f32)> = merged.into_iter().collect();
    pairs.sort_by_key(|p| p.0);
    pairs.into_iter().unzip()
}

/// The query's sparse vector: the model's weights, or each distinct token
/// once (BM25: Qdrant weighs them by IDF). `None` when it has no terms.
fn sparse_query(meta: &CollectionMeta, query: &PointQuery) -> Option<(Vec<u32>, Vec<f32>)> {
    let (indices, values) = match meta.sparse {
        Sparse::Model => sparse_pairs(query.encoded.sparse.as_deref().unwrap_or_default()),
        Sparse::Bm25 => {
            let mut tokens = query.tokens.clone();
            tokens.sort_unstable();
            tokens.dedup();
            let ones = vec![1.0; tokens.len()];
            (tokens, ones)
        }
    };
    (!indices.is_empty()).then_some((indices, values))
}

/// A chunk's named vectors.
fn point_vectors(
    meta: &CollectionMeta,
    encoded: Encoded,
    tokens: Option<&[u32]>,
) -> Result<Value, RagError> {
    if encoded.dense.len() != meta.dimension {
        return Err(RagError::Store(format!(
            "the encoder gave {} dimensions; collection {:?} holds {}",
            encoded.dense.len(),
            meta.name,
            meta.dimension
        )));
    }
    let mut vectors = json!({"dense": encoded.dense});
    let (indices, values) = match meta.sparse {
        Sparse::Model => sparse_pairs(encoded.sparse.as_deref().unwrap_or_default()),
        Sparse::Bm25 => bm25_weights(tokens.unwrap_or_default(), meta.chunk.tokens as f32),
    };
    if !indices.is_empty() {
        vectors["sparse"] = json!({"indices": indices, "values": values});
    }
    if meta.colbert {
        let rows = encoded.colbert.unwrap_or_default();
        if rows.iter().any(|r| r.len() != meta.dimension) {
            return Err(RagError::Store(format!(
                "collection {:?} holds {}-wide ColBERT vectors; the encoder gave others",
                meta.name, meta.dimension
            )));
        }
        if !rows.is_empty() {
            vectors["colbert"] = json!(rows);
        }
    }
    Ok(vectors)
}

/// A store error for an answer that does not have Qdrant's shape.
fn bad_answer(call: &str, error: impl std::fmt::Display) -> RagError {
    RagError::Store(format!(
        "the Qdrant server's answer to {call} was not understood: {error}"
    ))
}

/// reqwest's error text without the URL it carries (the base is said once).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "");
    }
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn as_str(payload: &Map<String, Value>, key: &str) -> String {
    payload
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A point's version: when it was written.
fn written(payload: &Map<String, Value>) -> i64 {
    payload
        .get("written_at")
        .and_then(Value::as_i64)
        .unwrap_or_default()
}

fn as_u64(payload: &Map<String, Value>, key: &str) -> u64 {
    payload.get(key).and_then(Value::as_u64).unwrap_or_default()
}

/// A point id as our APIs show it.
fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Store for QdrantStore {
    fn location(&self) -> String {
        format!("the Qdrant server at {}", self.shown)
    }

    fn bm25_over_token_ids(&self) -> bool {
        true
    }

    fn meta<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<CollectionMeta>, RagError>> {
        Box::pin(async move {
            if let Some(meta) = self.metas().get(name) {
                return Ok(Some(meta.clone()));
            }
            let path = format!("/collections/{name}");
            let Some(info) = self.call(reqwest::Method::GET, &path, None).await? else {
                return Ok(None);
            };
            let Some(record) = info.pointer(&format!("/config/metadata/{RECORD}")) else {
                return Err(RagError::Conflict(format!(
                    "the Qdrant server's collection {name:?} was not made by llmservice (its \
                     metadata has no {RECORD:?} record; Qdrant 1.16 or later keeps one): use \
                     another collection name"
                )));
            };
            let meta: CollectionMeta = serde_json::from_value(record.clone())
                .map_err(|e| bad_answer("a collection's record", e))?;
            self.metas().insert(name.to_owned(), meta.clone());
            Ok(Some(meta))
        })
    }

    fn create(&self, meta: CollectionMeta) -> BoxFuture<'_, Result<CollectionMeta, RagError>> {
        Box::pin(async move {
            let mut vectors = json!({"dense": {"size": meta.dimension, "distance": "Cosine"}});
            if meta.colbert {
                // Only rescoring reads these: no index of every token's vector.
                vectors["colbert"] = json!({"size": meta.dimension, "distance": "Cosine",
                                            "multivector_config": {"comparator": "max_sim"},
                                            "hnsw_config": {"m": 0}});
            }
            let sparse = match meta.sparse {
                Sparse::Bm25 => json!({"sparse": {"modifier": "idf"}}),
                Sparse::Model => json!({"sparse": {}}),
            };
            let body = json!({"vectors": vectors, "sparse_vectors": sparse,
                              "metadata": {RECORD: meta}});
            let path = format!("/collections/{}", meta.name);
            let created = self.call(reqwest::Method::PUT, &path, Some(body)).await;
            if created.is_ok() {
                for (field, schema) in [
                    ("document_id", "keyword"),
                    ("chunk", "integer"),
                    ("written_at", "integer"),
                ] {
                    let index = json!({"field_name": field, "field_schema": schema});
                    let path = format!("/collections/{}/index?wait=true", meta.name);
                    self.call(reqwest::Method::PUT, &path, Some(index)).await?;
                }
            }
            // Another replica may have made it first: then its record stands.
            match self.meta(&meta.name).await? {
                Some(existing) => Ok(existing),
                None => Err(created.err().unwrap_or_else(|| {
                    RagError::store(format!("collection {:?} was not created", meta.name))
                })),
            }
        })
    }

    fn collections(
        &self,
    ) -> BoxFuture<'_, Result<Vec<(CollectionMeta, CollectionStats)>, RagError>> {
        Box::pin(async move {
            let listing = self
                .call(reqwest::Method::GET, "/collections", None)
                .await?
                .unwrap_or_default();
            let mut names: Vec<String> = listing
                .get("collections")
                .and_then(Value::as_array)
                .map(|all| {
                    all.iter()
                        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            let mut out = Vec::new();
            for name in names {
                // Collections of other applications on the same server are
                // not ours to list; one deleted meanwhile is gone.
                let meta = match self.meta(&name).await {
                    Ok(Some(meta)) => meta,
                    Ok(None) | Err(RagError::Conflict(_) | RagError::NotFound(_)) => continue,
                    Err(error) => return Err(error),
                };
                let first_chunks = json!({"must": [matches("chunk", &json!(0))]});
                let counts = async {
                    Ok::<_, RagError>((
                        self.count(&name, first_chunks).await?,
                        self.count(&name, json!({})).await?,
                    ))
                };
                let (documents, chunks) = match counts.await {
                    Ok(counts) => counts,
                    Err(RagError::NotFound(_)) => continue,
                    Err(error) => return Err(error),
                };
                out.push((
                    meta,
                    CollectionStats {
                        documents,
                        chunks,
                        bytes: None,
                    },
                ));
            }
            Ok(out)
        })
    }

    fn delete_collection<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, RagError>> {
        Box::pin(async move {
            // Only ours: another application's collection of that name stays.
            if self.meta(name).await?.is_none() {
                return Ok(false);
            }
            let path = format!("/collections/{name}");
            let deleted = self.call(reqwest::Method::DELETE, &path, None).await?;
            self.metas().remove(name);
            Ok(deleted.is_some_and(|d| d.as_bool() != Some(false)))
        })
    }

    fn write<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        documents: Vec<Prepared>,
    ) -> BoxFuture<'a, Result<Vec<bool>, RagError>> {
        Box::pin(async move {
            let mut replaced = Vec::with_capacity(documents.len());
            for document in documents {
                replaced.push(self.write_document(meta, document).await?);
            }
            Ok(replaced)
        })
    }

    fn delete_document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RagError>> {
        Box::pin(async move {
            let of_document = json!({"must": [matches("document_id", &json!(id))]});
            if self.count(name, of_document.clone()).await? == 0 {
                return Ok(false);
            }
            self.delete_points(name, of_document).await?;
            Ok(true)
        })
    }

    fn documents<'a>(
        &'a self,
        name: &'a str,
        page: PageRequest,
    ) -> BoxFuture<'a, Result<DocumentPage, RagError>> {
        Box::pin(async move {
            let offset = match &page.offset {
                Some(text) => Some(json!(uuid::Uuid::parse_str(text)
                    .map_err(|_| {
                        RagError::invalid(
                            "offset",
                            "offset must be a next_offset from an earlier page",
                        )
                    })?
                    .to_string())),
                None => None,
            };
            let mut filter = page
                .filter
                .as_ref()
                .map(metadata_filter)
                .unwrap_or_else(|| json!({"must": []}));
            filter["must"]
                .as_array_mut()
                .expect("a must list")
                .push(matches("chunk", &json!(0)));
            let found = self.scroll(name, filter, page.limit, offset).await?;
            let documents = found
                .points
                .into_iter()
                .map(|point| DocumentSummary {
                    id: as_str(&point.payload, "document_id"),
                    chunks: as_u64(&point.payload, "chunks"),
                    metadata: point
                        .payload
                        .get("metadata")
                        .cloned()
                        .unwrap_or_else(|| json!({})),
                    created_at: point
                        .payload
                        .get("created_at")
                        .and_then(Value::as_i64)
                        .unwrap_or_default(),
                    preview: as_str(&point.payload, "text").chars().take(200).collect(),
                })
                .collect();
            Ok(DocumentPage {
                documents,
                next_offset: found.next_page_offset.as_ref().map(id_text),
            })
        })
    }

    fn document<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredDocument>, RagError>> {
        Box::pin(async move {
            let filter = json!({"must": [matches("document_id", &json!(id))]});
            let mut points = Vec::new();
            let mut offset = None;
            loop {
                let page = self
                    .scroll(name, filter.clone(), SCROLL_PAGE, offset)
                    .await?;
                points.extend(page.points);
                match page.next_page_offset {
                    Some(next) => offset = Some(next),
                    None => break,
                }
            }
            // The newest version with a first chunk (written last, so whole).
            let Some(head) = points
                .iter()
                .filter(|p| as_u64(&p.payload, "chunk") == 0)
                .max_by_key(|p| written(&p.payload))
            else {
                return Ok(None);
            };
            let version = written(&head.payload);
            let metadata = head
                .payload
                .get("metadata")
                .cloned()
                .unwrap_or_else(|| json!({}));
            let mut chunks: Vec<ChunkText> = points
                .iter()
                .filter(|p| written(&p.payload) == version)
                .map(|p| ChunkText {
                    id: id_text(&p.id),
                    chunk: as_u64(&p.payload, "chunk"),
                    text: as_str(&p.payload, "text"),
                })
                .collect();
            chunks.sort_by_key(|c| c.chunk);
            Ok(Some((metadata, chunks)))
        })
    }

    fn search<'a>(
        &'a self,
        meta: &'a CollectionMeta,
        query: PointQuery,
    ) -> BoxFuture<'a, Result<Vec<Hit>, RagError>> {
        Box::pin(async move {
            let Some(body) = self.query_body(meta, &query) else {
                return Ok(Vec::new());
            };
            let result = self.on(&meta.name, "/points/query", body).await?;
            let points: Vec<ScoredPoint> =
                serde_json::from_value(result.get("points").cloned().unwrap_or_else(|| json!([])))
                    .map_err(|e| bad_answer("query", e))?;
            let colbert_rows = query
                .encoded
                .colbert
                .as_ref()
                .filter(|rows| meta.colbert && query.mode == Mode::Hybrid && !rows.is_empty())
                .map(Vec::len);
            Ok(points
                .into_iter()
                .map(|point| {
                    let vector: Option<Vec<f32>> = point
                        .vector
                        .as_ref()
                        .and_then(|v| v.get("dense"))
                        .and_then(|v| serde_json::from_value(v.clone()).ok());
                    Hit {
                        id: id_text(&point.id),
                        document_id: as_str(&point.payload, "document_id"),
                        chunk: as_u64(&point.payload, "chunk"),
                        text: as_str(&point.payload, "text"),
                        // Qdrant's MaxSim sums over the query's vectors; the
                        // embedded store's averages.
                        score: match colbert_rows {
                            Some(rows) => point.score / rows as f32,
                            None => point.score,
                        },
                        similarity: vector
                            .filter(|_| !query.encoded.dense.is_empty())
                            .map(|v| dot(&v, &query.encoded.dense)),
                        metadata: point
                            .payload
                            .get("metadata")
                            .cloned()
                            .unwrap_or_else(|| json!({})),
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_stable_and_distinct() {
        assert_eq!(point_id("doc", 5, 0), point_id("doc", 5, 0));
        assert_ne!(point_id("doc", 5, 0), point_id("doc", 5, 1));
        assert_ne!(point_id("doc", 5, 0), point_id("doc", 6, 0));
        // The separator keeps "a1"+"0" apart from "a"+"10".
        assert_ne!(point_id("a1", 5, 0), point_id("a", 5, 10));
    }

    #[test]
    fn versions_increase_and_stay_exact_as_doubles() {
        let first = written_at();
        let second = written_at();
        assert!(second > first);
        assert_eq!(second as f64 as i64, second);
    }

    #[test]
    fn upserts_are_cut_by_count_and_by_size() {
        let small: Vec<Value> = (0..600).map(|i| json!({"id": i})).collect();
        let sizes: Vec<usize> = batches(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [256, 256, 88]);
        // ColBERT-sized points: about 6 MiB each, two to a request.
        let rows = "x".repeat(6 << 20);
        let large: Vec<Value> = (0..5).map(|_| json!({"vector": rows})).collect();
        let sizes: Vec<usize> = batches(large).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(batches(Vec::new()).is_empty());
        // One point larger than the limit still goes, alone.
        let huge = vec![json!({"vector": "x".repeat(20 << 20)}), json!({"id": 1})];
        assert_eq!(
            batches(huge).iter().map(Vec::len).collect::<Vec<_>>(),
            [1, 1]
        );
    }

    #[test]
    fn bm25_weights_saturate_and_favour_short_chunks() {
        let (indices, values) = bm25_weights(&[7, 3, 7, 7], 4.0);
        assert_eq!(indices, vec![3, 7]);
        assert!(
            values[1] > values[0],
            "three occurrences weigh more than one"
        );
        assert!(
            values[1] < 3.0 * values[0],
            "but less than three times as much"
        );
        let (_, short) = bm25_weights(&[3], 4.0);
        let (_, long) = bm25_weights(&[3, 1, 2, 4, 5, 6, 8, 9], 4.0);
        assert!(
            short[0] > long[0],
            "the same term weighs more in a shorter chunk"
        );
    }

    #[test]
    fn metadata_filters_become_qdrant_conditions() {
        let object = json!({"source": "k8s", "type": ["a", "b"], "draft": false});
        let filter = Filter::from_object(object.as_object().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            metadata_filter(&filter),
            json!({"must": [
                {"key": "metadata.\"source\"", "match": {"value": "k8s"}},
                {"should": [
                    {"key": "metadata.\"type\"", "match": {"value": "a"}},
                    {"key": "metadata.\"type\"", "match": {"value": "b"}},
                ]},
                {"key": "metadata.\"draft\"", "match": {"value": false}},
            ]})
        );
    }

    #[test]
    fn sparse_vectors_are_sorted_and_unique() {
        let (indices, values) = sparse_pairs(&[(9, 0.5), (2, 0.1), (9, 0.7)]);
        assert_eq!(indices, vec![2, 9]);
        assert_eq!(values, vec![0.1, 0.7]);
    }
}
