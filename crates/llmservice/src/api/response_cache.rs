//! The response cache at the HTTP edge: which requests may be answered from it,
//! what identifies an answer, and how a cached answer is replayed: rebuilt
//! into the same [`Answer`] a generation fills, then sent as JSON or as the
//! SSE stream a fresh generation would send.

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::answer::{self, Answer, AnswerHead, ChatAnswer, ChatShape, TextAnswer};
use super::sse::sse;
use crate::cache::{is_cacheable, CacheKey, CachedResponse, ResponseCache};
use crate::generation::ChoiceEvent;
use crate::models::ModelEntry;
use crate::settings::GenerationDefaults;
use crate::wire::{SamplingFields, StopField};

/// Header telling clients (and tests) whether the cache answered.
const CACHE_HEADER: &str = "x-llmservice-cache";

/// The key for a request, or `None` when it must not be cached (caching off,
/// or sampling that is not deterministic). `payload` is what the endpoint adds:
/// messages and template variables for chat, prompts and echo for completions.
pub fn key_for(
    cache: &ResponseCache,
    endpoint: &str,
    entry: &ModelEntry,
    sampling: &SamplingFields,
    defaults: &GenerationDefaults,
    payload: Value,
) -> Option<CacheKey> {
    let temperature = sampling.temperature.unwrap_or(defaults.temperature);
    if !cache.is_enabled() || !is_cacheable(temperature, sampling.seed, cache.settings().cache_all)
    {
        return None;
    }
    let file = file_identity(entry)?;
    let config = entry.engine_config();
    Some(CacheKey::new(&json!({
        "endpoint": endpoint,
        "model": file,
        "context": config.n_ctx,
        "chat_template": config.chat_template,
        "payload": payload,
        "temperature": temperature,
        "top_p": sampling.top_p.unwrap_or(defaults.top_p),
        "top_k": sampling.top_k.unwrap_or(defaults.top_k),
        "min_p": sampling.min_p.unwrap_or(defaults.min_p),
        "repeat_penalty": sampling.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        "repeat_last_n": sampling.repeat_last_n,
        "presence_penalty": sampling.presence_penalty.unwrap_or(0.0),
        "frequency_penalty": sampling.frequency_penalty.unwrap_or(0.0),
        "seed": sampling.seed,
        "logit_bias": sampling.logit_bias,
        // Before the context's room cuts it: an Ollama `num_predict` and the
        // same `max_tokens` ask for the same answer.
        "max_tokens": crate::generation::max_tokens(
            sampling.max_completion_tokens.or(sampling.max_tokens),
            sampling.n_predict,
            defaults.max_tokens,
        ),
        "stop": sampling.stop.as_ref().map(|s| match s {
            StopField::One(one) => vec![one.clone()],
            StopField::Many(many) => many.clone(),
        }),
        "n": sampling.n.unwrap_or(1),
        "logprobs": sampling.logprobs,
        "top_logprobs": sampling.top_logprobs,
        "ignore_eos": sampling.ignore_eos,
    })))
}

/// The model file's identity by content, not by name or place: a replaced
/// model must not answer from the old one's cache, and replicas sharing a
/// cache (`CACHE_URL`) must agree on the key wherever their copy lies and
/// whenever it was written. Its length and a SHA-256 of its first and last
/// MiB (metadata, tokenizer and weights at both ends), read once per file
/// version and remembered.
fn file_identity(entry: &ModelEntry) -> Option<Value> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    type Version = (std::path::PathBuf, u64, std::time::SystemTime);
    static SEEN: LazyLock<Mutex<HashMap<Version, String>>> = LazyLock::new(Default::default);

    if let Some(upstream) = &entry.upstream {
        return Some(upstream.identity());
    }
    let m = std::fs::metadata(&entry.path).ok()?;
    let version = (entry.path.clone(), m.len(), m.modified().ok()?);
    let known = SEEN
        .lock()
        .ok()
        .and_then(|seen| seen.get(&version).cloned());
    let digest = match known {
        Some(digest) => digest,
        None => {
            let digest = sample_digest(&entry.path, m.len())?;
            if let Ok(mut seen) = SEEN.lock() {
                seen.insert(version, digest.clone());
            }
            digest
        }
    };
    Some(json!({"len": m.len(), "sha256_ends": digest}))
}

/// SHA-256 of a file's first and last MiB (all of it when smaller).
fn sample_digest(path: &std::path::Path, len: u64) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    const END: u64 = 1 << 20;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(END as usize);
    file.by_ref().take(END).read_to_end(&mut buf).ok()?;
    hasher.update(&buf);
    if len > END {
        buf.clear();
        file.seek(SeekFrom::Start(len.saturating_sub(END).max(END)))
            .ok()?;
        file.take(END).read_to_end(&mut buf).ok()?;
        hasher.update(&buf);
    }
    Some(format!("{:x}", hasher.finalize()))
}

/// The key for a deterministic request (embeddings, rerank): the model file and
/// everything in `payload`. `None` when caching is off.
pub fn key_for_deterministic(
    cache: &ResponseCache,
    endpoint: &str,
    entry: &ModelEntry,
    payload: Value,
) -> Option<CacheKey> {
    if !cache.is_enabled() {
        return None;
    }
    let config = entry.engine_config();
    Some(CacheKey::new(&json!({
        "endpoint": endpoint,
        "model": file_identity(entry)?,
        "context": config.n_ctx,
        "batch": config.n_batch,
        "payload": payload,
    })))
}

/// A cached answer, read off the async threads (the disk tier does file I/O).
pub async fn lookup(cache: &Arc<ResponseCache>, key: &CacheKey) -> Option<Value> {
    let (cache, key) = (cache.clone(), key.clone());
    tokio::task::spawn_blocking(move || cache.get(&key).map(|c| c.body))
        .await
        .ok()
        .flatten()
}

/// Stores a finished answer without making the client wait for the disk.
pub fn store(cache: &Arc<ResponseCache>, key: CacheKey, body: Value) {
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || {
        cache.put(
            &key,
            CachedResponse {
                body,
                created: chrono::Utc::now().timestamp(),
            },
        )
    });
}

/// Whether the cache answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    FromCache,
    Generated,
}

/// Tells clients (and tests) whether the cache answered.
pub fn mark(mut response: Response, served: Served) -> Response {
    response.headers_mut().insert(
        CACHE_HEADER,
        HeaderValue::from_static(match served {
            Served::FromCache => "hit",
            Served::Generated => "miss",
        }),
    );
    response
}

/// A cached JSON answer (embeddings, rerank) under `key`, with `fill` making
/// it this request's answer (the model name the client used, a new id).
pub async fn replay_json(
    cache: &Arc<ResponseCache>,
    key: Option<&CacheKey>,
    fill: impl FnOnce(&mut Value),
) -> Option<Response> {
    let mut body = lookup(cache, key?).await?;
    fill(&mut body);
    Some(mark(axum::Json(body).into_response(), Served::FromCache))
}

/// The cached chat answer under `key`, replayed as a new answer to this
/// request (`head` has its id and the model name the client used).
pub async fn replay_chat(
    cache: &Arc<ResponseCache>,
    key: Option<&CacheKey>,
    head: AnswerHead,
    shape: ChatShape,
    sources: Option<Vec<crate::wire::RagSource>>,
) -> Option<Response> {
    let cached = serde_json::from_value(lookup(cache, key?).await?).ok()?;
    let stream = head.stream;
    let (answer, events) = ChatAnswer::replay(head, cached, shape);
    Some(replay(answer.with_sources(sources), events, stream))
}

/// The cached legacy completion under `key`, replayed as a new answer.
pub async fn replay_completion(
    cache: &Arc<ResponseCache>,
    key: Option<&CacheKey>,
    head: AnswerHead,
    with_logprobs: bool,
) -> Option<Response> {
    let cached = serde_json::from_value(lookup(cache, key?).await?).ok()?;
    let stream = head.stream;
    let (answer, events) = TextAnswer::replay(head, cached, with_logprobs);
    Some(replay(answer, events, stream))
}

/// A rebuilt answer sent the way a fresh one is: whole, or as the stream a
/// generation would have sent.
fn replay<A: Answer>(mut answer: A, events: Vec<(u32, ChoiceEvent)>, stream: bool) -> Response
where
    A::Chunk: Send,
{
    let response = if stream {
        let events = futures_util::stream::iter(events.into_iter().map(|(i, e)| (i, Ok(e))));
        sse(answer::stream(answer, events, |_| {}))
    } else {
        for (index, event) in events {
            answer.apply(index, event);
        }
        axum::Json(answer.whole()).into_response()
    };
    mark(response, Served::FromCache)
}
