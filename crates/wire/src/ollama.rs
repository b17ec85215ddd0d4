//! Ollama's API (`/api/...`): requests, answers and NDJSON stream lines.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `POST /api/chat`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OllamaChatRequest {
    pub model: String,
    /// `{role, content, tool_calls?, tool_name?}` each.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// OpenAI-shaped function tools.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `"json"` or a JSON schema.
    #[schema(value_type = Option<Object>)]
    pub format: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    /// Defaults to true, as in Ollama.
    pub stream: Option<bool>,
    /// `0` (or `"0"`, `"0s"`) unloads the model once the answer is done.
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
    /// Accepted; thinking models keep their own template behaviour.
    #[schema(value_type = Option<Object>)]
    pub think: Option<Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OllamaGenerateRequest {
    pub model: String,
    /// Empty or absent: load (or with `keep_alive: 0` unload) the model only.
    pub prompt: Option<String>,
    pub system: Option<String>,
    /// `true` would skip the chat template; not supported.
    pub raw: Option<bool>,
    /// Fill-in-the-middle text after the cursor; not supported (a 400, not a
    /// chat answer that ignores it).
    pub suffix: Option<String>,
    /// Base64 images; no model here reads them (a 400).
    #[schema(value_type = Option<Vec<String>>)]
    pub images: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub format: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    pub stream: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub think: Option<Value>,
}

/// `POST /api/show`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OllamaShowRequest {
    /// Ollama's clients send `model`; older ones `name`.
    pub model: Option<String>,
    pub name: Option<String>,
    /// `/api/pull` only: NDJSON progress lines (the default) or one answer.
    pub stream: Option<bool>,
}

/// A call in an answer: arguments as an object, not JSON text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaToolCall {
    pub function: OllamaFunction,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaFunction {
    pub name: String,
    #[schema(value_type = Object)]
    pub arguments: Value,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaMessage {
    pub role: &'static str,
    pub content: String,
    /// A thinking model's reasoning, apart from its answer.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub thinking: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<OllamaToolCall>,
}

/// What the last line of an answer adds: why it ended, token counts and
/// durations in nanoseconds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaStats {
    pub done_reason: &'static str,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_count: u32,
    pub prompt_eval_duration: u64,
    pub eval_count: u32,
    pub eval_duration: u64,
}

/// One line of a stream, or the whole answer: `message` for chat,
/// `response` for generate.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaChunk {
    pub model: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<OllamaMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// `/api/generate`'s reasoning of a thinking model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    pub done: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub stats: Option<OllamaStats>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaDetails {
    pub parent_model: String,
    pub format: &'static str,
    pub family: String,
    pub families: Vec<String>,
    pub parameter_size: String,
    pub quantization_level: String,
}

/// A model in `/api/tags` and `/api/ps`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaModel {
    pub name: String,
    pub model: String,
    pub modified_at: String,
    pub size: u64,
    pub digest: String,
    pub details: OllamaDetails,
    /// `/api/ps` only: when an idle model unloads (far ahead when it never does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_vram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaModels {
    pub models: Vec<OllamaModel>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaShow {
    pub modelfile: String,
    pub parameters: String,
    pub template: String,
    pub details: OllamaDetails,
    #[schema(value_type = Object)]
    pub model_info: Value,
    pub capabilities: Vec<&'static str>,
    pub modified_at: String,
}

/// `POST /api/embed`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OllamaEmbedRequest {
    pub model: String,
    /// A text or a list of texts.
    #[schema(value_type = Object)]
    pub input: crate::PromptField,
    /// Cut inputs longer than the model takes (default true, as in Ollama);
    /// `false` makes such an input a 400.
    pub truncate: Option<bool>,
    pub dimensions: Option<u32>,
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaEmbedAnswer {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    pub total_duration: u64,
    pub load_duration: u64,
    pub prompt_eval_count: u32,
}

/// `POST /api/embeddings` (Ollama's older route): one `prompt`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OllamaEmbeddingsRequest {
    pub model: String,
    pub prompt: String,
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OllamaEmbeddingAnswer {
    pub embedding: Vec<f32>,
}
