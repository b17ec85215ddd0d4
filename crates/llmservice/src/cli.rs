//! The command line: subcommands and their flags (clap). Flags fall back to
//! the environment in `crate::settings`, which knows every name the earlier
//! services used for each (clap's own `env` takes one name a flag), so the
//! help text lists those names itself.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "llmservice",
    version,
    about = "Local language models behind an OpenAI-compatible API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeArgs),
    /// List the models the server would offer, with their kind.
    Models(ServeArgs),
    /// Measure single-stream decode speed: the server path vs. a plain llama.cpp loop.
    Bench(BenchArgs),
    /// Download a GGUF model from the Hugging Face Hub into the models directory.
    Pull(PullArgs),
    /// Read one uploaded file's text from stdin to stdout: the server runs
    /// its HTML and PDF parsers this way, in a child process with limits.
    #[command(hide = true)]
    ExtractText(ExtractArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ExtractArgs {
    /// text, markdown, html or pdf
    #[arg(long)]
    pub kind: String,
}

/// Flags for `pull`. The Hub is `HF_ENDPOINT` (default https://huggingface.co),
/// with `HF_TOKEN` for gated and private repositories.
#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// owner/name, owner/name/FILE, owner/name:QUANT, or a Hub link to a file
    pub model: String,
    /// Pick the file with this quantization, e.g. Q4_K_M (the default when the repository has several)
    #[arg(long)]
    pub quant: Option<String>,
    /// Branch, tag or commit to download from [default: main]
    #[arg(long)]
    pub revision: Option<String>,
    /// Directory the file lands in [env: MODELS_DIR, LLM_SERVICE_MODELS_DIR, MODEL_DIR] [default: ~/.llmservice/models]
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

impl PullArgs {
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs {
            models_dir: self.models_dir.clone(),
            ..ServeArgs::default()
        }
    }
}

/// Flags for `serve`. Each falls back to the environment under the names the
/// earlier services used, then to a default.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Address to listen on [env: HOST, LLM_SERVICE_HOST] [default: 127.0.0.1]
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one (written to `.port`) [env: PORT, LLM_SERVICE_PORT] [default: 8000]
    #[arg(long)]
    pub port: Option<u16>,
    /// When the port is taken, listen on the next free one after it (written to `.port`) [env: NEXT_FREE_PORT]
    #[arg(long)]
    pub next_free_port: bool,
    /// Directory whose `.gguf` files are servable by file stem [env: MODELS_DIR, LLM_SERVICE_MODELS_DIR, MODEL_DIR]
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Directory for the service's own state [env: DATA_DIR, LLM_SERVICE_DATA_DIR] [default: ~/.llmservice]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log level (trace, debug, info, warn(ing), error, critical, off) or filter [env: LOG_LEVEL] [default: info]
    #[arg(long)]
    pub log_level: Option<String>,
    /// Largest request body accepted, in bytes [env: MAX_BODY_BYTES] [default: 10485760]
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// GGUF model to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// Threads for both the server and the plain loop.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// Tokens generated per run (end-of-generation is ignored so runs do equal work).
    #[arg(long, default_value_t = 128)]
    pub tokens: u32,
    /// Runs of each side.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Context size for both sides.
    #[arg(long, default_value_t = 4096)]
    pub n_ctx: u32,
    #[arg(long, default_value = "The history of the printing press begins")]
    pub prompt: String,
}

impl BenchArgs {
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs::default()
    }
}
