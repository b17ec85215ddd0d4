//! Wire types: the serde shapes of every request, answer and stream chunk, one
//! file per endpoint family, with the two readers of untrusted bytes that go
//! with them (a request body, an upstream's event stream). No logic beyond
//! conversions between shapes; no HTTP server and no llama.cpp, so that
//! `fuzz/` builds them in seconds. Unknown request fields are ignored (no
//! `deny_unknown_fields`), and `null` reads as absent.

mod body;
mod chat;
mod common;
mod completions;
mod embeddings;
mod messages;
mod models;
mod ollama;
mod rag;
mod responses;
mod sse;
mod tokens;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use body::{parse_body, BodyError};
pub use chat::*;
pub use common::*;
pub use completions::*;
pub use embeddings::*;
pub use messages::*;
pub use models::*;
pub use ollama::*;
pub use rag::*;
pub use responses::*;
pub use sse::SseFramer;
pub use tokens::*;

/// Why a choice ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    FunctionCall,
}

impl From<engine::FinishReason> for FinishReason {
    fn from(reason: engine::FinishReason) -> Self {
        match reason {
            engine::FinishReason::Stop | engine::FinishReason::StopString(_) => Self::Stop,
            engine::FinishReason::Length => Self::Length,
        }
    }
}
