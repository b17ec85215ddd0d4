//! What every request handler shares: settings, the model registry, the
//! response cache, the stored Responses API answers, the API keys, the
//! metrics, and when the server was last busy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::analytics::Analytics;
use crate::cache::ResponseCache;
use crate::downloads::Downloads;
use crate::keys::Keys;
use crate::models::Registry;
use crate::response_store::ResponseStore;
use crate::settings::Settings;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub cache: Arc<ResponseCache>,
    /// Who may call: the operator's keys and the named keys.
    pub keys: Arc<Keys>,
    /// Responses API answers kept for `previous_response_id` and `GET`.
    pub responses: Arc<ResponseStore>,
    pub metrics: Arc<Metrics>,
    /// Requests, tokens and latencies per minute, model and key (the dashboard's charts).
    pub analytics: Arc<Analytics>,
    /// Model downloads started from the dashboard.
    pub downloads: Arc<Downloads>,
    /// When the server started (the dashboard's uptime).
    pub started: std::time::Instant,
    /// Retrieval's collections, or why they could not be opened (reported on
    /// every retrieval request, never silently bypassed).
    pub rag: Arc<Result<rag::Library, String>>,
    /// Milliseconds since the Unix epoch of the last request's start or end.
    last_activity: Arc<AtomicU64>,
}

impl AppState {
    /// The state for `settings`: the model registry and the response cache (whose
    /// disk tier, if any, is opened here; a broken one is logged and bypassed).
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            registry: Arc::new(Registry::new(settings.clone())),
            cache: Arc::new(ResponseCache::new(settings.cache.clone())),
            responses: Arc::new(ResponseStore::open(settings.responses.clone())),
            keys: Arc::new(Keys::open(
                &settings.keys,
                &settings.host,
                &settings.data_dir,
            )),
            metrics: Arc::new(Metrics::new()),
            analytics: Arc::new(Analytics::open(
                &settings.data_dir,
                settings.analytics_retention,
            )),
            downloads: Arc::new(Downloads::new(
                crate::hub::Hub::new(settings.hub.clone()),
                settings.models_dir.clone(),
            )),
            started: std::time::Instant::now(),
            rag: Arc::new(rag::Library::open(&settings.rag.storage).map_err(|e| {
                tracing::error!(error = %e, "the document store could not be opened");
                e.to_string()
            })),
            last_activity: Arc::new(AtomicU64::new(now_millis())),
            settings,
        }
    }

    /// Marks the server busy now.
    pub fn touch(&self) {
        self.last_activity.store(now_millis(), Ordering::Relaxed);
    }

    /// How long the server has been without requests and without generating.
    pub fn idle_for(&self) -> Duration {
        if self.registry.any_busy() {
            self.touch();
        }
        let last = self.last_activity.load(Ordering::Relaxed);
        Duration::from_millis(now_millis().saturating_sub(last))
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
