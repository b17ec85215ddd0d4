//! Prometheus metrics (`GET /metrics`, text format): requests by route and
//! status, tokens in and out, time to first token and between tokens per model,
//! and, read at scrape time, queue depth, loaded models and the response cache.

use std::time::{Duration, Instant};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::ResponseCache;
use crate::models::Registry as ModelRegistry;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    prompt_tokens: IntCounterVec,
    cached_prompt_tokens: IntCounterVec,
    completion_tokens: IntCounterVec,
    ttft_seconds: HistogramVec,
    inter_token_seconds: HistogramVec,
    queue: IntGaugeVec,
    speculation: IntCounterVec,
    prompt_cache: IntCounterVec,
    prompt_cache_bytes: IntGaugeVec,
    loaded: IntGaugeVec,
    cache: IntGaugeVec,
    rag: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
];

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("llmservice".to_owned()), None).expect("a valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            requests: counter(
                "http_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            ),
            request_seconds: histogram(
                "http_request_duration_seconds",
                "Time to the response head, by route",
                &["route"],
                LATENCY_BUCKETS,
            ),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens processed", &["model"]),
            cached_prompt_tokens: counter(
                "prompt_tokens_cached_total",
                "Prompt tokens reused from the KV cache",
                &["model"],
            ),
            completion_tokens: counter("completion_tokens_total", "Tokens generated", &["model"]),
            ttft_seconds: histogram(
                "time_to_first_token_seconds",
                "Request start to first generated text",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inter_token_seconds: histogram(
                "inter_token_latency_seconds",
                "Time between streamed text events",
                &["model"],
                INTER_TOKEN_BUCKETS,
            ),
            queue: gauge(
                "sequences",
                "Sequences per loaded model, by state (active, waiting)",
                &["model", "state"],
            ),
            speculation: counter(
                "speculative_tokens_total",
                "Speculative decoding per loaded model: guesses checked (checks), tokens \
                 guessed (drafted) and kept (accepted); accepted / checks is the tokens each \
                 check saved",
                &["model", "outcome"],
            ),
            prompt_cache: counter(
                "prompt_cache_total",
                "Prompt KV in host memory per loaded model: prompts that continued a \
                 restored prefix (hits) and the tokens they did not recompute (tokens)",
                &["model", "outcome"],
            ),
            prompt_cache_bytes: gauge(
                "prompt_cache_bytes",
                "Bytes of prompt KV held in host memory per loaded model",
                &["model"],
            ),
            loaded: gauge(
                "model_loaded",
                "1 for each loaded model",
                &["model", "kind"],
            ),
            cache: gauge(
                "response_cache",
                "Response cache counters (hits, misses, entries, evictions, bytes)",
                &["stat"],
            ),
            rag: gauge(
                "rag_collection",
                "Retrieval collections: documents, chunks and bytes on disk",
                &["collection", "stat"],
            ),
            registry,
        }
    }

    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.request_seconds
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_usage(&self, model: &str, usage: &engine::Usage) {
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(usage.prompt_tokens));
        self.cached_prompt_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(usage.cached_tokens));
        self.completion_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(usage.completion_tokens));
    }

    /// Times one choice's text events: the first as time to first token, the rest as
    /// inter-token latency.
    pub fn token_timer(&self, model: &str, started: Instant) -> TokenTimer {
        TokenTimer {
            ttft: self.ttft_seconds.with_label_values(&[model]),
            inter_token: self.inter_token_seconds.with_label_values(&[model]),
            started,
            last: None,
            ledger: crate::analytics::Ledger::current(),
        }
    }

    /// The text exposition, with the gauges read from the models, the cache
    /// and the retrieval collections now (this reads disk: call it off the
    /// async threads).
    pub fn render(
        &self,
        models: &ModelRegistry,
        cache: &ResponseCache,
        collections: &[(rag::CollectionMeta, rag::CollectionStats)],
    ) -> String {
        self.queue.reset();
        self.speculation.reset();
        self.prompt_cache.reset();
        self.prompt_cache_bytes.reset();
        self.loaded.reset();
        for entry in models.loaded() {
            self.loaded
                .with_label_values(&[&entry.id, entry.kind.as_str()])
                .set(1);
            if let Some(engine) = entry.loaded_engine() {
                let stats = engine.stats();
                let load = |v: &std::sync::atomic::AtomicUsize| {
                    v.load(std::sync::atomic::Ordering::Relaxed) as i64
                };
                self.queue
                    .with_label_values(&[&entry.id, "active"])
                    .set(load(&stats.active));
                self.queue
                    .with_label_values(&[&entry.id, "waiting"])
                    .set(load(&stats.waiting));
                // The engine keeps these counts; a counter here shows them as they are.
                for (outcome, count) in [
                    ("checks", &stats.verifications),
                    ("drafted", &stats.drafted),
                    ("accepted", &stats.draft_accepted),
                ] {
                    self.speculation
                        .with_label_values(&[&entry.id, outcome])
                        .inc_by(count.load(std::sync::atomic::Ordering::Relaxed));
                }
                let relaxed = std::sync::atomic::Ordering::Relaxed;
                for (outcome, count) in [
                    ("hits", stats.host_hits.load(relaxed)),
                    ("tokens", stats.host_tokens.load(relaxed)),
                ] {
                    self.prompt_cache
                        .with_label_values(&[&entry.id, outcome])
                        .inc_by(count);
                }
                self.prompt_cache_bytes
                    .with_label_values(&[&entry.id])
                    .set(load(&stats.host_bytes));
            }
        }
        let cache = cache.stats();
        for (stat, value) in [
            ("hits", cache.hits),
            ("misses", cache.misses),
            ("entries", cache.entries),
            ("evictions", cache.evictions),
            ("bytes", cache.bytes),
        ] {
            self.cache.with_label_values(&[stat]).set(value as i64);
        }
        self.rag.reset();
        for (meta, stats) in collections {
            for (stat, value) in [
                ("documents", Some(stats.documents)),
                ("chunks", Some(stats.chunks)),
                ("bytes", stats.bytes),
            ] {
                if let Some(value) = value {
                    self.rag
                        .with_label_values(&[&meta.name, stat])
                        .set(value as i64);
                }
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct TokenTimer {
    ttft: prometheus::Histogram,
    inter_token: prometheus::Histogram,
    started: Instant,
    last: Option<Instant>,
    /// The request's analytics, when the timer was made while it was handled.
    ledger: Option<std::sync::Arc<crate::analytics::Ledger>>,
}

impl TokenTimer {
    pub fn text(&mut self) {
        let now = Instant::now();
        match self.last {
            None => {
                let elapsed = now.duration_since(self.started);
                self.ttft.observe(elapsed.as_secs_f64());
                if let Some(ledger) = &self.ledger {
                    ledger.note_first_token(elapsed);
                }
            }
            Some(last) => self
                .inter_token
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}
