//! `POST /v1/chat/completions`: the request, the answer, and the stream's chunks.
//! Answers also deserialize: the response cache replays them from storage.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::common::{SamplingFields, Usage};
use super::FinishReason;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Legacy function calling: `functions` and `function_call` map onto tools.
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub function_call: Option<Value>,
    /// llama.cpp GBNF grammar the output must follow (root rule `root`).
    pub grammar: Option<String>,
    /// Run calls of the server's built-in functions (`GET /v1/functions`) and
    /// continue the conversation until the model answers.
    pub execute_builtin_functions: Option<bool>,
    /// Extra variables for the chat template (e.g. `enable_thinking`), as llama-server accepts.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Answer from a document collection: retrieve for the last user message
    /// and give the model the numbered sources (`/v1/rag/chat` for any OpenAI
    /// client); the answer carries them in `sources`.
    pub rag: Option<super::RagOptions>,
    /// Where a thinking model's reasoning (its `<think>` block) goes, as
    /// llama-server takes it: `auto` (the default) or `deepseek` put it in
    /// `reasoning_content`, apart from the answer; `none` leaves it in
    /// `content`, tags and all.
    pub reasoning_format: Option<String>,
    /// Fields this server does not read: ignored here, passed on to an
    /// upstream tier (vLLM's `guided_json`, `top_a`, ...).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// A call in an answer: `{id, type: "function", function: {name, arguments}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    pub function: FunctionCall,
}

/// A function's name and its arguments as JSON text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A piece of a streamed call: the first carries `id`, `type` and the name,
/// later ones only `index` and more of the arguments.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

/// The function part of a streamed call (also the legacy `delta.function_call`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: Cow<'static, str>,
    /// `null` when the message is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    /// A thinking model's reasoning, apart from its answer (llama-server's
    /// and vLLM's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Legacy `functions` requests get their call here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
}

/// OpenAI's chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: Cow<'static, str>,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: Option<String>,
    /// The retrieved sources the answer was given (requests with `rag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<super::RagSource>>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCallDelta>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    pub system_fingerprint: Option<String>,
    /// Present (as `null` until the last chunk) only when the client asked for usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    /// On the first chunk of an answer to a request with `rag`: its sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<super::RagSource>>,
}

impl From<&engine::chat::ToolCall> for ToolCall {
    fn from(call: &engine::chat::ToolCall) -> Self {
        Self {
            id: call.id.clone(),
            kind: Cow::Borrowed("function"),
            function: FunctionCall {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        }
    }
}

impl ChatLogprobs {
    pub fn of(logprobs: &[engine::TokenLogprob]) -> Self {
        let content = logprobs
            .iter()
            .map(|l| ChatTokenLogprob {
                token: l.token.clone(),
                logprob: l.logprob,
                bytes: l.bytes.clone(),
                top_logprobs: l
                    .top
                    .iter()
                    .map(|(token, bytes, logprob)| TopLogprob {
                        token: token.clone(),
                        logprob: *logprob,
                        bytes: bytes.clone(),
                    })
                    .collect(),
            })
            .collect();
        Self {
            content,
            refusal: None,
        }
    }

    /// The engine's logprobs back (a cached answer replayed).
    pub fn tokens(&self) -> Vec<engine::TokenLogprob> {
        self.content
            .iter()
            .map(|l| engine::TokenLogprob {
                token: l.token.clone(),
                bytes: l.bytes.clone(),
                logprob: l.logprob,
                top: l
                    .top_logprobs
                    .iter()
                    .map(|t| (t.token.clone(), t.bytes.clone(), t.logprob))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::ChatCompletionRequest;

    /// What an upstream tier is sent: the client's fields, ours and those we
    /// do not know alike (sampling fields stay in `sampling`).
    #[test]
    fn fields_we_do_not_read_are_kept_for_an_upstream() {
        let sent = json!({"model": "m", "messages": [], "temperature": 0.5,
                          "grammar": "root ::= \"a\"", "guided_json": {"type": "object"}, "top_a": 0.1});
        let req: ChatCompletionRequest = serde_json::from_value(sent).unwrap();
        assert_eq!(req.sampling.temperature, Some(0.5));
        assert_eq!(
            req.extra.keys().collect::<Vec<_>>(),
            ["guided_json", "top_a"]
        );
        let forwarded = serde_json::to_value(&req).unwrap();
        assert_eq!(forwarded["guided_json"], json!({"type": "object"}));
        assert_eq!(forwarded["grammar"], "root ::= \"a\"");
        assert_eq!(forwarded["temperature"], 0.5);
    }
}
