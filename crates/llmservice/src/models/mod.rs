//! The model registry: the configured tiers plus every GGUF in the models
//! directory, how a request's `model` name resolves to one of them, and lazy,
//! single-flight loading.
//!
//! Lock order: `Registry::dir_cache` is never held while a model's `engine` lock
//! is taken, and loading never touches the registry.

mod routing;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use engine::{Engine, EngineConfig, EngineError, ModelKind};

use crate::config::{GenerationDefaults, Settings, Tier};

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
}

/// One servable model file and, once loaded, its engine.
pub struct ModelEntry {
    pub id: String,
    pub tier: Option<Tier>,
    pub path: PathBuf,
    pub kind: ModelKind,
    /// Unix seconds of the file's modification time (OpenAI's `created`).
    pub created: i64,
    pub engine_config: EngineConfig,
    pub defaults: GenerationDefaults,
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
    /// Milliseconds since the Unix epoch of the last use.
    last_used: std::sync::atomic::AtomicU64,
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
        let created = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        Self {
            id,
            tier,
            path,
            kind,
            created,
            engine_config,
            defaults,
            engine: Default::default(),
            loaded: std::sync::RwLock::new(None),
            state: AtomicU8::new(0),
            last_error: Mutex::new(None),
            keep_alive: None,
            embedding_dimension: None,
            last_used: std::sync::atomic::AtomicU64::new(now_millis()),
        }
    }

    fn touch(&self) {
        self.last_used.store(now_millis(), Ordering::Relaxed);
    }

    /// How long since the model last served or was asked for.
    pub fn idle_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            now_millis().saturating_sub(self.last_used.load(Ordering::Relaxed)),
        )
    }

    /// Whether a loaded engine has work or is held by a request in flight.
    pub fn is_busy(&self) -> bool {
        // Our clone, the load slot's and the published one: anything more is a request.
        self.loaded_engine().is_some_and(|e| in_use(&e, 3))
    }

    /// Unloads the model if nothing is using it: its memory is returned when the
    /// engine thread has finished (joined off the async threads). `Ok(false)` when
    /// it was not loaded.
    pub async fn unload(&self) -> Result<bool, ModelError> {
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
        ModelState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set_state(&self, state: ModelState) {
        self.state.store(state as u8, Ordering::Release);
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
        self.touch();
        if let Some(engine) = self.loaded_engine() {
            return Ok(engine);
        }
        let load = self.clone().start_load();
        if !wait {
            return Err(ModelError::Loading(self.id.clone()));
        }
        load.await
    }

    /// Starts loading in a task of its own, so a client that gives up does not
    /// abandon a half-done load; the returned future yields its outcome.
    fn start_load(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = Result<Arc<Engine>, ModelError>> {
        let task = tokio::spawn(async move {
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
            self.set_state(ModelState::Loading);
            let entry = self.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                Engine::load(&entry.path, entry.engine_config.clone()).map(Arc::new)
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
                    tracing::error!(model = %self.id, %error, "model failed to load");
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

type DirCache = HashMap<PathBuf, (SystemTime, u64, Arc<ModelEntry>)>;

pub struct Registry {
    settings: Arc<Settings>,
    tiers: Vec<Arc<ModelEntry>>,
    dir_cache: Mutex<DirCache>,
}

impl Registry {
    pub fn new(settings: Arc<Settings>) -> Self {
        let tiers = settings
            .tiers
            .iter()
            .map(|t| {
                let kind = engine::inspect(&t.model_path).map_or_else(
                    || {
                        tracing::warn!(tier = t.tier.as_str(), path = %t.model_path.display(), "tier model is not a readable GGUF file");
                        tier_kind(t.tier)
                    },
                    |s| s.kind,
                );
                let mut entry = ModelEntry::new(
                    format!("{}/{}", t.tier.as_str(), file_stem(&t.model_path)),
                    Some(t.tier),
                    t.model_path.clone(),
                    kind,
                    t.engine.clone(),
                    t.defaults.clone(),
                );
                entry.keep_alive = t.keep_alive;
                entry.embedding_dimension = t.embedding_dimension;
                Arc::new(entry)
            })
            .collect();
        Self {
            settings,
            tiers,
            dir_cache: Mutex::new(HashMap::new()),
        }
    }

    /// Every servable model: the tiers, then the models directory's files that
    /// no tier already serves.
    pub fn list(&self) -> Vec<Arc<ModelEntry>> {
        let mut all = self.tiers.clone();
        let tier_paths: Vec<PathBuf> = self.tiers.iter().map(|t| canonical(&t.path)).collect();
        all.extend(
            self.scan_dir()
                .into_iter()
                .filter(|e| !tier_paths.contains(&canonical(&e.path))),
        );
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
                    .values()
                    .filter(|(_, _, e)| e.state() == ModelState::Loaded)
                    .map(|(_, _, e)| e.clone()),
            );
        }
        loaded
    }

    /// The model's engine, loading it if needed; when that would exceed
    /// `MAX_LOADED_MODELS`, the least recently used idle model is unloaded first.
    pub async fn engine(
        &self,
        entry: &Arc<ModelEntry>,
        wait: bool,
    ) -> Result<Arc<Engine>, ModelError> {
        if entry.loaded_engine().is_none() {
            self.make_room_for(entry).await;
        }
        entry.engine(wait).await
    }

    async fn make_room_for(&self, target: &ModelEntry) {
        let Some(max) = self.settings.max_loaded_models else {
            return;
        };
        loop {
            let others: Vec<_> = self
                .loaded()
                .into_iter()
                .filter(|e| e.id != target.id)
                .collect();
            if others.len() < max {
                return;
            }
            let victim = others
                .iter()
                .filter(|e| !e.is_busy())
                .max_by_key(|e| e.idle_for());
            let Some(victim) = victim else {
                // Models in use are never evicted: go over the limit rather than fail.
                tracing::warn!(loaded = others.len(), max, model = %target.id, "MAX_LOADED_MODELS reached and every loaded model is in use");
                return;
            };
            tracing::info!(evicted = %victim.id, model = %target.id, "MAX_LOADED_MODELS reached: unloading the least recently used model");
            if victim.unload().await.is_err() {
                return;
            }
        }
    }

    /// Unloads every model idle past its keep-alive (never one in use).
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
    }

    /// Whether any loaded model is generating or has requests waiting.
    pub fn any_busy(&self) -> bool {
        self.loaded().iter().any(|e| e.is_busy())
    }

    /// A request's `model` name to a model: exact id, tier name, file stem, then
    /// the seed's name patterns.
    pub fn resolve(&self, name: &str) -> Result<Arc<ModelEntry>, ModelError> {
        let all = self.list();
        let name = name.trim();
        let found = all
            .iter()
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
                let tier = tier_for_name(name)?;
                self.tiers.iter().find(|e| e.tier == Some(tier))
            });
        found.cloned().ok_or_else(|| ModelError::NotFound {
            name: name.to_owned(),
            available: all.iter().map(|e| e.id.clone()).collect(),
        })
    }

    /// The models directory's GGUF files, inspected once per (mtime, size).
    fn scan_dir(&self) -> Vec<Arc<ModelEntry>> {
        let Ok(read) = std::fs::read_dir(&self.settings.models_dir) else {
            return Vec::new();
        };
        let mut files: Vec<(PathBuf, SystemTime, u64)> = read
            .filter_map(Result::ok)
            .filter_map(|d| {
                let path = d.path();
                let is_gguf = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                let meta = d.metadata().ok()?;
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
        let Ok(mut cache) = self.dir_cache.lock() else {
            return Vec::new();
        };
        cache.retain(|path, _| files.iter().any(|(p, _, _)| p == path));
        files
            .into_iter()
            .filter_map(|(path, mtime, len)| {
                if let Some((m, l, entry)) = cache.get(&path) {
                    if *m == mtime && *l == len {
                        return Some(entry.clone());
                    }
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
                entry.keep_alive = self.settings.dir_keep_alive;
                let entry = Arc::new(entry);
                cache.insert(path, (mtime, len, entry.clone()));
                Some(entry)
            })
            .collect()
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
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
