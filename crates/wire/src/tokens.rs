//! `POST /tokenize` and `POST /detokenize`: llama-server's (`content`) and
//! vLLM's (`prompt`, `messages`) field names.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenizeRequest {
    /// Optional: defaults to the first configured chat tier.
    pub model: Option<String>,
    pub content: Option<String>,
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template first.
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<Value>>,
    /// Extra chat template variables, as chat completions take them.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Add BOS (when the model uses one); llama-server's default is false, vLLM's true.
    pub add_special: Option<bool>,
    /// Also return each token's text.
    pub with_pieces: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}
