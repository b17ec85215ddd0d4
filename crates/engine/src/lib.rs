//! Inference engine: llama.cpp in-process, one scheduler thread per loaded model,
//! continuous batching, chat templates. This crate knows nothing of HTTP or of
//! OpenAI's wire types: it takes validated [`GenerateRequest`]s and answers with
//! streams of [`Event`]s.

mod backend;
pub mod bench;
pub mod chat;
mod constraint;
pub mod detok;
mod embed;
mod error;
mod event;
mod gguf;
pub mod heads;
mod request;
mod sampling;
mod scheduler;
mod sequence;
mod speculation;

pub use backend::{Engine, EngineConfig, ModelInfo};

/// Whether this build can offload layers to a GPU.
pub const GPU_BUILD: bool = cfg!(any(feature = "cuda", feature = "vulkan", feature = "metal"));
pub use constraint::{with_json_options, CompiledConstraint, Constraint};
pub use embed::{normalize, EmbedOutputs, Embedding, PendingEmbeddings, Pooling};
pub use error::EngineError;
pub use event::{Event, EventStream, FinishReason, TokenLogprob, Usage};
pub use gguf::{inspect, GgufSummary, ModelKind};
pub use request::{GenerateRequest, SamplingParams, TokenId};
pub use scheduler::SchedulerStats;
pub use speculation::Speculation;
