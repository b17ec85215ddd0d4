//! Anthropic's Messages API: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, their answers and stream events.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A Messages request. Content blocks stay JSON values here: the translation
/// onto a chat request reads them and names the block at fault.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct MessagesRequest {
    pub model: String,
    /// `string` or a list of `text` blocks.
    #[schema(value_type = Option<Object>)]
    pub system: Option<Value>,
    /// Turns of `user` and `assistant`; content is a string or a list of
    /// `text`, `tool_use` and `tool_result` blocks.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// Required, as Anthropic requires it.
    pub max_tokens: u32,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub stream: Option<bool>,
    /// `{name, description, input_schema}` each.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "none"}` or `{"type": "tool", "name": ...}`,
    /// each with an optional `disable_parallel_tool_use`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"type": "enabled", "budget_tokens": n}` (or `adaptive`) asks a
    /// thinking model's template to think, `disabled` asks it not to; without
    /// it the model does as its template does.
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
    /// Accepted and ignored (`user_id`).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// `POST /v1/messages/count_tokens`: a request without `max_tokens`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CountTokensRequest {
    pub model: String,
    #[schema(value_type = Option<Object>)]
    pub system: Option<Value>,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CountTokensAnswer {
    pub input_tokens: u32,
}

/// One block of an answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// A thinking model's reasoning. Its `signature` is empty: models run
    /// here sign nothing, and a client sends the block back as it came.
    Thinking {
        thinking: String,
        signature: String,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[schema(value_type = Object)]
        input: Value,
    },
}

/// Why the answer ended, in Anthropic's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
}

#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
pub struct MessagesUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub cache_read_input_tokens: u32,
}

/// The answer: `{"type": "message", "role": "assistant", ...}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Message {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: String,
    pub content: Vec<ContentBlock>,
    pub stop_reason: Option<StopReason>,
    pub stop_sequence: Option<String>,
    pub usage: MessagesUsage,
}

/// A piece of a streamed block.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    ThinkingDelta { thinking: String },
    TextDelta { text: String },
    InputJsonDelta { partial_json: String },
}

/// What changes at the end of a streamed message.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageDelta {
    pub stop_reason: Option<StopReason>,
    pub stop_sequence: Option<String>,
}

/// One server-sent event of a streamed answer; its `type` is also the SSE
/// event name.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessagesEvent {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        index: usize,
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: MessageDelta,
        usage: MessagesUsage,
    },
    MessageStop,
}

impl MessagesEvent {
    /// The SSE event name: the same as the payload's `type`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop => "message_stop",
        }
    }
}

/// Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessagesErrorBody {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub error: MessagesErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessagesErrorDetail {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: String,
}
