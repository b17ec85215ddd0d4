//! The model registry: the configured tiers plus every GGUF in the models
//! directory, how a request's `model` name resolves to one of them, and lazy,
//! single-flight loading.
//!
//! Lock order: `Registry::load_turn`, then the loading model's `engine` lock;
//! other models' `engine` locks and `Registry::dir_cache` are only ever
//! tried (never waited on) while those are held, and `dir_cache` is never held
//! while an `engine` lock is taken.

mod overrides;
mod routing;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use engine::{Engine, EngineConfig, EngineError, ModelKind};

use crate::settings::{Backend, GenerationDefaults, ManagedKind, Settings, Tier};

pub use overrides::{InvalidOverride, ModelOverrides, OverrideStore};
pub use routing::tier_for_name;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Known and loadable; not in memory.
    Available,
    Loading,
    Loaded,
    /// The last load attempt failed; the next request tries again.
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Available => "available",
            ModelState::Loading => "loading",
            ModelState::Loaded => "loaded",
            ModelState::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ModelState::Loading,
            2 => ModelState::Loaded,
            3 => ModelState::Failed,
            _ => ModelState::Available,
        }
    }
}

/// Why a model could not be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model '{name}' not found")]
    NotFound {
        name: String,
        available: Vec<String>,
    },
    #[error("model '{0}' is loading")]
    Loading(String),
    #[error("model '{0}' is serving requests and cannot be unloaded now")]
    InUse(String),
    #[error(transparent)]
    Load(#[from] EngineError),
    /// The model is served upstream; the route needs one loaded here.
    #[error("model '{0}' is served upstream")]
    Upstream(String),
}

/// One servable model file and, once loaded, its engine.
pub struct ModelEntry {
    pub id: String,
    pub tier: Option<Tier>,
    pub path: PathBuf,
    pub kind: ModelKind,
    /// Unix seconds of the file's modification time (OpenAI's `created`).
    pub created: i64,
    /// What the configuration (environment, defaults) says, before the
    /// operator's overrides.
    configured: (EngineConfig, GenerationDefaults),
    /// With the overrides: the engine settings of the next load, and the
    /// sampling defaults of the next request.
    effective: std::sync::RwLock<(EngineConfig, GenerationDefaults)>,
    /// The engine settings the loaded engine was loaded with.
    loaded_with: Mutex<Option<EngineConfig>>,
    /// Held for the whole load, so concurrent first requests load once.
    engine: Arc<tokio::sync::Mutex<Option<Arc<Engine>>>>,
    /// The loaded engine for readers that must never wait or miss it because a
    /// load or unload holds `engine` (health, metrics, busy checks).
    loaded: std::sync::RwLock<Option<Arc<Engine>>>,
    state: AtomicU8,
    last_error: Mutex<Option<String>>,
    /// Unload after this long unused (`{TIER}_KEEP_ALIVE`); `None` keeps it loaded.
    pub keep_alive: Option<std::time::Duration>,
    /// Default `dimensions` for embeddings (`{TIER}_EMBEDDING_DIMENSION`).
    pub embedding_dimension: Option<u32>,
    /// What serves it (llama.cpp here, unless a tier says otherwise).
    pub backend: Backend,
    /// The OpenAI-compatible servers that answer for it (`openai` tiers,
    /// and the child of a managed one).
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
    /// The child process serving it (`vllm`, `mlx`, `{TIER}_COMMAND` tiers).
    pub managed: Option<Arc<crate::upstream::Supervisor>>,
    /// Milliseconds since the Unix epoch of the last use.
    last_used: std::sync::atomic::AtomicU64,
    /// Its GGUF header's summary (`None` for a model served elsewhere, or a
    /// file that does not read).
    pub gguf: Option<engine::GgufSummary>,
    /// The model file's size (its weights), for `MAX_MODEL_MEMORY`.
    file_bytes: u64,
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry").field("id", &self.id).finish()
    }
}

impl ModelEntry {
    fn new(
        id: String,
        tier: Option<Tier>,
        path: PathBuf,
        kind: ModelKind,
        engine_config: EngineConfig,
        defaults: GenerationDefaults,
    ) -> Self {
        let meta = std::fs::metadata(&path).ok();
        let created = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        Self {
            id,
            tier,
            path,
            kind,
            created,
            effective: std::sync::RwLock::new((engine_config.clone(), defaults.clone())),
            configured: (engine_config, defaults),
            loaded_with: Mutex::new(None),
            engine: Default::default(),
            loaded: std::sync::RwLock::new(None),
            state: AtomicU8::new(0),
            last_error: Mutex::new(None),
            keep_alive: None,
            embedding_dimension: None,
            backend: Backend::LlamaCpp,
            upstream: None,
            managed: None,
            last_used: std::sync::atomic::AtomicU64::new(now_millis()),
            gguf: None,
            file_bytes: meta.map_or(0, |m| m.len()),
        }
    }

    /// The memory loading it takes here, estimated: its weights (the file),
    /// its KV cache (f16, the context the next load gets) and the most its
    /// host-memory prompt cache may hold. Compute buffers are left out; a
    /// model served by another server takes none here.
    pub fn memory_estimate(&self) -> u64 {
        let Some(gguf) = self.gguf.as_ref().filter(|_| self.upstream.is_none()) else {
            return 0;
        };
        let config = self.engine_config();
        let n_ctx = gguf
            .context_length
            .map_or(u64::from(config.n_ctx), |c| c.min(u64::from(config.n_ctx)));
        let kv = gguf
            .kv_bytes_per_token
            .map_or(0, |b| b.saturating_mul(n_ctx));
        let host = if self.kind == ModelKind::Chat {
            config.host_cache_bytes as u64
        } else {
            0
        };
        self.file_bytes.saturating_add(kv).saturating_add(host)
    }

    fn touch(&self) {
        self.last_used.store(now_millis(), Ordering::Relaxed);
    }

    /// The engine settings the next load uses.
    pub fn engine_config(&self) -> EngineConfig {
        self.effective
            .read()
            .map_or_else(|e| e.into_inner().0.clone(), |c| c.0.clone())
    }

    /// The sampling defaults a request's own values override.
    pub fn defaults(&self) -> GenerationDefaults {
        self.effective
            .read()
            .map_or_else(|e| e.into_inner().1.clone(), |c| c.1.clone())
    }

    /// Whether the loaded engine runs with other engine settings than the
    /// next load would use (the operator changed them since).
    pub fn reload_needed(&self) -> bool {
        let loaded_with = self.loaded_with.lock().ok().and_then(|c| c.clone());
        self.loaded_engine().is_some() && loaded_with.is_some_and(|c| c != self.engine_config())
    }

    /// The configured settings with `overrides` put in, from now on.
    pub fn apply_overrides(&self, overrides: &ModelOverrides) {
        let (engine, defaults) =
            overrides.apply(self.configured.0.clone(), self.configured.1.clone());
        if let Ok(mut effective) = self.effective.write() {
            *effective = (engine, defaults);
        }
    }

    /// How long since the model last served or was asked for.
    pub fn idle_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            now_millis().saturating_sub(self.last_used.load(Ordering::Relaxed)),
        )
    }

    /// Whether a loaded engine has work or is held by a request in flight.
    pub fn is_busy(&self) -> bool {
        if let Some(upstream) = &self.upstream {
            return upstream.in_flight() > 0;
        }
        // Our clone, the load slot's and the published one: anything more is a request.
        self.loaded_engine().is_some_and(|e| in_use(&e, 3))
    }

    /// The upstream that serves this model (a managed child started first,
    /// and waited for unless `wait` is false); `None` for a model run here.
    pub async fn ready_upstream(
        &self,
        wait: bool,
    ) -> Option<Result<Arc<crate::upstream::Upstream>, ModelError>> {
        let upstream = self.upstream.clone()?;
        self.touch();
        let Some(managed) = &self.managed else {
            return Some(Ok(upstream));
        };
        if matches!(managed.state(), crate::upstream::ChildState::Running { .. }) {
            return Some(Ok(upstream));
        }
        // Read only when a start is due (it looks through PATH).
        if let Err(reason) = self.backend_available() {
            return Some(Err(self.failed_load(reason)));
        }
        let start = {
            let managed = managed.clone();
            async move { managed.ensure_running().await }
        };
        if !wait {
            tokio::spawn(start);
            return Some(Err(ModelError::Loading(self.id.clone())));
        }
        Some(match start.await {
            Ok(()) => Ok(upstream),
            Err(reason) => Err(self.failed_load(reason)),
        })
    }

    fn failed_load(&self, reason: String) -> ModelError {
        self.set_state(ModelState::Failed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(reason.clone());
        }
        ModelError::Load(EngineError::LoadFailed {
            path: self.path.clone(),
            reason,
        })
    }

    /// Unloads the model if nothing is using it: its memory is returned when the
    /// engine thread has finished (joined off the async threads). `Ok(false)` when
    /// it was not loaded.
    pub async fn unload(&self) -> Result<bool, ModelError> {
        if let Some(managed) = &self.managed {
            if self.is_busy() {
                return Err(ModelError::InUse(self.id.clone()));
            }
            let stopped = managed.stop().await;
            self.set_state(ModelState::Available);
            return Ok(stopped);
        }
        let Ok(mut slot) = self.engine.try_lock() else {
            return Err(ModelError::Loading(self.id.clone()));
        };
        let Some(engine) = slot.as_ref() else {
            return Ok(false);
        };
        // The load slot's reference and the published one are the registry's own.
        if in_use(engine, 2) {
            return Err(ModelError::InUse(self.id.clone()));
        }
        self.publish(None);
        let engine = slot.take().expect("checked above");
        // The slot stays locked and the state stays "loaded" until the memory is
        // back: a reload waits for it, and "available" means the memory is free.
        let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
        self.set_state(ModelState::Available);
        drop(slot);
        tracing::info!(model = %self.id, "model unloaded");
        Ok(true)
    }

    pub fn owned_by(&self) -> String {
        match self.tier {
            Some(t) => format!("llmservice-{}", t.as_str()),
            None => "llmservice".to_owned(),
        }
    }

    pub fn state(&self) -> ModelState {
        if let Some(managed) = &self.managed {
            use crate::upstream::ChildState;
            return match managed.state() {
                ChildState::Stopped => ModelState::from_u8(self.state.load(Ordering::Acquire)),
                ChildState::Starting => ModelState::Loading,
                ChildState::Running { .. } => ModelState::Loaded,
                ChildState::Failed(_) => ModelState::Failed,
            };
        }
        if let Some(upstream) = &self.upstream {
            // Served as long as some replica answers.
            return if upstream.any_healthy() {
                ModelState::Loaded
            } else {
                ModelState::Failed
            };
        }
        ModelState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn last_error(&self) -> Option<String> {
        if let Some(crate::upstream::ChildState::Failed(why)) =
            self.managed.as_ref().map(|m| m.state())
        {
            return Some(why);
        }
        if let Some(upstream) = self.upstream.as_ref().filter(|_| self.managed.is_none()) {
            return upstream
                .replicas()
                .into_iter()
                .find_map(|(_, _, _, error)| error);
        }
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set_state(&self, state: ModelState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Whether this machine can run the model's backend; why not if it
    /// cannot (told at load time, so a seed's `.env` still starts).
    fn backend_available(&self) -> Result<(), String> {
        let Backend::Managed(managed) = &self.backend else {
            return Ok(());
        };
        let apple_silicon = cfg!(all(target_os = "macos", target_arch = "aarch64"));
        if managed.kind == ManagedKind::Mlx && managed.default_command && !apple_silicon {
            return Err(format!(
                "{} is configured with the mlx backend, which runs on Apple Silicon only \
                 (this machine is {}/{}): set its BACKEND to llamacpp and its MODEL_PATH to a GGUF file",
                self.id,
                std::env::consts::OS,
                std::env::consts::ARCH
            ));
        }
        let program = managed
            .command
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if managed.default_command && !on_path(program) {
            let install = match managed.kind {
                ManagedKind::Vllm => "pip install vllm",
                _ => "pip install mlx-lm",
            };
            return Err(format!(
                "{} needs `{program}`, which is not on PATH ({install}), or a {{TIER}}_COMMAND",
                self.id
            ));
        }
        Ok(())
    }

    /// The loaded engine, if it is loaded and alive; never waits on a load.
    pub fn loaded_engine(&self) -> Option<Arc<Engine>> {
        self.loaded
            .read()
            .ok()
            .and_then(|g| g.clone())
            .filter(|e| e.is_alive())
    }

    fn publish(&self, engine: Option<Arc<Engine>>) {
        if let Ok(mut slot) = self.loaded.write() {
            *slot = engine;
        }
    }

    /// The engine, loading it first if needed. With `wait == false`, a model that
    /// is not loaded yet starts loading and the call answers [`ModelError::Loading`].
    pub async fn engine(self: &Arc<Self>, wait: bool) -> Result<Arc<Engine>, ModelError> {
        self.engine_within(wait, None).await
    }

    /// [`ModelEntry::engine`], where a load first makes room under `registry`'s
    /// `MAX_LOADED_MODELS`.
    async fn engine_within(
        self: &Arc<Self>,
        wait: bool,
        registry: Option<Arc<Registry>>,
    ) -> Result<Arc<Engine>, ModelError> {
        self.touch();
        if self.upstream.is_some() {
            return Err(ModelError::Upstream(self.id.clone()));
        }
        if let Some(engine) = self.loaded_engine() {
            return Ok(engine);
        }
        let load = self.clone().start_load(registry);
        if !wait {
            return Err(ModelError::Loading(self.id.clone()));
        }
        load.await
    }

    /// Starts loading in a task of its own, so a client that gives up does not
    /// abandon a half-done load; the returned future yields its outcome.
    ///
    /// Under a registry with `MAX_LOADED_MODELS` or `MAX_MODEL_MEMORY`, loads take turns: each makes
    /// room and finishes before the next counts what is loaded, so two first
    /// requests for different models cannot both see a free place.
    fn start_load(
        self: Arc<Self>,
        registry: Option<Arc<Registry>>,
    ) -> impl std::future::Future<Output = Result<Arc<Engine>, ModelError>> {
        let task = tokio::spawn(async move {
            let registry = registry.filter(|r| {
                r.settings.max_loaded_models.is_some() || r.settings.max_model_memory.is_some()
            });
            let _turn = match &registry {
                Some(r) => Some(r.load_turn.clone().lock_owned().await),
                None => None,
            };
            let mut slot = self.engine.clone().lock_owned().await;
            if let Some(engine) = slot.as_ref() {
                if engine.is_alive() {
                    return Ok(engine.clone());
                }
                tracing::warn!(model = %self.id, "the model's engine stopped; loading it again");
                let dead = slot.take();
                self.publish(None);
                let _ = tokio::task::spawn_blocking(move || drop(dead)).await;
            }
            if let Some(registry) = &registry {
                registry.make_room_for(&self).await;
            }
            self.set_state(ModelState::Loading);
            if let Err(reason) = self.backend_available() {
                self.set_state(ModelState::Failed);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(reason.clone());
                }
                return Err(ModelError::Load(EngineError::LoadFailed {
                    path: self.path.clone(),
                    reason,
                }));
            }
            let entry = self.clone();
            let config = self.engine_config();
            if let Ok(mut loaded_with) = self.loaded_with.lock() {
                *loaded_with = Some(config.clone());
            }
            let loaded = tokio::task::spawn_blocking(move || {
                Engine::load(&entry.path, config).map(Arc::new)
            })
            .await
            .unwrap_or_else(|e| {
                Err(EngineError::LoadFailed {
                    path: self.path.clone(),
                    reason: format!("the loader panicked: {e}"),
                })
            });
            match loaded {
                Ok(engine) => {
                    *slot = Some(engine.clone());
                    self.publish(Some(engine.clone()));
                    self.set_state(ModelState::Loaded);
                    if let Ok(mut e) = self.last_error.lock() {
                        *e = None;
                    }
                    Ok(engine)
                }
                Err(error) => {
                    tracing::error!(model = %self.id, path = %self.path.display(), %error, "model failed to load");
                    self.set_state(ModelState::Failed);
                    if let Ok(mut e) = self.last_error.lock() {
                        *e = Some(error.to_string());
                    }
                    Err(ModelError::Load(error))
                }
            }
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(ModelError::Load(EngineError::Inference(format!(
                    "model loading task failed: {e}"
                ))))
            })
        }
    }
}

/// Whether requests hold or keep `engine` busy, given how many references the
/// caller itself accounts for.
fn in_use(engine: &Arc<Engine>, own_references: usize) -> bool {
    let stats = engine.stats();
    Arc::strong_count(engine) > own_references
        || engine.in_flight() > 0
        || stats.active.load(Ordering::Relaxed) > 0
        || stats.waiting.load(Ordering::Relaxed) > 0
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The natural kind of a tier, used when its file cannot be inspected.
fn tier_kind(tier: Tier) -> ModelKind {
    match tier {
        Tier::Light | Tier::Medium | Tier::Heavy => ModelKind::Chat,
        Tier::Embedding => ModelKind::Embedding,
        Tier::Reranker => ModelKind::Reranker,
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// How long a scan of the models directory answers name lookups before the
/// next one reads the disk again. A name no model answers always rescans, so a
/// file just dropped into the directory resolves on its first request.
const DIR_SCAN_FRESH: Duration = Duration::from_secs(2);

/// The name seed 004's clients send for "whatever chat model is the default".
const DEFAULT_MODEL: &str = "default";

#[derive(Default)]
struct DirCache {
    /// Each GGUF file seen, by path, with the (mtime, size) it was inspected at.
    files: HashMap<PathBuf, (SystemTime, u64, Arc<ModelEntry>)>,
    /// The last scan's servable entries (files no tier serves), in path order.
    entries: Vec<Arc<ModelEntry>>,
    scanned_at: Option<Instant>,
}

pub struct Registry {
    settings: Arc<Settings>,
    tiers: Vec<Arc<ModelEntry>>,
    /// The tiers' files, resolved once: a directory file that is one of them is
    /// not listed twice.
    tier_paths: Vec<PathBuf>,
    dir_cache: Mutex<DirCache>,
    /// Held by the load in progress when `MAX_LOADED_MODELS` is set.
    load_turn: Arc<tokio::sync::Mutex<()>>,
    /// The operator's per-model settings.
    overrides: OverrideStore,
}

impl Registry {
    pub fn new(settings: Arc<Settings>) -> Self {
        let overrides = OverrideStore::open(&settings.data_dir);
        let tiers = settings
            .tiers
            .iter()
            .map(|t| {
                let (kind, gguf) = match t.backend {
                    // An MLX model is a directory or a Hub name, not a GGUF;
                    // an upstream's is elsewhere.
                    Backend::Managed(_) | Backend::OpenAi(_) => (tier_kind(t.tier), None),
                    Backend::LlamaCpp => match engine::inspect(&t.model_path) {
                        Some(summary) => (summary.kind, Some(summary)),
                        None => {
                            tracing::warn!(tier = t.tier.as_str(), path = %t.model_path.display(), "tier model is not a readable GGUF file");
                            (tier_kind(t.tier), None)
                        }
                    },
                };
                // `{TIER}_EMBEDDING_MODE`: a generative model served for embeddings.
                let kind = if t.engine.embedding_mode && kind == ModelKind::Chat {
                    ModelKind::Embedding
                } else {
                    kind
                };
                let mut entry = ModelEntry::new(
                    format!("{}/{}", t.tier.as_str(), file_stem(&t.model_path)),
                    Some(t.tier),
                    t.model_path.clone(),
                    kind,
                    t.engine.clone(),
                    t.defaults.clone(),
                );
                entry.gguf = gguf;
                entry.keep_alive = t.keep_alive;
                entry.embedding_dimension = t.embedding_dimension;
                entry.backend = t.backend.clone();
                match &t.backend {
                    Backend::OpenAi(upstream) => match crate::upstream::Upstream::new(upstream.clone()) {
                        Ok(upstream) => entry.upstream = Some(upstream),
                        Err(error) => tracing::error!(tier = t.tier.as_str(), %error, "upstream unusable"),
                    },
                    Backend::Managed(managed) => match managed_child(&entry.id, &t.model_path, managed) {
                        Ok((upstream, supervisor)) => {
                            entry.upstream = Some(upstream);
                            entry.managed = Some(supervisor);
                        }
                        Err(error) => tracing::error!(tier = t.tier.as_str(), %error, "upstream child unusable"),
                    },
                    Backend::LlamaCpp => {}
                }
                entry.apply_overrides(&overrides.get(&entry.id));
                Arc::new(entry)
            })
            .collect();
        let tier_paths = settings
            .tiers
            .iter()
            .map(|t| canonical(&t.model_path))
            .collect();
        Self {
            settings,
            tiers,
            tier_paths,
            dir_cache: Mutex::new(DirCache::default()),
            load_turn: Default::default(),
            overrides,
        }
    }

    /// The operator's overrides of a model's settings.
    pub fn overrides(&self, entry: &ModelEntry) -> ModelOverrides {
        self.overrides.get(&entry.id)
    }

    /// Keeps new overrides for a model and applies them (engine settings at
    /// its next load). Blocking: it writes the settings file.
    pub fn set_overrides(
        &self,
        entry: &ModelEntry,
        overrides: ModelOverrides,
    ) -> Result<(), String> {
        self.overrides.set(&entry.id, overrides.clone())?;
        entry.apply_overrides(&overrides);
        Ok(())
    }

    /// Every servable model: the tiers, then the models directory's files that
    /// no tier already serves, as the directory is now.
    pub fn list(&self) -> Vec<Arc<ModelEntry>> {
        self.list_within(Duration::ZERO)
    }

    /// [`Registry::list`] from a directory scan at most `max_age` old.
    fn list_within(&self, max_age: Duration) -> Vec<Arc<ModelEntry>> {
        let mut all = self.tiers.clone();
        all.extend(self.scan_dir(max_age));
        all
    }

    /// Loaded models, without touching the disk or waiting on any lock.
    pub fn loaded(&self) -> Vec<Arc<ModelEntry>> {
        let mut loaded: Vec<_> = self
            .tiers
            .iter()
            .filter(|e| e.state() == ModelState::Loaded)
            .cloned()
            .collect();
        if let Ok(cache) = self.dir_cache.try_lock() {
            loaded.extend(
                cache
                    .files
                    .values()
                    .filter(|(_, _, e)| e.state() == ModelState::Loaded)
                    .map(|(_, _, e)| e.clone()),
            );
        }
        loaded
    }

    /// The upstream that serves `entry`, its managed child started first
    /// (making room under `MAX_LOADED_MODELS` as a load here would); `None`
    /// for a model run here. Without `wait` a child that is not serving yet
    /// is started and the request told to come back.
    pub async fn upstream(
        &self,
        entry: &Arc<ModelEntry>,
        wait: bool,
    ) -> Result<Option<Arc<crate::upstream::Upstream>>, ModelError> {
        if entry.managed.is_some() && entry.state() != ModelState::Loaded {
            // In turn with loads, which count what is loaded too.
            let _turn = self.load_turn.lock().await;
            self.make_room_for(entry).await;
        }
        entry.ready_upstream(wait).await.transpose()
    }

    /// The tiers served upstream (`openai`, and managed children).
    pub fn upstream_tiers(&self) -> Vec<Arc<ModelEntry>> {
        self.tiers
            .iter()
            .filter(|e| e.upstream.is_some())
            .cloned()
            .collect()
    }

    /// Stops every managed tier's child (at exit), whatever it is doing.
    pub async fn stop_children(&self) {
        let children = self.tiers.iter().filter_map(|e| e.managed.clone());
        futures_util::future::join_all(children.map(|c| async move { c.stop().await })).await;
    }

    /// Makes the model ready to serve: its engine loaded here, or its
    /// upstream (a managed child started).
    pub async fn ready(
        self: &Arc<Self>,
        entry: &Arc<ModelEntry>,
        wait: bool,
    ) -> Result<(), ModelError> {
        if entry.upstream.is_some() {
            self.upstream(entry, wait).await?;
        } else {
            self.engine(entry, wait).await?;
        }
        Ok(())
    }

    /// Loads (`load`) or unloads a model on an operator's word: an engine
    /// here, a managed child started or stopped, or an upstream's replicas
    /// checked at once (they are "loaded" while they answer).
    pub async fn operate(
        self: &Arc<Self>,
        entry: &Arc<ModelEntry>,
        load: bool,
    ) -> Result<(), ModelError> {
        match (&entry.upstream, &entry.managed) {
            (Some(upstream), None) => upstream.check_all().await,
            _ if load => self.ready(entry, true).await?,
            _ => {
                entry.unload().await?;
            }
        }
        Ok(())
    }

    /// The model's engine, loading it if needed; when that would exceed
    /// `MAX_LOADED_MODELS`, the least recently used idle model is unloaded first.
    pub async fn engine(
        self: &Arc<Self>,
        entry: &Arc<ModelEntry>,
        wait: bool,
    ) -> Result<Arc<Engine>, ModelError> {
        entry.engine_within(wait, Some(self.clone())).await
    }

    /// Before `target` loads: unloads the least recently used idle models
    /// until it fits under `MAX_LOADED_MODELS` and `MAX_MODEL_MEMORY`.
    async fn make_room_for(&self, target: &ModelEntry) {
        if self.evict_around(target).await {
            // Models in use are never evicted: go over the limit rather than
            // fail; the idle sweep evicts once they are idle.
            tracing::warn!(
                max = self.settings.max_loaded_models,
                budget_mib = self.settings.max_model_memory.map(|b| b >> 20),
                need_mib = target.memory_estimate() >> 20,
                model = %target.id,
                "MAX_LOADED_MODELS or MAX_MODEL_MEMORY reached and every other loaded model is in use (or none is left to unload)"
            );
        }
    }

    /// Unloads the least recently used idle models other than `keep` until
    /// `keep` and the rest fit under `MAX_LOADED_MODELS` and
    /// `MAX_MODEL_MEMORY`; answers whether they still do not.
    async fn evict_around(&self, keep: &ModelEntry) -> bool {
        let (max, budget) = (
            self.settings.max_loaded_models,
            self.settings.max_model_memory,
        );
        if max.is_none() && budget.is_none() {
            return false;
        }
        let need = keep.memory_estimate();
        loop {
            let others: Vec<_> = self
                .loaded()
                .into_iter()
                .filter(|e| e.id != keep.id && holds_resources(e))
                .collect();
            let too_many = max.is_some_and(|m| others.len() >= m);
            let too_big = budget.is_some_and(|b| memory_of(&others).saturating_add(need) > b);
            if !too_many && !too_big {
                return false;
            }
            // Over the memory budget alone, only a model that takes memory
            // here is worth unloading.
            let victim = others
                .iter()
                .filter(|e| !e.is_busy() && (too_many || e.memory_estimate() > 0))
                .max_by_key(|e| e.idle_for());
            let Some(victim) = victim else {
                return true;
            };
            tracing::info!(evicted = %victim.id, max, budget_mib = budget.map(|b| b >> 20), "MAX_LOADED_MODELS or MAX_MODEL_MEMORY reached: unloading the least recently used model");
            if victim.unload().await.is_err() {
                return true;
            }
        }
    }

    /// Unloads every model idle past its keep-alive (never one in use), and
    /// idle models beyond `MAX_LOADED_MODELS` or `MAX_MODEL_MEMORY` that
    /// loads had to exceed while every loaded model was busy.
    pub async fn unload_idle(&self) {
        for entry in self.loaded() {
            if entry.is_busy() {
                entry.touch();
                continue;
            }
            if entry.keep_alive.is_some_and(|k| entry.idle_for() >= k) {
                let _ = entry.unload().await;
            }
        }
        // A load in progress makes its own room; this sweep waits its turn.
        let Ok(_turn) = self.load_turn.try_lock() else {
            return;
        };
        // The most recently used model stays, even alone over the budget:
        // the older ones make room for it, as at its load.
        let loaded = self.loaded();
        if let Some(newest) = loaded
            .iter()
            .filter(|e| holds_resources(e))
            .min_by_key(|e| e.idle_for())
        {
            self.evict_around(newest).await;
        }
    }

    /// Whether any loaded model is generating or has requests waiting.
    pub fn any_busy(&self) -> bool {
        self.loaded().iter().any(|e| e.is_busy())
    }

    /// A request's `model` name to a model: exact id, tier name, file stem, then
    /// the seed's name patterns. Reads the models directory only when the last
    /// scan is stale or answers nothing.
    pub fn resolve(&self, name: &str) -> Result<Arc<ModelEntry>, ModelError> {
        let name = name.trim();
        let all = self.list_within(DIR_SCAN_FRESH);
        if let Some(found) = self.find(&all, name) {
            return Ok(found);
        }
        let all = self.list();
        self.find(&all, name).ok_or_else(|| ModelError::NotFound {
            name: name.to_owned(),
            available: all.iter().map(|e| e.id.clone()).collect(),
        })
    }

    /// [`Registry::resolve`] for async callers. A name found in a fresh scan
    /// answers at once; otherwise the directory scan it needs (file I/O and
    /// GGUF headers, under the scan's lock) runs on the blocking pool, never on
    /// a Tokio worker.
    pub async fn resolve_async(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Arc<ModelEntry>, ModelError> {
        if let Some(found) = self.resolve_fresh(name.trim()) {
            return Ok(found);
        }
        let (registry, name) = (Arc::clone(self), name.to_owned());
        match tokio::task::spawn_blocking(move || registry.resolve(&name)).await {
            Ok(resolved) => resolved,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// `name` among the tiers and a scan younger than [`DIR_SCAN_FRESH`],
    /// without waiting: `None` when the scan is stale, busy, or has no match.
    fn resolve_fresh(&self, name: &str) -> Option<Arc<ModelEntry>> {
        let scanned = {
            let cache = self.dir_cache.try_lock().ok()?;
            let fresh = cache
                .scanned_at
                .is_some_and(|at| at.elapsed() < DIR_SCAN_FRESH);
            fresh.then(|| cache.entries.clone())?
        };
        let mut all = self.tiers.clone();
        all.extend(scanned);
        self.find(&all, name)
    }

    fn find(&self, all: &[Arc<ModelEntry>], name: &str) -> Option<Arc<ModelEntry>> {
        self.find_named(all, name).or_else(|| {
            let tier = tier_for_name(name)?;
            self.tiers.iter().find(|e| e.tier == Some(tier)).cloned()
        })
    }

    /// [`Registry::find`] without the seed's name patterns: a model that
    /// goes by `name` (its id, tier, file stem, or `default`).
    fn find_named(&self, all: &[Arc<ModelEntry>], name: &str) -> Option<Arc<ModelEntry>> {
        all.iter()
            .find(|e| e.id == name)
            .or_else(|| {
                let tier = Tier::parse(name)?;
                self.tiers.iter().find(|e| e.tier == Some(tier))
            })
            .or_else(|| all.iter().find(|e| file_stem(&e.path) == name))
            .or_else(|| {
                all.iter().find(|e| {
                    e.id.eq_ignore_ascii_case(name) || file_stem(&e.path).eq_ignore_ascii_case(name)
                })
            })
            .or_else(|| {
                // `llama-2-7b-chat` for `llama-2-7b-chat.Q4_K_M.gguf`, as seed
                // 003's clients name its model.
                all.iter()
                    .find(|e| without_quant(&file_stem(&e.path)).eq_ignore_ascii_case(name))
            })
            .or_else(|| {
                (name == DEFAULT_MODEL)
                    .then(|| self.default_chat(all))
                    .flatten()
            })
            .cloned()
    }

    /// The model that goes by `name` (not one a name pattern points to), for
    /// `GET /v1/models/{id}`: a client asking whether `llama-70b` exists is
    /// not answered with the heavy tier's model.
    pub fn named(&self, name: &str) -> Result<Arc<ModelEntry>, ModelError> {
        let all = self.list();
        self.find_named(&all, name.trim())
            .ok_or_else(|| ModelError::NotFound {
                name: name.to_owned(),
                available: all.iter().map(|e| e.id.clone()).collect(),
            })
    }

    /// What `"model": "default"` names: the first chat tier of light,
    /// medium and heavy, else the start-up model (`MODEL_REPO_ID`), else the
    /// first chat model of the models directory.
    fn default_chat<'a>(&self, all: &'a [Arc<ModelEntry>]) -> Option<&'a Arc<ModelEntry>> {
        let chat = |e: &&Arc<ModelEntry>| e.kind == ModelKind::Chat;
        // The start-up model's path is built as the directory scan builds its own.
        let startup = self.settings.default_model_file.as_deref();
        all.iter()
            .filter(|e| e.tier.is_some())
            .find(chat)
            .or_else(|| {
                let startup = startup?;
                all.iter().filter(chat).find(|e| e.path == startup)
            })
            .or_else(|| all.iter().find(chat))
    }

    /// The models directory's servable GGUF files, from a scan at most
    /// `max_age` old; each file is inspected once per (mtime, size).
    fn scan_dir(&self, max_age: Duration) -> Vec<Arc<ModelEntry>> {
        let Ok(mut cache) = self.dir_cache.lock() else {
            return Vec::new();
        };
        if cache
            .scanned_at
            .is_some_and(|at| max_age > Duration::ZERO && at.elapsed() < max_age)
        {
            return cache.entries.clone();
        }
        cache.scanned_at = Some(Instant::now());
        let Ok(read) = std::fs::read_dir(&self.settings.models_dir) else {
            cache.entries.clear();
            return Vec::new();
        };
        let mut files: Vec<(PathBuf, SystemTime, u64)> = read
            .filter_map(Result::ok)
            .filter_map(|d| {
                let path = d.path();
                let is_gguf = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                // Follows symlinks: models are often linked in from elsewhere.
                let meta = std::fs::metadata(&path).ok()?;
                (is_gguf && meta.is_file() && !is_later_split_part(&path)).then(|| {
                    (
                        path,
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                    )
                })
            })
            .collect();
        files.sort();
        cache
            .files
            .retain(|path, _| files.iter().any(|(p, _, _)| p == path));
        let entries: Vec<_> = files
            .into_iter()
            .filter_map(|(path, mtime, len)| {
                if let Some((m, l, entry)) = cache.files.get(&path) {
                    if *m == mtime && *l == len {
                        return Some(entry.clone());
                    }
                }
                if self.tier_paths.contains(&canonical(&path)) {
                    return None;
                }
                let summary = engine::inspect(&path)?;
                let mut entry = ModelEntry::new(
                    file_stem(&path),
                    None,
                    path.clone(),
                    summary.kind,
                    self.settings.dir_engine.clone(),
                    self.settings.dir_defaults.clone(),
                );
                entry.gguf = Some(summary);
                entry.keep_alive = self.settings.dir_keep_alive;
                entry.apply_overrides(&self.overrides.get(&entry.id));
                let entry = Arc::new(entry);
                cache.files.insert(path, (mtime, len, entry.clone()));
                Some(entry)
            })
            .collect();
        cache.entries = entries.clone();
        entries
    }
}

/// Whether a loaded model counts against the limits: upstream tiers hold
/// nothing here; managed children run on this machine.
fn holds_resources(entry: &ModelEntry) -> bool {
    entry.upstream.is_none() || entry.managed.is_some()
}

/// The memory `models` take together, estimated.
fn memory_of(models: &[Arc<ModelEntry>]) -> u64 {
    models
        .iter()
        .fold(0, |sum, e| sum.saturating_add(e.memory_estimate()))
}

/// A managed tier's child: a free loopback port for it, its command with
/// the model and port filled in, and the upstream that reaches it there.
fn managed_child(
    id: &str,
    model: &Path,
    settings: &crate::settings::ManagedSettings,
) -> Result<
    (
        Arc<crate::upstream::Upstream>,
        Arc<crate::upstream::Supervisor>,
    ),
    String,
> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port for the child: {e}"))?
        .port();
    let model = model.display().to_string();
    let quoted = format!("'{}'", model.replace('\'', r"'\''"));
    let command = settings
        .command
        .replace("{model}", &quoted)
        .replace("{port}", &port.to_string());
    let mut upstream = settings.upstream.clone();
    upstream.base_urls = vec![format!("http://127.0.0.1:{port}/v1")];
    upstream.model.get_or_insert(model);
    let upstream = crate::upstream::Upstream::new(upstream)?;
    let supervisor =
        crate::upstream::Supervisor::new(id, command, settings.start_timeout, upstream.clone());
    Ok((upstream, supervisor))
}

/// Whether `program` is an executable on PATH (or a path to one).
fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// A file stem without its quantization tag: `llama-2-7b-chat.Q4_K_M` →
/// `llama-2-7b-chat`, `SmolLM2-135M-Instruct-Q4_1` → `SmolLM2-135M-Instruct`.
fn without_quant(stem: &str) -> &str {
    let Some(at) = stem.rfind(['.', '-']) else {
        return stem;
    };
    let tag = stem[at + 1..].to_ascii_lowercase();
    let digit_after = |prefix: &str| {
        tag.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    let is_quant = matches!(tag.as_str(), "f16" | "f32" | "bf16" | "fp16" | "fp32")
        || digit_after("q")
        || digit_after("iq");
    if is_quant && at > 0 {
        &stem[..at]
    } else {
        stem
    }
}

/// `model-00002-of-00003.gguf`: only the first part of a split model is servable.
fn is_later_split_part(path: &Path) -> bool {
    let stem = file_stem(path);
    let Some(idx) = stem.rfind("-of-") else {
        return false;
    };
    let part = &stem[..idx];
    part.rsplit('-')
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n > 1)
}

#[cfg(test)]
mod tests {
    use super::without_quant;

    #[test]
    fn quantization_tags_come_off_file_stems() {
        for (stem, base) in [
            ("llama-2-7b-chat.Q4_K_M", "llama-2-7b-chat"),
            ("Qwen3-4B-Instruct-2507-Q4_K_M", "Qwen3-4B-Instruct-2507"),
            ("SmolLM2-135M-Instruct-Q4_1", "SmolLM2-135M-Instruct"),
            ("all-MiniLM-L6-v2-f16", "all-MiniLM-L6-v2"),
            ("model-IQ2_XXS", "model"),
            ("qwen2.5-0.5b", "qwen2.5-0.5b"),
            ("mistral-7b-v0.3", "mistral-7b-v0.3"),
            ("Q4_0", "Q4_0"),
        ] {
            assert_eq!(without_quant(stem), base, "{stem}");
        }
    }
}
