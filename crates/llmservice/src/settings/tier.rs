//! The model tiers and their settings: `{TIER}_*` (seed 000), with the
//! seeds' unprefixed names (`MODEL_PATH`, `N_CTX`, `CONTEXT_LENGTH`,
//! `N_THREADS`, ... of seeds 002 and 003) as the default tier's fallbacks
//! and the models directory's settings.

use std::path::PathBuf;
use std::time::Duration;

use engine::EngineConfig;

use super::{keep_alive, parse, parse_bool, ConfigError, Env};

/// The five model tiers of the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Light,
    Medium,
    Heavy,
    Embedding,
    Reranker,
}

impl Tier {
    pub const ALL: [Tier; 5] = [
        Tier::Light,
        Tier::Medium,
        Tier::Heavy,
        Tier::Embedding,
        Tier::Reranker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Light => "light",
            Tier::Medium => "medium",
            Tier::Heavy => "heavy",
            Tier::Embedding => "embedding",
            Tier::Reranker => "reranker",
        }
    }

    pub fn parse(name: &str) -> Option<Tier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(name))
    }

    fn env_prefix(self) -> String {
        self.as_str().to_ascii_uppercase()
    }
}

/// Defaults a request's own values override.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub max_tokens: u32,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        // The seeds' documented defaults. The repeat penalty stays on (1.1):
        // without it SmolLM2's greedy `json_object` answers loop until
        // `max_tokens` under today's compact JSON grammar; it costs what its
        // 64-token window costs (`engine::sampling::Penalties`), not a walk of
        // the vocabulary.
        Self {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            max_tokens: 1000,
        }
    }
}

/// What serves a tier.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// llama.cpp in this process (`llamacpp`, the default).
    LlamaCpp,
    /// OpenAI-compatible servers elsewhere (`openai`): vLLM, llama-server,
    /// another llmservice, OpenAI itself.
    OpenAi(UpstreamSettings),
    /// A server we start and supervise (`vllm`, `mlx`, or `{TIER}_COMMAND`),
    /// then talk to as an OpenAI-compatible upstream on loopback.
    Managed(ManagedSettings),
}

/// A supervised upstream child.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedSettings {
    pub kind: ManagedKind,
    /// The command line, with `{model}` and `{port}` to fill in
    /// (`{TIER}_COMMAND`, else the kind's own).
    pub command: String,
    /// Whether the command is the kind's default (so its program must exist).
    pub default_command: bool,
    /// `{TIER}_START_TIMEOUT`: how long it may take to answer after starting.
    pub start_timeout: Duration,
    /// How it is talked to once running (its base URL is filled in at start).
    pub upstream: UpstreamSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedKind {
    /// `vllm serve` (seed 004, Linux GPUs).
    Vllm,
    /// `mlx_lm.server` (seeds 000, 001, 004; Apple Silicon).
    Mlx,
    /// Only `{TIER}_COMMAND`: any OpenAI-compatible server.
    Command,
}

impl ManagedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ManagedKind::Vllm => "vllm",
            ManagedKind::Mlx => "mlx",
            ManagedKind::Command => "command",
        }
    }
}

/// Where an `openai` tier's requests go.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// `{TIER}_BASE_URL`: base URLs as OpenAI clients take them
    /// (`http://gpu-1:8000/v1`), one per replica.
    pub base_urls: Vec<String>,
    /// `{TIER}_API_KEY`, sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// `{TIER}_UPSTREAM_MODEL`: the model name the upstream knows; else the
    /// name the client sent.
    pub model: Option<String>,
    /// `{TIER}_TIMEOUT`: how long an upstream may stay silent (to connect,
    /// to answer, between streamed chunks).
    pub timeout: Duration,
    /// The tier's sampling settings the operator set (`{TIER}_TEMPERATURE`,
    /// `_TOP_P`, `_TOP_K`, `_MIN_P`, `_REPEAT_PENALTY`, `_MAX_TOKENS`), as
    /// request fields: a request that leaves one out gets it. Settings left
    /// unset stay the upstream's own.
    pub sampling: serde_json::Map<String, serde_json::Value>,
    /// The upstream calls the repetition penalty `repetition_penalty` (vLLM,
    /// mlx_lm): `repeat_penalty` is sent by that name.
    pub repetition_penalty: bool,
}

impl Backend {
    /// Where requests go when the tier is served by another server.
    fn upstream_mut(&mut self) -> Option<&mut UpstreamSettings> {
        match self {
            Backend::LlamaCpp => None,
            Backend::OpenAi(upstream) => Some(upstream),
            Backend::Managed(managed) => Some(&mut managed.upstream),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TierSettings {
    pub tier: Tier,
    pub model_path: PathBuf,
    pub backend: Backend,
    pub engine: EngineConfig,
    pub defaults: GenerationDefaults,
    /// Unload after this long unused; `None`: stay loaded.
    pub keep_alive: Option<Duration>,
    /// Default `dimensions` of the tier's embeddings (`{TIER}_EMBEDDING_DIMENSION`).
    pub embedding_dimension: Option<u32>,
}

/// The default tier: the one the seeds' single-model names configure.
pub const DEFAULT_TIER: Tier = Tier::Light;

/// Looks a setting up under a tier's names: `{TIER}_{NAME}`, then (for the
/// default tier, and for the models directory) the seeds' unprefixed name.
pub(super) struct TierEnv<'a> {
    pub env: &'a dyn Env,
    /// `None` for the models directory's settings (unprefixed names only).
    pub tier: Option<Tier>,
}

impl TierEnv<'_> {
    /// The names a setting goes by, in the order they are read.
    fn names(&self, suffix: &str) -> Vec<String> {
        let unprefixed: &[&str] = match suffix {
            // Seed 003 calls the context CONTEXT_LENGTH.
            "N_CTX" => &["N_CTX", "CONTEXT_LENGTH"],
            "MODEL_PATH" | "N_BATCH" | "N_THREADS" | "N_GPU_LAYERS" | "USE_MMAP"
            | "TEMPERATURE" | "MAX_TOKENS" => &[suffix],
            // Also for the models found in the models directory, which have no prefix.
            "PROMPT_CACHE_RAM" => &[suffix],
            _ => &[],
        };
        let mut names = Vec::new();
        if let Some(tier) = self.tier {
            names.push(format!("{}_{suffix}", tier.env_prefix()));
        }
        if self.tier.is_none_or(|t| t == DEFAULT_TIER) {
            names.extend(unprefixed.iter().map(|n| (*n).to_owned()));
        }
        names
    }

    pub fn get(&self, suffix: &str) -> Option<(String, String)> {
        self.names(suffix)
            .into_iter()
            .find_map(|name| self.env.get(&name).map(|v| (name, v)))
    }

    pub fn parse<T: std::str::FromStr>(&self, suffix: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let names = self.names(suffix);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        parse(self.env, &names)
    }

    pub fn flag(&self, suffix: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(suffix) {
            None => Ok(None),
            Some((name, _)) => parse_bool(self.env, &name),
        }
    }

    /// The engine settings and request defaults these names give.
    pub fn engine_and_defaults(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<(EngineConfig, GenerationDefaults), ConfigError> {
        let mut engine = EngineConfig::default();
        if let Some(v) = self.parse("N_CTX")? {
            engine.n_ctx = v;
        }
        if let Some(v) = self.parse("N_BATCH")? {
            engine.n_batch = v;
        }
        if let Some(v) = self.parse::<i32>("N_THREADS")? {
            engine.n_threads = v;
            engine.n_threads_batch = v;
        }
        if let Some(v) = self.parse::<i32>("N_GPU_LAYERS")? {
            engine.n_gpu_layers = v;
            if v != 0 && !engine::GPU_BUILD {
                let (name, _) = self.get("N_GPU_LAYERS").unwrap_or_default();
                warnings.push(format!(
                    "{name}={v} has no effect: this build runs on the CPU only (build with \
                     --features cuda, vulkan or metal to offload layers)"
                ));
            }
        }
        if let Some(v) = self.flag("USE_MMAP")? {
            engine.use_mmap = v;
        }
        if let Some(v) = self.flag("USE_MLOCK")? {
            engine.use_mlock = v;
        }
        if let Some(v) = self.parse("PARALLEL")? {
            engine.parallel = v;
        }
        if let Some(v) = self.parse("MAX_QUEUE")? {
            engine.max_queue = v;
        }
        if let Some(secs) = self.parse::<f64>("QUEUE_TIMEOUT")? {
            engine.queue_timeout = Duration::try_from_secs_f64(secs).map_err(|e| {
                ConfigError::new(self.names("QUEUE_TIMEOUT")[0].clone(), &secs.to_string(), e)
            })?;
        }
        if let Some((_, v)) = self.get("CHAT_TEMPLATE") {
            // A path to a template file, or the template itself.
            engine.chat_template = Some(std::fs::read_to_string(&v).unwrap_or(v));
        }
        if let Some(v) = self.flag("EMBEDDING_MODE")? {
            engine.embedding_mode = v;
        }
        if let Some((_, path)) = self
            .get("DRAFT_MODEL_PATH")
            .filter(|(_, v)| !v.trim().is_empty())
        {
            // A draft model given is a draft model used, unless told otherwise.
            engine.draft_model = Some(path.trim().into());
            engine.speculation = engine::Speculation::Draft;
        }
        if let Some((name, v)) = self.get("SPECULATIVE") {
            engine.speculation = match v.trim().to_ascii_lowercase().as_str() {
                "off" | "false" | "0" | "none" => engine::Speculation::Off,
                "ngram" | "on" | "true" | "1" => engine::Speculation::Ngram,
                "draft" if engine.draft_model.is_some() => engine::Speculation::Draft,
                "draft" => {
                    let draft = self.names("DRAFT_MODEL_PATH").join(" or ");
                    return Err(ConfigError::new(
                        name,
                        &v,
                        format!("`draft` needs a draft model of the same vocabulary: set {draft}"),
                    ));
                }
                _ => return Err(ConfigError::new(name, &v, "`off`, `ngram` or `draft`")),
            };
        }
        if let Some(mib) = self.parse::<usize>("PROMPT_CACHE_RAM")? {
            engine.host_cache_bytes = mib.saturating_mul(1 << 20);
        }
        let mut defaults = GenerationDefaults::default();
        if let Some(v) = self.parse("TEMPERATURE")? {
            defaults.temperature = v;
        }
        if let Some(v) = self.parse("TOP_P")? {
            defaults.top_p = v;
        }
        if let Some(v) = self.parse("TOP_K")? {
            defaults.top_k = v;
        }
        if let Some(v) = self.parse("MIN_P")? {
            defaults.min_p = v;
        }
        if let Some(v) = self.parse("REPEAT_PENALTY")? {
            defaults.repeat_penalty = v;
        }
        if let Some(v) = self.parse("MAX_TOKENS")? {
            defaults.max_tokens = v;
        }
        Ok((engine, defaults))
    }

    /// The sampling settings set here, as request fields.
    fn upstream_sampling(&self) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
        let mut fields = serde_json::Map::new();
        for (suffix, field) in [
            ("TEMPERATURE", "temperature"),
            ("TOP_P", "top_p"),
            ("MIN_P", "min_p"),
            ("REPEAT_PENALTY", "repeat_penalty"),
        ] {
            if let Some(v) = self.parse::<f32>(suffix)? {
                fields.insert(field.to_owned(), serde_json::json!(v));
            }
        }
        if let Some(v) = self.parse::<i32>("TOP_K")? {
            fields.insert("top_k".to_owned(), v.into());
        }
        if let Some(v) = self.parse::<u32>("MAX_TOKENS")? {
            fields.insert("max_tokens".to_owned(), v.into());
        }
        Ok(fields)
    }
}

/// The seeds' unprefixed names (besides `MODEL_PATH`) set the default tier
/// and the models directory's files. A warning names each one set that
/// another tier loaded here does not take, with the name that tier reads.
pub(super) fn unprefixed_warnings(
    tiers: &[TierSettings],
    env: &dyn Env,
    warnings: &mut Vec<String>,
) {
    let unprefixed = [
        ("N_CTX", "N_CTX"),
        ("CONTEXT_LENGTH", "N_CTX"),
        ("N_BATCH", "N_BATCH"),
        ("N_THREADS", "N_THREADS"),
        ("N_GPU_LAYERS", "N_GPU_LAYERS"),
        ("USE_MMAP", "USE_MMAP"),
        ("TEMPERATURE", "TEMPERATURE"),
        ("MAX_TOKENS", "MAX_TOKENS"),
    ];
    for (unprefixed, suffix) in unprefixed {
        let Some(value) = env.get(unprefixed) else {
            continue;
        };
        // Sampling settings are the chat tiers' only.
        let sampling = matches!(suffix, "TEMPERATURE" | "MAX_TOKENS");
        let missing: Vec<String> = tiers
            .iter()
            .filter(|t| t.tier != DEFAULT_TIER && t.backend == Backend::LlamaCpp)
            .filter(|t| !sampling || matches!(t.tier, Tier::Medium | Tier::Heavy))
            .map(|t| format!("{}_{suffix}", t.tier.env_prefix()))
            .filter(|own| env.get(own).is_none())
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "{unprefixed}={value} sets the {} tier and the models directory's files only; \
                 the other tiers read {}",
                DEFAULT_TIER.as_str(),
                missing.join(", ")
            ));
        }
    }
}

/// Settings of the engine that loads a model here, which a tier served by
/// another server cannot use.
const ENGINE_ONLY: [&str; 12] = [
    "N_CTX",
    "N_BATCH",
    "N_THREADS",
    "N_GPU_LAYERS",
    "USE_MMAP",
    "USE_MLOCK",
    "PARALLEL",
    "CHAT_TEMPLATE",
    "EMBEDDING_MODE",
    "DRAFT_MODEL_PATH",
    "SPECULATIVE",
    "PROMPT_CACHE_RAM",
];

/// A tier exists when `{TIER}_MODEL_PATH` (for the default tier, also
/// `MODEL_PATH`) is set; its other settings fall back to defaults.
pub(super) fn tier_settings(
    tier: Tier,
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<Option<TierSettings>, ConfigError> {
    let names = TierEnv {
        env,
        tier: Some(tier),
    };
    let name = |suffix: &str| format!("{}_{suffix}", tier.env_prefix());
    let mut backend = backend(tier, env)?;
    let repetition_penalty = matches!(&backend,
        Backend::Managed(m) if matches!(m.kind, ManagedKind::Vllm | ManagedKind::Mlx));
    // The engine's settings belong to the server that loads the model.
    let elsewhere = match &backend {
        Backend::LlamaCpp => None,
        Backend::OpenAi(_) => Some("the upstream server".to_owned()),
        Backend::Managed(_) => Some(format!("the command, {}", name("COMMAND"))),
    };
    if let Some(elsewhere) = elsewhere {
        for setting in ENGINE_ONLY.map(name) {
            if env.get(&setting).is_some() {
                warnings.push(format!(
                    "{setting} is not used: {elsewhere} loads the {} tier's model and \
                     takes its settings",
                    tier.as_str(),
                ));
            }
        }
    }
    if let Some(upstream) = backend.upstream_mut() {
        upstream.sampling = names.upstream_sampling()?;
        upstream.repetition_penalty = repetition_penalty;
    }
    let model_path = names.get("MODEL_PATH");
    let (path_name, model_path) = match (&backend, model_path) {
        (_, Some(found)) => found,
        // An upstream tier needs no file: it is named by its upstream model
        // (so is a command's, which may name its model itself).
        (Backend::OpenAi(up), None) => (
            String::new(),
            up.model.clone().unwrap_or_else(|| "upstream".to_owned()),
        ),
        (Backend::Managed(m), None) if m.kind == ManagedKind::Command => (
            String::new(),
            m.upstream
                .model
                .clone()
                .unwrap_or_else(|| "upstream".to_owned()),
        ),
        (_, None) => return Ok(None),
    };
    if path_name != "MODEL_PATH" && tier == DEFAULT_TIER && env.get("MODEL_PATH").is_some() {
        warnings.push(format!(
            "MODEL_PATH is ignored: {path_name} names the {} tier's model",
            tier.as_str()
        ));
    }
    let (engine, defaults) = names.engine_and_defaults(warnings)?;
    Ok(Some(TierSettings {
        tier,
        model_path: PathBuf::from(model_path),
        backend,
        engine,
        defaults,
        keep_alive: keep_alive(env, &name("KEEP_ALIVE"))?,
        embedding_dimension: parse::<u32>(env, &[&name("EMBEDDING_DIMENSION")])?.filter(|&d| d > 0),
    }))
}

/// `{TIER}_BACKEND` and, for `openai`, where the upstream is.
fn backend(tier: Tier, env: &dyn Env) -> Result<Backend, ConfigError> {
    let name = |suffix: &str| format!("{}_{suffix}", tier.env_prefix());
    let base_urls: Vec<String> = env
        .get(&name("BASE_URL"))
        .map(|v| super::list(&v))
        .unwrap_or_default();
    let kind = env
        .get(&name("BACKEND"))
        .map(|b| b.trim().to_ascii_lowercase());
    let command = env.get(&name("COMMAND"));
    let managed = match (kind.as_deref(), &command) {
        (Some("vllm"), _) => Some(ManagedKind::Vllm),
        (Some("mlx"), _) => Some(ManagedKind::Mlx),
        (None, Some(_)) => Some(ManagedKind::Command),
        _ => None,
    };
    if let Some(managed) = managed {
        let timeout = parse::<f64>(env, &[&name("TIMEOUT")])?.unwrap_or(600.0);
        let start = parse::<f64>(env, &[&name("START_TIMEOUT")])?.unwrap_or(600.0);
        let seconds = |value: f64, suffix: &str| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    ConfigError::new(name(suffix), &value.to_string(), "seconds, above 0")
                })
        };
        let default = match managed {
            ManagedKind::Vllm => "vllm serve {model} --host 127.0.0.1 --port {port}",
            ManagedKind::Mlx => "mlx_lm.server --model {model} --host 127.0.0.1 --port {port}",
            ManagedKind::Command => "",
        };
        return Ok(Backend::Managed(ManagedSettings {
            kind: managed,
            default_command: command.is_none(),
            command: command.unwrap_or_else(|| default.to_owned()),
            start_timeout: seconds(start, "START_TIMEOUT")?,
            upstream: UpstreamSettings {
                base_urls: Vec::new(),
                api_key: env.get(&name("API_KEY")),
                model: env.get(&name("UPSTREAM_MODEL")),
                timeout: seconds(timeout, "TIMEOUT")?,
                sampling: serde_json::Map::new(),
                repetition_penalty: false,
            },
        }));
    }
    match kind.as_deref() {
        None if base_urls.is_empty() => Ok(Backend::LlamaCpp),
        Some("llamacpp") => Ok(Backend::LlamaCpp),
        None | Some("openai") => {
            if base_urls.is_empty() {
                return Err(ConfigError::new(
                    name("BACKEND"),
                    "openai",
                    format!(
                        "an openai tier needs {} (e.g. http://gpu-1:8000/v1)",
                        name("BASE_URL")
                    ),
                ));
            }
            for url in &base_urls {
                let ok = (url.starts_with("http://") || url.starts_with("https://"))
                    && reqwest::Url::parse(url).is_ok();
                if !ok {
                    return Err(ConfigError::new(
                        name("BASE_URL"),
                        url,
                        "not an http(s) URL",
                    ));
                }
            }
            let timeout = parse::<f64>(env, &[&name("TIMEOUT")])?.unwrap_or(600.0);
            let timeout = Duration::try_from_secs_f64(timeout)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    ConfigError::new(name("TIMEOUT"), &timeout.to_string(), "seconds, above 0")
                })?;
            Ok(Backend::OpenAi(UpstreamSettings {
                base_urls: base_urls
                    .into_iter()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .collect(),
                api_key: env.get(&name("API_KEY")),
                model: env.get(&name("UPSTREAM_MODEL")),
                timeout,
                sampling: serde_json::Map::new(),
                repetition_penalty: false,
            }))
        }
        Some(other) => Err(ConfigError::new(
            name("BACKEND"),
            other,
            "expected llamacpp, openai, vllm or mlx",
        )),
    }
}
