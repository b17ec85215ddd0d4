//! Every environment block of the seeds, read as the `.env` file it is
//! (dotenvy, inline comments and all), means here what it meant there.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// A seed's block as the environment a `.env` file gives, plus `HOME`.
fn dotenv(block: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = dotenvy::from_read_iter(block.as_bytes())
        .map(|item| item.expect("the seed's block parses as .env"))
        .collect();
    env.push(("HOME".into(), "/home/u".into()));
    env
}

fn resolve(block: &str) -> Settings {
    Settings::resolve(&ServeArgs::default(), &dotenv(block)).unwrap()
}

fn tier(s: &Settings, tier: Tier) -> &TierSettings {
    s.tiers.iter().find(|t| t.tier == tier).unwrap()
}

#[test]
fn seed_000_server_and_cache() {
    let s = resolve(
        "PORT=8000                    # API port
HOST=0.0.0.0                # Host address
LOG_LEVEL=INFO              # Logging level
SHUTDOWN_TIMEOUT=600        # Auto-shutdown after inactivity (seconds)
ENABLE_CACHE=true           # Enable response caching
CACHE_MAX_SIZE=1000        # Maximum cache entries
CACHE_TTL_SECONDS=3600     # Cache time-to-live
CACHE_PERSIST_TO_DISK=false # Persist cache to disk
",
    );
    assert_eq!(
        (s.port, s.host.as_str(), s.log_level.as_str()),
        (8000, "0.0.0.0", "info")
    );
    assert_eq!(s.shutdown_timeout, Some(Duration::from_secs(600)));
    assert!(s.cache.enabled && !s.cache.persist_to_disk);
    assert_eq!(
        (s.cache.max_entries, s.cache.ttl),
        (1000, Duration::from_secs(3600))
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn seed_000_tier_settings() {
    let s = resolve(
        "EMBEDDING_MODEL_PATH=/m/qwen3-0.6b.gguf
EMBEDDING_BACKEND=llamacpp              # Backend: llamacpp or mlx
EMBEDDING_N_CTX=8192                    # Context window size
EMBEDDING_N_BATCH=512                   # Batch size (llamacpp only)
EMBEDDING_N_THREADS=8                   # CPU threads
EMBEDDING_N_GPU_LAYERS=-1               # GPU layers (-1 for all)
EMBEDDING_USE_MMAP=true                 # Memory mapping
EMBEDDING_USE_MLOCK=false               # Lock in memory
EMBEDDING_EMBEDDING_MODE=true           # Enable embedding mode
EMBEDDING_EMBEDDING_DIMENSION=1024      # Embedding dimensions
HEAVY_MODEL_PATH=mlx-community/Mistral-7B-Instruct-v0.3-4bit
HEAVY_BACKEND=mlx
HEAVY_TEMPERATURE=0.3
HEAVY_REPEAT_PENALTY=1.2
",
    );
    let embedding = tier(&s, Tier::Embedding);
    assert_eq!(embedding.engine.n_ctx, 8192);
    assert_eq!(embedding.engine.n_threads, 8);
    assert!(embedding.engine.embedding_mode);
    assert_eq!(embedding.embedding_dimension, Some(1024));
    // MLX is accepted at start (it is refused when the tier first loads).
    let Backend::Managed(mlx) = &tier(&s, Tier::Heavy).backend else {
        panic!("heavy is not managed")
    };
    assert_eq!(mlx.kind, ManagedKind::Mlx);
    // The tier's sampling settings reach mlx_lm, the penalty under its name;
    // what the operator left unset stays mlx_lm's own.
    assert_eq!(
        serde_json::Value::Object(mlx.upstream.sampling.clone()),
        serde_json::json!({"temperature": 0.3f32, "repeat_penalty": 1.2f32})
    );
    assert!(mlx.upstream.repetition_penalty);
    if !engine::GPU_BUILD {
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("EMBEDDING_N_GPU_LAYERS=-1")),
            "{:?}",
            s.warnings
        );
    }
}

#[test]
fn seed_001_tiers_cache_and_log_level() {
    let s = resolve(
        "LIGHT_MODEL_PATH=/path/to/qwen-0.5b.gguf
LIGHT_BACKEND=llamacpp
LIGHT_TEMPERATURE=0.1
LIGHT_MAX_TOKENS=1000

MEDIUM_MODEL_PATH=/path/to/gemma-4b.gguf
MEDIUM_BACKEND=llamacpp
MEDIUM_TEMPERATURE=0.3
MEDIUM_MAX_TOKENS=2048

HEAVY_MODEL_PATH=/path/to/mistral-24b.gguf
HEAVY_BACKEND=llamacpp
HEAVY_TEMPERATURE=0.7
HEAVY_MAX_TOKENS=4096
MEDIUM_TOP_P=0.95
HEAVY_REPEAT_PENALTY=1.2
ENABLE_CACHE=true
CACHE_MAX_SIZE=1000
CACHE_TTL_SECONDS=3600
CACHE_PERSIST_TO_DISK=true
CACHE_DIR=.cache/responses
LOG_LEVEL=DEBUG
",
    );
    let light = tier(&s, Tier::Light);
    assert_eq!(light.model_path, PathBuf::from("/path/to/qwen-0.5b.gguf"));
    assert_eq!(
        (light.defaults.temperature, light.defaults.max_tokens),
        (0.1, 1000)
    );
    assert_eq!(tier(&s, Tier::Medium).defaults.max_tokens, 2048);
    assert_eq!(tier(&s, Tier::Heavy).defaults.repeat_penalty, 1.2);
    assert!(s.cache.persist_to_disk);
    assert_eq!(s.cache.dir, PathBuf::from(".cache/responses"));
    assert_eq!(s.log_level, "debug");
}

#[test]
fn seed_002_single_model_names() {
    let s = resolve(
        "MODEL_PATH=/path/to/your/model.gguf
N_CTX=2048
N_GPU_LAYERS=0
N_THREADS=4
TEMPERATURE=0.7
MAX_TOKENS=512
VERBOSE=true
",
    );
    // MODEL_PATH is the default tier; the other names are its settings,
    // and the models directory's.
    let light = tier(&s, DEFAULT_TIER);
    assert_eq!(light.model_path, PathBuf::from("/path/to/your/model.gguf"));
    for engine in [&light.engine, &s.dir_engine] {
        assert_eq!(
            (engine.n_ctx, engine.n_threads, engine.n_gpu_layers),
            (2048, 4, 0)
        );
    }
    for defaults in [&light.defaults, &s.dir_defaults] {
        assert_eq!((defaults.temperature, defaults.max_tokens), (0.7, 512));
    }
    assert_eq!(s.log_level, "debug");
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // A tier's own name wins, and MODEL_PATH beside it is said to be ignored.
    let env =
        dotenv("MODEL_PATH=/a.gguf\nLIGHT_MODEL_PATH=/b.gguf\nLIGHT_N_CTX=1024\nN_CTX=2048\n");
    let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
    let light = tier(&s, Tier::Light);
    assert_eq!(
        (light.model_path.to_str(), light.engine.n_ctx),
        (Some("/b.gguf"), 1024)
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("MODEL_PATH is ignored")),
        "{:?}",
        s.warnings
    );
    // Unprefixed names are only the default tier's, and a tier that does
    // not take one is named in a warning.
    let env = dotenv(
        "MEDIUM_MODEL_PATH=/m.gguf\nHEAVY_MODEL_PATH=/h.gguf\nHEAVY_N_CTX=1024\nN_CTX=2048\n",
    );
    let s = Settings::resolve(&ServeArgs::default(), &env).unwrap();
    assert_eq!(
        tier(&s, Tier::Medium).engine.n_ctx,
        EngineConfig::default().n_ctx
    );
    assert_eq!(
        s.warnings,
        ["N_CTX=2048 sets the light tier and the models directory's files only; the other tiers read MEDIUM_N_CTX"]
    );
}

#[test]
fn seed_003_hub_model_and_retrieval() {
    let s = resolve(
        "MODEL_REPO_ID=TheBloke/Llama-2-7B-Chat-GGUF
MODEL_FILENAME=llama-2-7b-chat.Q4_K_M.gguf
CONTEXT_LENGTH=2048
MAX_TOKENS=256
TEMPERATURE=0.2

QDRANT_HOST=localhost
QDRANT_PORT=6333
QDRANT_USE_MEMORY=true  # false for Docker deployment

EMBEDDING_MODEL_NAME=jinaai/jina-embeddings-v3
EMBEDDING_DIMENSION=1024

RAG_TOP_K=3
RAG_SCORE_THRESHOLD=0.7

HOST=127.0.0.1
PORT=8000
LOG_LEVEL=INFO
",
    );
    let model = s.startup_model.as_ref().unwrap();
    assert_eq!(model.file.as_deref(), Some("llama-2-7b-chat.Q4_K_M.gguf"));
    // The downloaded file is a models-directory model: the unprefixed names are its settings.
    assert_eq!(s.dir_engine.n_ctx, 2048);
    assert_eq!(
        (s.dir_defaults.max_tokens, s.dir_defaults.temperature),
        (256, 0.2)
    );
    assert_eq!(s.rag.storage, rag::Storage::Memory);
    assert_eq!(
        (s.rag.top_k, s.rag.score_threshold, s.rag.dimension),
        (3, 0.7, Some(1024))
    );
    assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 8000));
    // `export MODEL_PATH=...` instead: the default tier, as for seed 002.
    let s = resolve("export MODEL_PATH=\"/path/to/your/model.gguf\"\n");
    assert_eq!(
        tier(&s, DEFAULT_TIER).model_path,
        PathBuf::from("/path/to/your/model.gguf")
    );
}

#[test]
fn seed_004_llm_service_names() {
    let s = resolve(
        "LLM_SERVICE_HOST=0.0.0.0
LLM_SERVICE_PORT=8321
LLM_SERVICE_MODELS_DIR=/srv/models
LLM_SERVICE_API_KEY=sk-team
",
    );
    assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 8321));
    assert_eq!(s.models_dir, PathBuf::from("/srv/models"));
    assert_eq!(s.keys.keys, ["sk-team"]);
}

#[test]
fn seed_003_docker_deployment_keeps_collections_on_its_qdrant_server() {
    // Seed 003's block as its Docker deployment sets it ("false for Docker").
    let s = resolve("QDRANT_HOST=qdrant\nQDRANT_PORT=6333\nQDRANT_USE_MEMORY=false\n");
    let rag::Storage::Qdrant(config) = &s.rag.storage else {
        panic!("{:?}", s.rag.storage)
    };
    assert_eq!(config.url, "http://qdrant:6333");
    assert_eq!(config.api_key, None);
    assert_eq!(config.timeout, Duration::from_secs(60));

    let s = resolve(
        "QDRANT_URL=https://cluster.example:6333/\nQDRANT_API_KEY=secret\nQDRANT_TIMEOUT=5\n",
    );
    let rag::Storage::Qdrant(config) = &s.rag.storage else {
        panic!("{:?}", s.rag.storage)
    };
    assert_eq!(config.url, "https://cluster.example:6333/");
    assert_eq!(config.api_key.as_deref(), Some("secret"));
    assert_eq!(config.timeout, Duration::from_secs(5));
    assert!(!format!("{config:?}").contains("secret"), "{config:?}");
    let s = resolve("QDRANT_URL=qdrant:6333\n");
    assert!(matches!(&s.rag.storage, rag::Storage::Qdrant(c) if c.url == "http://qdrant:6333"));

    // The seed's own default (memory) wins over a host, and says so.
    let s = resolve("QDRANT_HOST=qdrant\n");
    assert!(matches!(s.rag.storage, rag::Storage::Disk(_)));
    assert!(
        s.warnings.iter().any(|w| w.contains("QDRANT_HOST=qdrant")),
        "{:?}",
        s.warnings
    );
    let s = resolve("QDRANT_HOST=localhost\nQDRANT_USE_MEMORY=false\n");
    assert!(matches!(s.rag.storage, rag::Storage::Disk(_)));
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("QDRANT_URL=http://localhost:6333")),
        "the way to a local Qdrant server is said: {:?}",
        s.warnings
    );

    for bad in ["QDRANT_URL=ftp://qdrant\n", "QDRANT_URL=http://\n"] {
        let error = Settings::resolve(&ServeArgs::default(), &dotenv(bad)).unwrap_err();
        assert!(error.to_string().contains("QDRANT_URL"), "{error}");
    }
}
