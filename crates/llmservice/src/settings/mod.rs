//! Settings: command-line flags (`crate::cli`) > environment (and `.env`) >
//! defaults. The raw layer (flags + environment variables under the seeds'
//! names) becomes a validated [`Settings`]; everything after start-up reads
//! only `Settings`.

mod tier;

use std::path::PathBuf;
use std::time::Duration;

use engine::EngineConfig;

use crate::cache::CacheSettings;
use crate::cli::ServeArgs;

pub use tier::{
    Backend, GenerationDefaults, ManagedKind, ManagedSettings, Tier, TierSettings,
    UpstreamSettings, DEFAULT_TIER,
};

#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    /// When `port` is taken, take the next free one (`--next-free-port`,
    /// `NEXT_FREE_PORT`).
    pub next_free_port: bool,
    pub models_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub max_body_bytes: usize,
    pub tiers: Vec<TierSettings>,
    /// Engine settings for models found in `models_dir` that no tier names.
    pub dir_engine: EngineConfig,
    pub dir_defaults: GenerationDefaults,
    /// Keep-alive of models found in `models_dir` (`KEEP_ALIVE`).
    pub dir_keep_alive: Option<Duration>,
    /// Most models loaded at once (`MAX_LOADED_MODELS`); loading one more unloads
    /// the least recently used idle model.
    pub max_loaded_models: Option<usize>,
    /// Bytes the loaded models may take together (`MAX_MODEL_MEMORY`, MiB;
    /// unset or 0 = no budget): loading one that does not fit unloads the
    /// least recently used idle models first.
    pub max_model_memory: Option<u64>,
    /// Exit after this long without requests (`SHUTDOWN_TIMEOUT`, 0 = never).
    pub shutdown_timeout: Option<Duration>,
    /// How long a client may take to send a request's headers
    /// (`HEADER_READ_TIMEOUT`, seconds, 30): a connection that trickles them
    /// (slowloris) is closed then.
    pub header_read_timeout: Duration,
    /// How long a write to a client may wait for it to read
    /// (`WRITE_TIMEOUT`, seconds, 120): a client that stops reading its
    /// answer loses the connection then, and the answer's buffers with it.
    pub write_timeout: Duration,
    /// Connections served at once (`MAX_CONNECTIONS`); `None`: what the
    /// process's file-descriptor limit leaves after a reserve for model files,
    /// SQLite and upstream calls. Past it the server stops accepting, and new
    /// clients wait in the kernel's backlog until a connection closes.
    pub max_connections: Option<usize>,
    pub cache: CacheSettings,
    /// Where and how long Responses API answers are kept.
    pub responses: crate::response_store::StoreSettings,
    /// The operator's API keys and whether loopback needs one.
    pub keys: crate::keys::KeySettings,
    /// Origins browsers may call the API from (`CORS_ALLOW_ORIGINS`); `None`: any.
    pub cors_allow_origins: Option<Vec<String>>,
    /// Retrieval: where collections live and how answers use them.
    pub rag: RagSettings,
    /// Where models are downloaded from (`HF_ENDPOINT`, `HF_TOKEN`).
    pub hub: crate::hub::HubSettings,
    /// Seed 003's `MODEL_REPO_ID` (+ `MODEL_FILENAME`): fetched into the
    /// models directory at start when missing.
    pub startup_model: Option<crate::hub::ModelRef>,
    /// The file `"model": "default"` names when no chat tier is configured
    /// (the start-up model, once it is here).
    pub default_model_file: Option<PathBuf>,
    /// How long the dashboard's analytics are kept (`ANALYTICS_RETENTION_DAYS`).
    pub analytics_retention: Duration,
    /// Settings read but not honoured as written, said once the log is up.
    pub warnings: Vec<String>,
}

/// The Qdrant server collections live on, if any: `QDRANT_URL`, or (seed
/// 003's way) `QDRANT_HOST` and `QDRANT_PORT` with `QDRANT_USE_MEMORY=false`
/// and a host other than this machine; with `QDRANT_API_KEY` and
/// `QDRANT_TIMEOUT` (seconds, 60).
fn qdrant_server(
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<Option<rag::QdrantConfig>, ConfigError> {
    let memory = parse_bool(env, "QDRANT_USE_MEMORY")?;
    let url = match (env.get("QDRANT_URL"), env.get("QDRANT_HOST")) {
        (Some(url), _) => {
            if memory == Some(true) {
                warnings.push(
                    "QDRANT_URL is set, so collections are kept on that Qdrant server and \
                     QDRANT_USE_MEMORY=true is not applied"
                        .to_owned(),
                );
            }
            url
        }
        (None, Some(host)) => {
            let host = host.trim();
            let local = matches!(host, "localhost" | "127.0.0.1" | "::1" | "");
            if local || memory != Some(false) {
                if !local {
                    warnings.push(format!(
                        "QDRANT_HOST={host} is not used: as in seed 003, collections stay in \
                         this server's own store unless QDRANT_USE_MEMORY=false"
                    ));
                } else if memory == Some(false) {
                    let port = env.get("QDRANT_PORT").unwrap_or_else(|| "6333".into());
                    warnings.push(format!(
                        "QDRANT_USE_MEMORY=false with QDRANT_HOST={host}: collections are kept \
                         on disk in this server's own store; for a Qdrant server on this \
                         machine set QDRANT_URL=http://{host}:{}",
                        port.trim()
                    ));
                }
                return Ok(None);
            }
            let port = env.get("QDRANT_PORT").unwrap_or_else(|| "6333".into());
            format!("http://{host}:{}", port.trim())
        }
        (None, None) => return Ok(None),
    };
    let url = url.trim();
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let parsed = reqwest::Url::parse(&url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if parsed.is_none() {
        return Err(ConfigError::new(
            "QDRANT_URL",
            &url,
            "give the Qdrant server's REST address, e.g. http://qdrant:6333",
        ));
    }
    let timeout = parse_positive(env, "QDRANT_TIMEOUT", "seconds")?.unwrap_or(60);
    Ok(Some(rag::QdrantConfig {
        url,
        api_key: env.get("QDRANT_API_KEY").filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(timeout),
    }))
}

/// Retrieval's settings (seed 003's names where it had them).
#[derive(Debug, Clone, PartialEq)]
pub struct RagSettings {
    /// Under `<data dir>/rag`, a temporary directory with
    /// `QDRANT_USE_MEMORY=true`, or a Qdrant server.
    pub storage: rag::Storage,
    /// The embedding model: `RAG_EMBEDDING_MODEL` (must resolve), else
    /// `EMBEDDING_MODEL_NAME` when it names a model we serve, else the
    /// embedding tier (or the first embedding model found).
    pub embedding_model: Option<String>,
    pub embedding_model_hint: Option<String>,
    /// Narrower dense vectors (`EMBEDDING_DIMENSION`, applied when below the model's width).
    pub dimension: Option<usize>,
    /// The reranker (`RAG_RERANK_MODEL`, else the reranker tier if configured).
    pub rerank_model: Option<String>,
    /// The chat model answers use when the request names none (`RAG_CHAT_MODEL`).
    pub chat_model: Option<String>,
    pub top_k: usize,
    pub score_threshold: f32,
    pub chunk_tokens: Option<usize>,
    pub chunk_overlap: usize,
    /// Largest `/v1/rag/files` upload (`RAG_MAX_UPLOAD_BYTES`, 64 MiB).
    pub max_upload_bytes: usize,
    /// Longest an HTML or PDF upload's parser may run (`RAG_EXTRACT_TIMEOUT`,
    /// seconds, 120).
    pub extract_timeout: Duration,
    /// The program that reads HTML and PDF uploads in a child process: this
    /// one (`llmservice extract-text`), or `RAG_EXTRACTOR` (tests).
    pub extractor: PathBuf,
}

impl RagSettings {
    fn from_env(
        env: &dyn Env,
        data_dir: &std::path::Path,
        warnings: &mut Vec<String>,
    ) -> Result<Self, ConfigError> {
        let storage = match qdrant_server(env, warnings)? {
            Some(config) => rag::Storage::Qdrant(config),
            None if parse_bool(env, "QDRANT_USE_MEMORY")?.unwrap_or(false) => rag::Storage::Memory,
            None => rag::Storage::Disk(
                env.get("RAG_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| data_dir.join("rag")),
            ),
        };
        let score_threshold = parse::<f32>(env, &["RAG_SCORE_THRESHOLD"])?.unwrap_or(0.7);
        if !(-1.0..=1.0).contains(&score_threshold) {
            return Err(ConfigError::new(
                "RAG_SCORE_THRESHOLD",
                &score_threshold.to_string(),
                "a similarity threshold lies between -1 and 1",
            ));
        }
        Ok(Self {
            storage,
            embedding_model: env.get("RAG_EMBEDDING_MODEL"),
            embedding_model_hint: env.get("EMBEDDING_MODEL_NAME"),
            dimension: parse::<usize>(env, &["EMBEDDING_DIMENSION"])?.filter(|&d| d > 0),
            rerank_model: env.get("RAG_RERANK_MODEL"),
            chat_model: env.get("RAG_CHAT_MODEL"),
            top_k: parse_positive(env, "RAG_TOP_K", "the chunks an answer is given")?.unwrap_or(3)
                as usize,
            score_threshold,
            chunk_tokens: parse_positive(env, "RAG_CHUNK_TOKENS", "tokens per chunk")?
                .map(|n| n as usize),
            chunk_overlap: parse::<usize>(env, &["RAG_CHUNK_OVERLAP"])?.unwrap_or(32),
            max_upload_bytes: parse_positive(env, "RAG_MAX_UPLOAD_BYTES", "bytes per upload")?
                .map_or(64 << 20, |n| n as usize),
            extract_timeout: Duration::from_secs(
                parse_positive(
                    env,
                    "RAG_EXTRACT_TIMEOUT",
                    "seconds a file's parser may run",
                )?
                .unwrap_or(120),
            ),
            extractor: env
                .get("RAG_EXTRACTOR")
                .map(PathBuf::from)
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_else(|| PathBuf::from("llmservice")),
        })
    }
}

/// A configuration value that does not parse, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {message}")]
pub struct ConfigError {
    /// The variable at fault.
    pub name: String,
    pub message: String,
}

impl ConfigError {
    fn new(name: impl Into<String>, value: &str, reason: impl std::fmt::Display) -> Self {
        let name = name.into();
        Self {
            message: format!("{name}={value:?}: {reason}"),
            name,
        }
    }
}

/// Where configuration values come from; a trait so tests need not touch the process environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

fn first(env: &dyn Env, names: &[&str]) -> Option<(String, String)> {
    names
        .iter()
        .find_map(|n| env.get(n).map(|v| (n.to_string(), v)))
}

fn parse<T: std::str::FromStr>(env: &dyn Env, names: &[&str]) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match first(env, names) {
        None => Ok(None),
        Some((name, value)) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::new(name, &value, e)),
    }
}

/// The models directory's engine settings and defaults (the seeds'
/// unprefixed names), with the warnings the default tier has not given yet.
fn dir_settings(
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<(EngineConfig, GenerationDefaults), ConfigError> {
    let mut dir_warnings = Vec::new();
    let settings = tier::TierEnv { env, tier: None }.engine_and_defaults(&mut dir_warnings)?;
    // The default tier reads the same names, and may have said so already.
    for warning in dir_warnings {
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
    Ok(settings)
}

/// `MAX_MODEL_MEMORY` (MiB) in bytes; unset or 0 is no budget. There is no
/// default: the machine's memory says nothing of a container's limit or of
/// weights offloaded to a GPU, and models that fit together before must not
/// start taking turns after an upgrade.
fn model_memory_budget(env: &dyn Env) -> Result<Option<u64>, ConfigError> {
    Ok(parse::<u64>(env, &["MAX_MODEL_MEMORY"])?
        .filter(|&mib| mib > 0)
        .map(|mib| mib.saturating_mul(1 << 20)))
}

/// `LOG_LEVEL` as a tracing filter. The seeds set Python's level names
/// (`INFO`, `WARNING`, `DEBUG`, or their numbers); tracing calls two of them
/// differently, and would read any other bare word as the name of a module to
/// log, silently logging nothing else. So a bare word must be a level: one
/// that is not is a warning, and `info` is used. A value with `=` or `,` is a
/// filter directive and passes through.
fn log_filter(value: &str, warnings: &mut Vec<String>) -> String {
    let level = value
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_ascii_lowercase();
    if level.contains(['=', ',']) {
        return level;
    }
    match level.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" | "off" => level,
        "notset" | "0" => "trace".to_owned(),
        "10" => "debug".to_owned(),
        "20" => "info".to_owned(),
        "warning" | "30" => "warn".to_owned(),
        "critical" | "fatal" | "40" | "50" => "error".to_owned(),
        _ => {
            warnings.push(format!(
                "LOG_LEVEL={value:?} is not a log level (trace, debug, info, warning, error, \
                 critical, off): logging at info"
            ));
            "info".to_owned()
        }
    }
}

fn parse_bool(env: &dyn Env, name: &str) -> Result<Option<bool>, ConfigError> {
    match env.get(name) {
        None => Ok(None),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" => Ok(Some(false)),
            _ => Err(ConfigError::new(name, &v, "expected true or false")),
        },
    }
}

/// A positive integer: zero is refused rather than guessed at (it could mean
/// "off" or "unbounded").
fn parse_positive(env: &dyn Env, name: &str, hint: &str) -> Result<Option<u64>, ConfigError> {
    match parse::<u64>(env, &[name])? {
        Some(0) => Err(ConfigError::new(
            name,
            &env.get(name).unwrap_or_default(),
            format!("must be at least 1 ({hint})"),
        )),
        n => Ok(n),
    }
}

/// An [`Env`] over a lookup function, with empty values read as unset (as
/// `.env` templates often leave them).
struct LookupEnv<F>(F);

impl<F: Fn(&str) -> Option<String>> Env for LookupEnv<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }
}

impl CacheSettings {
    /// The cache's settings from the environment (`get` looks a name up).
    /// Errors name the variable and the offending value.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        data_dir: &std::path::Path,
    ) -> Result<Self, ConfigError> {
        let env = LookupEnv(get);
        let off = "set ENABLE_CACHE=false to turn the cache off";
        Ok(CacheSettings {
            enabled: parse_bool(&env, "ENABLE_CACHE")?.unwrap_or(true),
            max_entries: parse_positive(&env, "CACHE_MAX_SIZE", off)?.unwrap_or(1000),
            max_bytes: parse_positive(&env, "CACHE_MAX_BYTES", off)?.unwrap_or(128 << 20),
            ttl: Duration::from_secs(
                parse_positive(&env, "CACHE_TTL_SECONDS", off)?.unwrap_or(3600),
            ),
            persist_to_disk: parse_bool(&env, "CACHE_PERSIST_TO_DISK")?.unwrap_or(false),
            dir: env
                .get("CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("cache")),
            cache_all: parse_bool(&env, "CACHE_ALL")?.unwrap_or(false),
            url: match env.get("CACHE_URL").filter(|u| !u.trim().is_empty()) {
                Some(url) => {
                    let url = url.trim().to_owned();
                    if !url.starts_with("redis://")
                        && !url.starts_with("redis+unix://")
                        && !url.starts_with("unix://")
                    {
                        return Err(ConfigError::new(
                            "CACHE_URL",
                            &url,
                            "a redis:// URL (redis://host:6379/0); TLS (rediss://) is not built in",
                        ));
                    }
                    Some(url)
                }
                None => None,
            },
        })
    }
}

fn home_dir(env: &dyn Env) -> PathBuf {
    env.get("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Settings {
    pub fn resolve(args: &ServeArgs, env: &dyn Env) -> Result<Settings, ConfigError> {
        let data_dir = args
            .data_dir
            .clone()
            .or_else(|| first(env, &["DATA_DIR", "LLM_SERVICE_DATA_DIR"]).map(|(_, v)| v.into()))
            .unwrap_or_else(|| home_dir(env).join(".llmservice"));
        let models_dir = args
            .models_dir
            .clone()
            .or_else(|| {
                first(env, &["MODELS_DIR", "LLM_SERVICE_MODELS_DIR", "MODEL_DIR"])
                    .map(|(_, v)| v.into())
            })
            .unwrap_or_else(|| data_dir.join("models"));
        let mut warnings = Vec::new();
        let mut tiers = Vec::new();
        for tier in Tier::ALL {
            if let Some(t) = tier::tier_settings(tier, env, &mut warnings)? {
                tiers.push(t);
            }
        }
        tier::unprefixed_warnings(&tiers, env, &mut warnings);
        // The models directory's files take the seeds' unprefixed settings.
        let (dir_engine, dir_defaults) = dir_settings(env, &mut warnings)?;
        let log_level = match args.log_level.clone().or_else(|| env.get("LOG_LEVEL")) {
            Some(value) => log_filter(&value, &mut warnings),
            // Seed 002's VERBOSE=true.
            None if parse_bool(env, "VERBOSE").ok().flatten() == Some(true) => "debug".to_owned(),
            None => "info".to_owned(),
        };
        let cache = CacheSettings::from_env(|n| env.get(n), &data_dir)?;
        let responses = response_store(env, &data_dir)?;
        let keys = crate::keys::KeySettings {
            keys: ["API_KEY", "LLM_SERVICE_API_KEY"]
                .iter()
                .filter_map(|name| env.get(name))
                .flat_map(|value| list(&value))
                .collect(),
            require: parse_bool(env, "REQUIRE_API_KEY")?,
        };
        let cors_allow_origins = env
            .get("CORS_ALLOW_ORIGINS")
            .map(|value| list(&value))
            .filter(|origins| !origins.iter().any(|o| o == "*"));
        Ok(Settings {
            hub: crate::hub::HubSettings::from_env(|name| env.get(name)),
            startup_model: startup_model(env, &mut warnings)?,
            default_model_file: None,
            analytics_retention: Duration::from_secs(
                86400
                    * parse_positive(env, "ANALYTICS_RETENTION_DAYS", "days of charts kept")?
                        .unwrap_or(7),
            ),
            rag: RagSettings::from_env(env, &data_dir, &mut warnings)?,
            keys,
            cors_allow_origins,
            host: args
                .host
                .clone()
                .or_else(|| first(env, &["HOST", "LLM_SERVICE_HOST"]).map(|(_, v)| v))
                .unwrap_or_else(|| "127.0.0.1".to_owned()),
            port: match args.port {
                Some(p) => p,
                None => parse(env, &["PORT", "LLM_SERVICE_PORT"])?.unwrap_or(8000),
            },
            next_free_port: args.next_free_port
                || parse_bool(env, "NEXT_FREE_PORT")?.unwrap_or(false),
            models_dir,
            data_dir,
            log_level,
            max_body_bytes: match args.max_body_bytes {
                Some(n) => n,
                None => parse(env, &["MAX_BODY_BYTES"])?.unwrap_or(10 * 1024 * 1024),
            },
            cache,
            responses,
            tiers,
            dir_keep_alive: keep_alive(env, "KEEP_ALIVE")?,
            max_loaded_models: parse::<usize>(
                env,
                &["MAX_LOADED_MODELS", "LLM_SERVICE_MAX_LOADED_MODELS"],
            )?
            .filter(|&n| n > 0),
            max_model_memory: model_memory_budget(env)?,
            shutdown_timeout: shutdown_timeout(env)?,
            header_read_timeout: Duration::from_secs(
                parse_positive(env, "HEADER_READ_TIMEOUT", "seconds")?.unwrap_or(30),
            ),
            write_timeout: Duration::from_secs(
                parse_positive(env, "WRITE_TIMEOUT", "seconds")?.unwrap_or(120),
            ),
            max_connections: parse_positive(env, "MAX_CONNECTIONS", "connections")?
                .map(|n| n as usize),
            dir_engine,
            dir_defaults,
            warnings,
        })
    }
}

/// Where and how long Responses API answers are kept.
fn response_store(
    env: &dyn Env,
    data_dir: &std::path::Path,
) -> Result<crate::response_store::StoreSettings, ConfigError> {
    let hint = "send store: false to keep none";
    Ok(crate::response_store::StoreSettings {
        dir: data_dir.to_owned(),
        max_entries: parse_positive(env, "RESPONSES_MAX_STORED", hint)?.unwrap_or(10_000),
        ttl: Duration::from_secs(
            parse_positive(env, "RESPONSES_TTL_SECONDS", hint)?.unwrap_or(30 * 24 * 3600),
        ),
    })
}

/// `SHUTDOWN_TIMEOUT` seconds; 0 or negative is never.
fn shutdown_timeout(env: &dyn Env) -> Result<Option<Duration>, ConfigError> {
    match parse::<f64>(env, &["SHUTDOWN_TIMEOUT", "LLM_SERVICE_SHUTDOWN_TIMEOUT"])? {
        None => Ok(None),
        Some(s) if s <= 0.0 => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(|e| ConfigError::new("SHUTDOWN_TIMEOUT", &s.to_string(), e)),
    }
}

/// Seed 003's model: `MODEL_REPO_ID`, with `MODEL_FILENAME` naming the file
/// (else the repository's one GGUF, or its Q4_K_M).
fn startup_model(
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<Option<crate::hub::ModelRef>, ConfigError> {
    let Some(repo) = env.get("MODEL_REPO_ID") else {
        if let Some(file) = env.get("MODEL_FILENAME") {
            warnings.push(format!(
                "MODEL_FILENAME={file} is ignored: it names a file of MODEL_REPO_ID, which is not set"
            ));
        }
        return Ok(None);
    };
    let reference = match env.get("MODEL_FILENAME") {
        Some(file) => format!("{}/{}", repo.trim().trim_end_matches('/'), file.trim()),
        None => repo.clone(),
    };
    let parsed = crate::hub::ModelRef::parse(&reference)
        .map_err(|e| ConfigError::new("MODEL_REPO_ID", &repo, e))?;
    if let Some(file) = &parsed.file {
        if !file.to_ascii_lowercase().ends_with(".gguf") {
            return Err(ConfigError::new(
                "MODEL_FILENAME",
                file,
                "llmservice serves GGUF models (llama.cpp's format); name a .gguf file, e.g. from a GGUF conversion of this model",
            ));
        }
    }
    Ok(Some(parsed))
}

/// A comma-separated list, trimmed, without empty items.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Ollama-style keep-alive: seconds, or a number with `s`, `m` or `h`; negative
/// (or unset) means forever.
fn keep_alive(env: &dyn Env, name: &str) -> Result<Option<Duration>, ConfigError> {
    let Some(raw) = env.get(name) else {
        return Ok(None);
    };
    let text = raw.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1.0),
        Some((i, 'm')) => (&text[..i], 60.0),
        Some((i, 'h')) => (&text[..i], 3600.0),
        _ => (text, 1.0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|e| ConfigError::new(name, &raw, e))?;
    if value < 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value * unit)
        .map(Some)
        .map_err(|e| ConfigError::new(name, &raw, e))
}

#[cfg(test)]
mod seed_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let s = Settings::resolve(&ServeArgs::default(), &[("HOME", "/home/u")]).unwrap();
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.port, 8000);
        assert_eq!(s.models_dir, PathBuf::from("/home/u/.llmservice/models"));
        assert!(s.tiers.is_empty());
        // No memory budget unless one is set.
        assert_eq!(s.max_model_memory, None);
        let off = Settings::resolve(&ServeArgs::default(), &[("MAX_MODEL_MEMORY", "0")]).unwrap();
        assert_eq!(off.max_model_memory, None);
        let set =
            Settings::resolve(&ServeArgs::default(), &[("MAX_MODEL_MEMORY", "2048")]).unwrap();
        assert_eq!(set.max_model_memory, Some(2 << 30));
    }

    #[test]
    fn log_level_takes_the_seeds_python_level_names() {
        let level = |value: &str| {
            Settings::resolve(&ServeArgs::default(), &[("LOG_LEVEL", value)])
                .map(|s| s.log_level)
                .map_err(|e| e.to_string())
        };
        for (value, filter) in [
            ("INFO", "info"),
            ("WARNING", "warn"),
            ("Warn", "warn"),
            ("CRITICAL", "error"),
            ("DEBUG", "debug"),
            ("info,llmservice=debug", "info,llmservice=debug"),
            ("\"info\"", "info"),
            ("30", "warn"),
            ("NOTSET", "trace"),
        ] {
            assert_eq!(level(value).as_deref(), Ok(filter), "{value}");
        }
        // A bare word that is no level would log nothing at all: info, and
        // a warning.
        let s = Settings::resolve(&ServeArgs::default(), &[("LOG_LEVEL", "verbose")]).unwrap();
        assert_eq!(s.log_level, "info");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.starts_with("LOG_LEVEL=\"verbose\"")),
            "{:?}",
            s.warnings
        );
        let verbose = Settings::resolve(&ServeArgs::default(), &[("VERBOSE", "true")]).unwrap();
        assert_eq!(verbose.log_level, "debug");
    }

    #[test]
    fn engine_settings_of_a_tier_served_elsewhere_are_a_warning() {
        let env = [
            ("HEAVY_BACKEND", "vllm"),
            ("HEAVY_MODEL_PATH", "Qwen/Qwen2.5-7B-Instruct"),
            ("HEAVY_N_CTX", "8192"),
            ("HEAVY_N_GPU_LAYERS", "-1"),
            ("HEAVY_MAX_TOKENS", "512"),
            ("MEDIUM_BASE_URL", "http://gpu-1:8000/v1"),
            ("MEDIUM_N_THREADS", "8"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        for (setting, by) in [
            ("HEAVY_N_CTX", "HEAVY_COMMAND"),
            ("HEAVY_N_GPU_LAYERS", "HEAVY_COMMAND"),
            ("MEDIUM_N_THREADS", "upstream server"),
        ] {
            assert!(
                s.warnings
                    .iter()
                    .any(|w| w.starts_with(&format!("{setting} is not used")) && w.contains(by)),
                "{setting}: {:?}",
                s.warnings
            );
        }
        // Sampling settings are used: they fill in requests.
        assert!(
            !s.warnings.iter().any(|w| w.contains("MAX_TOKENS")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn speculation_is_off_unless_a_tier_asks() {
        let resolve = |value: &str| {
            let env = [
                ("LIGHT_MODEL_PATH", "/m/light.gguf"),
                ("HEAVY_MODEL_PATH", "/m/heavy.gguf"),
                ("HEAVY_SPECULATIVE", value),
            ];
            Settings::resolve(&ServeArgs::default(), &env)
        };
        let speculation = |s: &Settings, tier: Tier| {
            s.tiers
                .iter()
                .find(|t| t.tier == tier)
                .unwrap()
                .engine
                .speculation
        };
        let s = resolve("ngram").unwrap();
        assert_eq!(speculation(&s, Tier::Light), engine::Speculation::Off);
        assert_eq!(speculation(&s, Tier::Heavy), engine::Speculation::Ngram);
        for (value, expected) in [
            ("on", engine::Speculation::Ngram),
            (" OFF ", engine::Speculation::Off),
        ] {
            assert_eq!(speculation(&resolve(value).unwrap(), Tier::Heavy), expected);
        }
        for bad in ["draft", "eagle"] {
            let error = resolve(bad).err().unwrap().to_string();
            assert!(error.contains("HEAVY_SPECULATIVE"), "{error}");
        }
        let error = resolve("draft").err().unwrap().to_string();
        assert!(error.contains("HEAVY_DRAFT_MODEL_PATH"), "{error}");

        // A draft model given is used unless the tier says otherwise.
        let with_draft = |speculative: Option<&str>| {
            let mut env: Vec<(String, String)> = vec![
                ("HEAVY_MODEL_PATH".into(), "/m/heavy.gguf".into()),
                ("HEAVY_DRAFT_MODEL_PATH".into(), "/m/small.gguf".into()),
            ];
            env.extend(speculative.map(|v| ("HEAVY_SPECULATIVE".into(), v.into())));
            let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
            let engine = &s
                .tiers
                .iter()
                .find(|t| t.tier == Tier::Heavy)
                .unwrap()
                .engine;
            (engine.speculation, engine.draft_model.clone())
        };
        let small = Some(std::path::PathBuf::from("/m/small.gguf"));
        assert_eq!(
            with_draft(None),
            (engine::Speculation::Draft, small.clone())
        );
        assert_eq!(
            with_draft(Some("draft")),
            (engine::Speculation::Draft, small.clone())
        );
        assert_eq!(
            with_draft(Some("ngram")),
            (engine::Speculation::Ngram, small)
        );
    }

    #[test]
    fn the_prompt_cache_budget_is_per_tier_and_unprefixed_for_the_default_and_the_models_dir() {
        let env = [
            ("LIGHT_MODEL_PATH", "/m/light.gguf"),
            ("HEAVY_MODEL_PATH", "/m/heavy.gguf"),
            ("MEDIUM_MODEL_PATH", "/m/medium.gguf"),
            ("PROMPT_CACHE_RAM", "0"),
            ("HEAVY_PROMPT_CACHE_RAM", "16"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        let bytes = |tier: Tier| {
            s.tiers
                .iter()
                .find(|t| t.tier == tier)
                .unwrap()
                .engine
                .host_cache_bytes
        };
        assert_eq!(bytes(Tier::Light), 0);
        assert_eq!(bytes(Tier::Heavy), 16 << 20);
        assert_eq!(bytes(Tier::Medium), 1024 << 20, "the default");
        assert_eq!(s.dir_engine.host_cache_bytes, 0);
    }

    #[test]
    fn tier_repeat_penalties_are_honoured() {
        let env = [
            ("LIGHT_MODEL_PATH", "/m/light.gguf"),
            ("HEAVY_MODEL_PATH", "/m/heavy.gguf"),
            ("HEAVY_REPEAT_PENALTY", "1.2"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        let penalty = |tier: Tier| {
            let t = s.tiers.iter().find(|t| t.tier == tier).unwrap();
            t.defaults.repeat_penalty
        };
        assert_eq!(penalty(Tier::Light), 1.1);
        assert_eq!(penalty(Tier::Heavy), 1.2);
    }

    #[test]
    fn seed_names_are_read_and_flags_win() {
        let env = [
            ("PORT", "9000"),
            ("LLM_SERVICE_HOST", "0.0.0.0"),
            ("MODEL_DIR", "/models"),
            ("LIGHT_MODEL_PATH", "/m/qwen-0.5b.gguf"),
            ("LIGHT_N_CTX", "2048"),
            ("LIGHT_TEMPERATURE", "0.1"),
            ("LIGHT_TOP_K", "10"),
            ("LIGHT_USE_MMAP", "true"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 9000));
        assert_eq!(s.models_dir, PathBuf::from("/models"));
        let light = &s.tiers[0];
        assert_eq!(light.tier, Tier::Light);
        assert_eq!(light.engine.n_ctx, 2048);
        assert!(light.engine.use_mmap);
        assert_eq!(light.defaults.temperature, 0.1);
        assert_eq!(light.defaults.top_k, 10);

        let args = ServeArgs {
            port: Some(1234),
            ..Default::default()
        };
        assert_eq!(Settings::resolve(&args, &env).unwrap().port, 1234);
    }

    #[test]
    fn keep_alive_and_shutdown_timeout() {
        let env = [
            ("LIGHT_MODEL_PATH", "/m.gguf"),
            ("LIGHT_KEEP_ALIVE", "5m"),
            ("KEEP_ALIVE", "-1"),
            ("SHUTDOWN_TIMEOUT", "600"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        assert_eq!(s.tiers[0].keep_alive, Some(Duration::from_secs(300)));
        assert_eq!(s.dir_keep_alive, None);
        assert_eq!(s.shutdown_timeout, Some(Duration::from_secs(600)));
        let s = Settings::resolve(&ServeArgs::default(), &[("SHUTDOWN_TIMEOUT", "0")]).unwrap();
        assert_eq!(s.shutdown_timeout, None);
        let err = Settings::resolve(
            &ServeArgs::default(),
            &[("LIGHT_MODEL_PATH", "/m"), ("LIGHT_KEEP_ALIVE", "soon")],
        )
        .unwrap_err();
        assert_eq!(err.name, "LIGHT_KEEP_ALIVE");
    }

    #[test]
    fn seed_003_names_its_model_on_the_hub() {
        let env = [
            ("MODEL_REPO_ID", "TheBloke/Llama-2-7B-Chat-GGUF"),
            ("MODEL_FILENAME", "llama-2-7b-chat.Q4_K_M.gguf"),
        ];
        let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        let model = s.startup_model.unwrap();
        assert_eq!(model.repo, "TheBloke/Llama-2-7B-Chat-GGUF");
        assert_eq!(model.file.as_deref(), Some("llama-2-7b-chat.Q4_K_M.gguf"));
        // The seed's second example is a PyTorch checkpoint: said plainly.
        let env = [
            ("MODEL_REPO_ID", "microsoft/DialoGPT-medium"),
            ("MODEL_FILENAME", "pytorch_model.bin"),
        ];
        let err = Settings::resolve(&ServeArgs::default(), &env).unwrap_err();
        assert_eq!(err.name, "MODEL_FILENAME");
        let err =
            Settings::resolve(&ServeArgs::default(), &[("MODEL_REPO_ID", "../x")]).unwrap_err();
        assert_eq!(err.name, "MODEL_REPO_ID");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = Settings::resolve(
            &ServeArgs::default(),
            &[("LIGHT_MODEL_PATH", "/m.gguf"), ("LIGHT_N_CTX", "lots")],
        )
        .unwrap_err();
        assert_eq!(err.name, "LIGHT_N_CTX");
        let err = Settings::resolve(&ServeArgs::default(), &[("PORT", "99999")]).unwrap_err();
        assert_eq!(err.name, "PORT");
    }
}
