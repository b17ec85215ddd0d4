//! Shapes every endpoint family shares: sampling fields, prompts, usage, errors.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by chat and legacy completions.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    /// llama-server's `n_predict` (Ollama's `num_predict`): at most this
    /// many tokens where `max_tokens` is not given, cut to what the context
    /// holds rather than refused; negative: until the context is full.
    pub n_predict: Option<i64>,
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// llama-server's and Ollama's: how many of the latest tokens the
    /// repetition penalties look back over (64 unless set; 0 disables them;
    /// -1 means the whole context).
    pub repeat_last_n: Option<i32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub n: Option<u32>,
    /// `true` (chat) or a number of alternatives (legacy completions).
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// llama-server's extension: generate through end-of-generation tokens.
    pub ignore_eos: Option<bool>,
    /// Extension: `false` opts this request out of the model's speculative
    /// decoding (`{TIER}_SPECULATIVE`), which never changes the tokens generated
    /// and applies only at temperature 0.
    pub speculative: Option<bool>,
    /// OpenAI's predicted outputs: text the answer is expected to repeat
    /// (a file being edited). Greedy requests guess from it.
    pub prediction: Option<Prediction>,
}

/// `prediction`: `{"type": "content", "content": "..."}`, the content a string
/// or a list of text parts.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Prediction {
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub content: Value,
}

impl Prediction {
    /// The predicted text, or what is wrong with the field.
    pub fn text(&self) -> Result<String, &'static str> {
        if self.kind != "content" {
            return Err("prediction.type must be \"content\"");
        }
        let shape = "prediction.content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts";
        match &self.content {
            Value::String(text) => Ok(text.clone()),
            Value::Array(parts) => parts
                .iter()
                .map(|part| match (part.get("type"), part.get("text")) {
                    (Some(Value::String(kind)), Some(Value::String(text))) if kind == "text" => {
                        Ok(text.as_str())
                    }
                    _ => Err(shape),
                })
                .collect::<Result<String, _>>(),
            _ => Err(shape),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Legacy `prompt`: text, texts, tokens, or lists of tokens.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
    /// Present when the answer was decoded with speculation: OpenAI's fields
    /// for predicted outputs, counting the guessed tokens that were kept and
    /// those that were checked and thrown away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionTokensDetails {
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
}

impl CompletionTokensDetails {
    /// The details of `u`, or `None` when nothing was guessed.
    pub fn of(u: &engine::Usage) -> Option<Self> {
        (u.draft_tokens > 0).then(|| Self {
            accepted_prediction_tokens: u.accepted_draft_tokens,
            rejected_prediction_tokens: u.draft_tokens - u.accepted_draft_tokens,
        })
    }
}

impl From<engine::Usage> for Usage {
    fn from(u: engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            completion_tokens_details: CompletionTokensDetails::of(&u),
        }
    }
}

/// One event of a `text/event-stream` answer, as the OpenAPI document
/// describes each item of the stream: its `data` is the JSON payload (or
/// OpenAI's closing `[DONE]`), `event` the name where an API names them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SseEvent {
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// e.g. `invalid_request_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// e.g. `model_not_found`, `context_length_exceeded`, `queue_full`.
    pub code: Option<String>,
}
