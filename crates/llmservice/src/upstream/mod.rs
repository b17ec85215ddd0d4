//! Tiers served by OpenAI-compatible servers elsewhere (`{TIER}_BACKEND=openai`):
//! vLLM with tensor parallelism, a fleet of llama-servers, another
//! llmservice. Requests go to the healthy replica with the fewest in
//! flight; a replica that refuses connections or answers 502/503/504 is
//! skipped (the request moves to the next one, as long as nothing has been
//! streamed yet) and checked again with a growing pause. Everything that does
//! not need our engine stays in front: routing, keys, the response cache,
//! metrics and analytics, the translated APIs, retrieval's answers.

mod chat;
mod managed;
mod sse;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

pub use chat::{chat_events, completion_events, strip_nulls};
pub use managed::{ChildState, Supervisor};

use crate::backoff::Backoff;
use crate::settings::UpstreamSettings;

/// How often replicas are checked (`GET {base}/models`).
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// Why an upstream request did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream refused the request (a 4xx): its status and its own
    /// error, passed on.
    #[error("{message}")]
    Refused {
        status: u16,
        message: String,
        kind: Option<String>,
        param: Option<String>,
        code: Option<String>,
    },
    /// The upstream failed while answering (a 5xx, a stream cut short).
    #[error("the upstream failed: {0}")]
    Failed(String),
    /// No replica could be reached.
    #[error("no upstream replica is reachable ({0})")]
    Unavailable(String),
}

#[derive(Debug)]
struct Replica {
    base: String,
    in_flight: AtomicUsize,
    health: Mutex<Backoff>,
}

impl Replica {
    fn healthy(&self) -> bool {
        self.health.lock().is_ok_and(|h| h.healthy())
    }

    fn due(&self, now: Instant) -> bool {
        self.health.lock().is_ok_and(|h| h.due(now))
    }

    fn succeeded(&self) {
        if self.health.lock().is_ok_and(|mut h| h.succeeded()) {
            tracing::info!(upstream = %self.base, "upstream replica is back");
        }
    }

    fn failed(&self, error: &str) {
        if self.health.lock().is_ok_and(|mut h| h.failed(error)) {
            tracing::warn!(upstream = %self.base, %error, "upstream replica failed; skipping it");
        }
    }
}

/// One request's place on a replica; the count drops with it (it travels
/// inside the answer's stream).
#[derive(Debug)]
pub struct InFlight(Arc<Replica>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Upstream {
    settings: UpstreamSettings,
    replicas: Vec<Arc<Replica>>,
    http: reqwest::Client,
    checking: AtomicBool,
    /// Turns through equally loaded replicas.
    turn: AtomicUsize,
    /// Whether a rerank answer has had a `relevance_score` outside 0..1:
    /// the upstream sends raw scores, not Cohere's probabilities.
    raw_rerank_scores: AtomicBool,
    /// The width of the upstream's embeddings, learned from one (retrieval).
    embedding_width: tokio::sync::OnceCell<usize>,
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Result<Arc<Self>, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .read_timeout(settings.timeout)
            .user_agent(concat!("llmservice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot start an HTTP client: {e}"))?;
        Ok(Arc::new(Self {
            replicas: settings
                .base_urls
                .iter()
                .map(|base| {
                    Arc::new(Replica {
                        base: base.clone(),
                        in_flight: AtomicUsize::new(0),
                        health: Mutex::new(Backoff::default()),
                    })
                })
                .collect(),
            settings,
            http,
            checking: AtomicBool::new(false),
            turn: AtomicUsize::new(0),
            raw_rerank_scores: AtomicBool::new(false),
            embedding_width: tokio::sync::OnceCell::new(),
        }))
    }

    /// The model name to send: `{TIER}_UPSTREAM_MODEL`, else the client's.
    pub fn model_for(&self, requested: &str) -> String {
        self.settings
            .model
            .clone()
            .unwrap_or_else(|| requested.to_owned())
    }

    /// Fills the tier's configured sampling settings into a request body that
    /// leaves them out (`max_tokens` also counts as given by
    /// `max_completion_tokens`); `repeat_penalty` then goes by the upstream's
    /// name.
    pub fn fill_sampling(&self, body: &mut Value) {
        let Some(body) = body.as_object_mut() else {
            return;
        };
        let given = |body: &serde_json::Map<String, Value>, key: &str| {
            body.get(key).is_some_and(|v| !v.is_null())
        };
        // llama-server's n_predict (an Ollama request's num_predict) as the
        // max_tokens every OpenAI-compatible server reads.
        if let Some(n) = body.remove("n_predict").and_then(|n| n.as_i64()) {
            if n > 0 && !given(body, "max_tokens") && !given(body, "max_completion_tokens") {
                body.insert("max_tokens".into(), n.into());
            }
        }
        for (key, value) in &self.settings.sampling {
            let given = given(body, key)
                || (key == "max_tokens" && given(body, "max_completion_tokens"))
                || (key == "repeat_penalty" && given(body, "repetition_penalty"));
            if !given {
                body.insert(key.clone(), value.clone());
            }
        }
        if self.settings.repetition_penalty && given(body, "repeat_penalty") {
            if let Some(penalty) = body.remove("repeat_penalty") {
                body.entry("repetition_penalty").or_insert(penalty);
            }
        }
    }

    /// What identifies the answers of this upstream (for the response cache).
    pub fn identity(&self) -> Value {
        serde_json::json!({"upstream": self.settings.base_urls, "model": self.settings.model})
    }

    /// Requests under way on all replicas.
    pub fn in_flight(&self) -> usize {
        self.replicas
            .iter()
            .map(|r| r.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether some replica answered its last check or request.
    pub fn any_healthy(&self) -> bool {
        self.replicas.iter().any(|r| r.healthy())
    }

    /// Each replica's base URL, health, requests in flight and last error.
    pub fn replicas(&self) -> Vec<(String, bool, usize, Option<String>)> {
        self.replicas
            .iter()
            .map(|r| {
                let error = r
                    .health
                    .lock()
                    .ok()
                    .and_then(|h| h.last_error().map(str::to_owned));
                (
                    r.base.clone(),
                    r.healthy(),
                    r.in_flight.load(Ordering::Relaxed),
                    error,
                )
            })
            .collect()
    }

    /// Replicas in the order to try: those due (healthy, or past their
    /// pause) by fewest in flight, then the rest by how soon they are due.
    fn order(&self) -> Vec<Arc<Replica>> {
        let now = Instant::now();
        let n = self.replicas.len().max(1);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let (mut due, waiting): (Vec<_>, Vec<_>) = self
            .replicas
            .iter()
            .cloned()
            .enumerate()
            .partition(|(_, r)| r.due(now));
        due.sort_by_key(|(i, r)| {
            (
                !r.healthy(),
                r.in_flight.load(Ordering::Relaxed),
                (i + n - turn) % n,
            )
        });
        let mut due: Vec<Arc<Replica>> = due.into_iter().map(|(_, r)| r).collect();
        let mut waiting: Vec<Arc<Replica>> = waiting.into_iter().map(|(_, r)| r).collect();
        waiting.sort_by_key(|r| r.health.lock().ok().and_then(|h| h.retry_at()));
        due.extend(waiting);
        due
    }

    /// POSTs `body` to `path` (under the base URL) on the best replica,
    /// moving on to the next while replicas cannot be reached or are
    /// overloaded; answers the response head and the request's place.
    pub async fn post(
        self: &Arc<Self>,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::Response, InFlight), UpstreamError> {
        self.start_health_checks();
        let mut last = String::from("no replica configured");
        for replica in self.order() {
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let place = InFlight(replica.clone());
            let mut request = self.http.post(format!("{}{path}", replica.base)).json(body);
            if let Some(key) = &self.settings.api_key {
                request = request.bearer_auth(key);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(error) => {
                    last = format!("{}: {}", replica.base, error.without_url());
                    replica.failed(&last);
                    continue;
                }
            };
            let status = response.status();
            if matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ) {
                last = format!("{} answered {status}", replica.base);
                replica.failed(&last);
                continue;
            }
            replica.succeeded();
            if status.is_success() {
                return Ok((response, place));
            }
            let body = response.text().await.unwrap_or_default();
            return Err(match refusal(status, body) {
                UpstreamError::Refused { message, .. } if status.is_server_error() => {
                    UpstreamError::Failed(format!("{status}: {message}"))
                }
                refused => refused,
            });
        }
        Err(UpstreamError::Unavailable(last))
    }

    /// `POST /embeddings` for `requested` (the client's model name): the
    /// upstream's answer as it is.
    pub async fn embeddings(
        self: &Arc<Self>,
        requested: &str,
        input: Value,
        dimensions: Option<u32>,
        encoding_format: Option<&str>,
    ) -> Result<Value, UpstreamError> {
        let mut body = serde_json::json!({"model": self.model_for(requested), "input": input});
        if let Some(d) = dimensions {
            body["dimensions"] = d.into();
        }
        if let Some(format) = encoding_format {
            body["encoding_format"] = format.into();
        }
        let (response, _place) = self.post("/embeddings", &body).await?;
        response.json().await.map_err(|e| {
            UpstreamError::Failed(format!("not an embeddings answer: {}", e.without_url()))
        })
    }

    /// The dense vectors of `input` from `/embeddings`, in the inputs'
    /// order, and the tokens the upstream says it read.
    pub async fn embed(
        self: &Arc<Self>,
        requested: &str,
        input: &[String],
    ) -> Result<(Vec<Vec<f32>>, u64), UpstreamError> {
        let answer = self
            .embeddings(requested, input.into(), None, Some("float"))
            .await?;
        let data = answer["data"].as_array().ok_or_else(|| {
            UpstreamError::Failed("the embeddings answer has no `data`".to_owned())
        })?;
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; input.len()];
        for (i, item) in data.iter().enumerate() {
            let index = item["index"].as_u64().map_or(i, |index| index as usize);
            let floats = item["embedding"].as_array().and_then(|values| {
                values
                    .iter()
                    .map(|x| x.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<_>>>()
            });
            match (vectors.get_mut(index), floats) {
                (Some(slot @ None), Some(floats)) if !floats.is_empty() => *slot = Some(floats),
                _ => {
                    return Err(UpstreamError::Failed(format!(
                        "data[{i}] is not one input's embedding as a list of floats"
                    )))
                }
            }
        }
        let vectors = vectors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                UpstreamError::Failed(format!(
                    "the embeddings answer has {} vectors for {} inputs",
                    data.len(),
                    input.len()
                ))
            })?;
        let tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        Ok((vectors, tokens))
    }

    /// The width of the upstream's embeddings of `requested`, the tier's one
    /// model (one `Upstream` serves one tier), asked once; a failed ask is
    /// asked again next time.
    pub async fn embedding_width(
        self: &Arc<Self>,
        requested: &str,
    ) -> Result<usize, UpstreamError> {
        self.embedding_width
            .get_or_try_init(|| async {
                let (vectors, _) = self.embed(requested, &["width".to_owned()]).await?;
                Ok(vectors[0].len())
            })
            .await
            .copied()
    }

    /// `POST /rerank` (Cohere's shape, which vLLM, llama-server, Jina and
    /// llmservice take) for `requested`: each document's score as a logit,
    /// in the documents' order (see [`rerank_logits`]).
    pub async fn rerank(
        self: &Arc<Self>,
        requested: &str,
        query: &str,
        documents: &[String],
    ) -> Result<Vec<f32>, UpstreamError> {
        let body = serde_json::json!({"model": self.model_for(requested), "query": query,
            "documents": documents, "top_n": documents.len(), "return_documents": false});
        let (response, _place) = self.post("/rerank", &body).await?;
        let answer: Value = response.json().await.map_err(|e| {
            UpstreamError::Failed(format!("not a rerank answer: {}", e.without_url()))
        })?;
        let results = answer["results"].as_array().ok_or_else(|| {
            UpstreamError::Failed("the rerank answer has no `results`".to_owned())
        })?;
        let mut scores = vec![f64::NEG_INFINITY; documents.len()];
        for result in results {
            let index = result["index"].as_u64().map(|i| i as usize);
            let score = result["relevance_score"].as_f64();
            match (index, score) {
                (Some(i), Some(score)) if i < scores.len() => scores[i] = score,
                _ => {
                    return Err(UpstreamError::Failed(format!(
                        "a rerank result without a document's index and relevance_score: {result}"
                    )))
                }
            }
        }
        Ok(rerank_logits(scores, &self.raw_rerank_scores))
    }

    /// Checks every replica now (`GET {base}/models`).
    pub async fn check_all(&self) {
        let checks = self.replicas.iter().map(|replica| async move {
            let mut request = self
                .http
                .get(format!("{}/models", replica.base))
                .timeout(self.settings.timeout.min(Duration::from_secs(5)));
            if let Some(key) = &self.settings.api_key {
                request = request.bearer_auth(key);
            }
            match request.send().await {
                Ok(r) if r.status().is_success() => replica.succeeded(),
                Ok(r) => replica.failed(&format!("{} answered {}", replica.base, r.status())),
                Err(e) => replica.failed(&format!("{}: {}", replica.base, e.without_url())),
            }
        });
        futures_util::future::join_all(checks).await;
    }

    /// Starts the periodic checks once (on the first request, or at start).
    pub fn start_health_checks(self: &Arc<Self>) {
        if self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.checking.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                upstream.check_all().await;
                drop(upstream);
                tokio::time::sleep(HEALTH_EVERY).await;
            }
        });
    }
}

/// Rerank scores as logits. Cohere's `relevance_score` is a probability
/// (vLLM's, Jina's and ours are too): its logit, whose logistic gives it
/// back. Once an upstream has sent a score outside 0..1 (llama-server sends
/// the model's raw scores) its scores are taken as they are, from then on,
/// so one answer's scores never change meaning with the next's.
fn rerank_logits(scores: Vec<f64>, raw_seen: &AtomicBool) -> Vec<f32> {
    let outside = |s: &f64| s.is_finite() && !(0.0..=1.0).contains(s);
    if scores.iter().any(outside) {
        raw_seen.store(true, Ordering::Relaxed);
    }
    let raw = raw_seen.load(Ordering::Relaxed);
    scores
        .into_iter()
        .map(|s| {
            if raw || !s.is_finite() {
                return s as f32;
            }
            let p = s.clamp(1e-12, 1.0 - 1e-12);
            (p / (1.0 - p)).ln() as f32
        })
        .collect()
}

/// An upstream's 4xx as our error, with its own message (OpenAI's shape,
/// or whatever text it sent).
fn refusal(status: StatusCode, body: String) -> UpstreamError {
    let parsed: Option<Value> = serde_json::from_str(&body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = field("message")
        .or_else(|| error.and_then(Value::as_str).map(str::to_owned))
        .or_else(|| {
            parsed
                .as_ref()
                .and_then(|v| v.get("detail"))
                .map(|d| d.to_string())
        })
        .unwrap_or_else(|| body.chars().take(500).collect());
    UpstreamError::Refused {
        status: status.as_u16(),
        message: format!("upstream: {message}"),
        kind: field("type"),
        param: field("param"),
        code: field("code"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiers_sampling_fills_what_a_request_leaves_out_under_the_upstreams_names() {
        let sampling =
            serde_json::json!({"temperature": 0.3, "repeat_penalty": 1.2, "max_tokens": 64});
        let upstream = Upstream::new(UpstreamSettings {
            base_urls: vec!["http://127.0.0.1:9/v1".to_owned()],
            api_key: None,
            model: None,
            timeout: Duration::from_secs(1),
            sampling: sampling.as_object().unwrap().clone(),
            repetition_penalty: true,
        })
        .unwrap();
        let mut body = serde_json::json!({"model": "m", "temperature": null, "repeat_penalty": 1.05,
            "max_completion_tokens": 10});
        upstream.fill_sampling(&mut body);
        assert_eq!(
            body,
            serde_json::json!({"model": "m", "temperature": 0.3, "repetition_penalty": 1.05,
                "max_completion_tokens": 10})
        );
        let mut body = serde_json::json!({"model": "m"});
        upstream.fill_sampling(&mut body);
        assert_eq!(
            body,
            serde_json::json!({"model": "m", "temperature": 0.3,
            "repetition_penalty": 1.2, "max_tokens": 64})
        );
    }

    #[test]
    fn rerank_probabilities_become_logits_and_raw_scores_stay_raw() {
        let raw_seen = AtomicBool::new(false);
        let logits = rerank_logits(vec![0.5, 0.880_797, 1.0, 0.0], &raw_seen);
        assert!(
            logits[0].abs() < 1e-6 && (logits[1] - 2.0).abs() < 1e-4,
            "{logits:?}"
        );
        // A certain document still ranks above a very likely one.
        assert!(logits[2] > logits[1] && logits[3] < logits[0], "{logits:?}");
        // An upstream that sends raw scores is read as raw from then on,
        // even when a later answer's happen to fall inside 0..1.
        assert_eq!(rerank_logits(vec![3.5, -1.0], &raw_seen), vec![3.5, -1.0]);
        assert_eq!(rerank_logits(vec![0.25, 0.75], &raw_seen), vec![0.25, 0.75]);
    }
}
