//! Inference engine: llama.cpp in-process, one scheduler thread per loaded model,
//! continuous batching, chat templates. This crate knows nothing of HTTP or of
//! OpenAI's wire types: it takes validated [`GenerateRequest`]s and answers with
//! streams of [`Event`]s.
//!
//! Without the default `llama` feature only the parsers of untrusted bytes
//! build (chat templates, tool calls, detokenization, head files, the GBNF
//! guard): that is what `fuzz/` links.

#[cfg(feature = "llama")]
mod backend;
#[cfg(feature = "llama")]
pub mod bench;
pub mod chat;
#[cfg(feature = "llama")]
mod constraint;
pub mod detok;
#[cfg(feature = "llama")]
mod embed;
mod error;
mod event;
pub mod gbnf;
#[cfg(feature = "llama")]
mod gguf;
pub mod heads;
#[cfg(feature = "llama")]
mod request;
#[cfg(feature = "llama")]
mod sampling;
#[cfg(feature = "llama")]
mod scheduler;
#[cfg(feature = "llama")]
mod sequence;
#[cfg(feature = "llama")]
mod speculation;

#[cfg(feature = "llama")]
pub use backend::{Engine, EngineConfig, ModelInfo};

/// Whether this build can offload layers to a GPU.
pub const GPU_BUILD: bool = cfg!(any(feature = "cuda", feature = "vulkan", feature = "metal"));
#[cfg(feature = "llama")]
pub use constraint::{any_json_object, with_json_options, CompiledConstraint, Constraint};
#[cfg(feature = "llama")]
pub use embed::{normalize, EmbedOutputs, Embedding, PendingEmbeddings, Pooling};
pub use error::EngineError;
pub use event::{Event, EventStream, FinishReason, TokenLogprob, Usage};
#[cfg(feature = "llama")]
pub use gguf::{chat_template as gguf_chat_template, inspect, GgufSummary, ModelKind};
#[cfg(feature = "llama")]
pub use request::{GenerateRequest, SamplingParams, TokenId};
#[cfg(feature = "llama")]
pub use scheduler::SchedulerStats;
#[cfg(feature = "llama")]
pub use speculation::Speculation;
