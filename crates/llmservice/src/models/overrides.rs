//! Per-model settings the operator changes from the dashboard (context,
//! threads, parallel slots, GPU layers, sampling defaults), kept in
//! `<data dir>/model_settings.json` over what the environment configured.
//! Engine settings take effect at the model's next load; sampling defaults
//! at its next request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use engine::EngineConfig;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::settings::GenerationDefaults;

pub const FILE: &str = "model_settings.json";

/// Values that replace the configured ones; an absent field keeps the
/// configuration's (environment or default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_threads: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_gpu_layers: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

/// A value outside its range, naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidOverride {
    pub field: &'static str,
    pub message: String,
}

fn check<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: Option<T>,
    low: T,
    high: T,
) -> Result<(), InvalidOverride> {
    match value {
        Some(v) if !(low..=high).contains(&v) => Err(InvalidOverride {
            field,
            message: format!("{field} must lie between {low} and {high}, got {v}"),
        }),
        _ => Ok(()),
    }
}

impl ModelOverrides {
    pub fn validate(&self) -> Result<(), InvalidOverride> {
        check("n_ctx", self.n_ctx, 128, 1 << 21)?;
        check("n_threads", self.n_threads, 1, 1024)?;
        check("parallel", self.parallel, 1, 256)?;
        check("n_gpu_layers", self.n_gpu_layers, -1, 100_000)?;
        check("temperature", self.temperature, 0.0, 2.0)?;
        check("top_p", self.top_p, 0.0, 1.0)?;
        check("top_k", self.top_k, 0, 100_000)?;
        check("min_p", self.min_p, 0.0, 1.0)?;
        check("repeat_penalty", self.repeat_penalty, 0.5, 2.0)?;
        check("max_tokens", self.max_tokens, 1, 1 << 20)?;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `engine` and `defaults` with these values put in.
    pub fn apply(
        &self,
        mut engine: EngineConfig,
        mut defaults: GenerationDefaults,
    ) -> (EngineConfig, GenerationDefaults) {
        if let Some(v) = self.n_ctx {
            engine.n_ctx = v;
        }
        if let Some(v) = self.n_threads {
            engine.n_threads = v;
            engine.n_threads_batch = v;
        }
        if let Some(v) = self.parallel {
            engine.parallel = v;
        }
        if let Some(v) = self.n_gpu_layers {
            engine.n_gpu_layers = v;
        }
        if let Some(v) = self.temperature {
            defaults.temperature = v;
        }
        if let Some(v) = self.top_p {
            defaults.top_p = v;
        }
        if let Some(v) = self.top_k {
            defaults.top_k = v;
        }
        if let Some(v) = self.min_p {
            defaults.min_p = v;
        }
        if let Some(v) = self.repeat_penalty {
            defaults.repeat_penalty = v;
        }
        if let Some(v) = self.max_tokens {
            defaults.max_tokens = v;
        }
        (engine, defaults)
    }
}

/// The overrides of every model, by model id, and the file they live in.
pub struct OverrideStore {
    path: Option<PathBuf>,
    all: Mutex<BTreeMap<String, ModelOverrides>>,
}

impl OverrideStore {
    /// The store under `data_dir`. A file that does not parse is left as it
    /// is (and logged); changes then fail rather than overwrite it.
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(FILE);
        let (path, all) = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Some(path), BTreeMap::new()),
            Err(error) => {
                tracing::error!(%error, file = FILE, "per-model settings unreadable; using the configuration's");
                (None, BTreeMap::new())
            }
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(all) => (Some(path), all),
                Err(error) => {
                    tracing::error!(%error, file = FILE, "per-model settings do not parse; using the configuration's and leaving the file untouched");
                    (None, BTreeMap::new())
                }
            },
        };
        Self {
            path,
            all: Mutex::new(all),
        }
    }

    /// A store that keeps nothing on disk (tests, tools).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            all: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, id: &str) -> ModelOverrides {
        self.all
            .lock()
            .ok()
            .and_then(|all| all.get(id).cloned())
            .unwrap_or_default()
    }

    /// Replaces a model's overrides (empty ones remove its entry) and
    /// writes the file (to a temporary file first, then renamed over it).
    /// Blocking.
    pub fn set(&self, id: &str, overrides: ModelOverrides) -> Result<(), String> {
        let mut all = self
            .all
            .lock()
            .map_err(|_| "settings store poisoned".to_owned())?;
        let mut next = all.clone();
        if overrides.is_empty() {
            next.remove(id);
        } else {
            next.insert(id.to_owned(), overrides);
        }
        if let Some(path) = &self.path {
            write_atomically(path, &next)?;
        } else {
            // In memory only (the file was unreadable): changes last until restart.
            tracing::warn!(
                file = FILE,
                "per-model settings are not persisted: the file could not be read at start"
            );
        }
        *all = next;
        Ok(())
    }
}

fn write_atomically(path: &Path, all: &BTreeMap<String, ModelOverrides>) -> Result<(), String> {
    use std::io::Write;
    let bytes = serde_json::to_vec_pretty(all).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("cannot write {FILE}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_persist_and_apply_over_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let store = OverrideStore::open(dir.path());
        let o = ModelOverrides {
            n_ctx: Some(2048),
            parallel: Some(2),
            temperature: Some(0.2),
            ..Default::default()
        };
        o.validate().unwrap();
        store.set("light/m", o.clone()).unwrap();
        let again = OverrideStore::open(dir.path());
        assert_eq!(again.get("light/m"), o);
        let (engine, defaults) = o.apply(EngineConfig::default(), GenerationDefaults::default());
        assert_eq!((engine.n_ctx, engine.parallel), (2048, 2));
        assert_eq!(defaults.temperature, 0.2);
        assert_eq!(defaults.top_k, GenerationDefaults::default().top_k);
        again.set("light/m", ModelOverrides::default()).unwrap();
        assert!(OverrideStore::open(dir.path()).get("light/m").is_empty());
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let bad = ModelOverrides {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "top_p");
        let bad = ModelOverrides {
            parallel: Some(0),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "parallel");
    }

    #[test]
    fn an_unreadable_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "{not json").unwrap();
        let store = OverrideStore::open(dir.path());
        store
            .set(
                "m",
                ModelOverrides {
                    top_k: Some(5),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(store.get("m").top_k, Some(5));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "{not json"
        );
    }
}
