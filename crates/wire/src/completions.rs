//! `POST /v1/completions`: the legacy prompt-completion API. Answers also
//! deserialize: the response cache replays them from storage.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::common::{PromptField, SamplingFields, Usage};
use super::FinishReason;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// `json_object` or `json_schema` constrain the text as in chat (llama-server
    /// accepts the same here).
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// llama.cpp GBNF grammar the text must follow (root rule `root`).
    pub grammar: Option<String>,
    pub best_of: Option<u32>,
    /// Fields this server does not read: ignored here, passed on to an
    /// upstream tier.
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

/// OpenAI's legacy logprobs: parallel arrays, offsets into the choice's text.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// One `{token: logprob}` object per token.
    #[schema(value_type = Vec<Object>)]
    pub top_logprobs: Vec<Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: Cow<'static, str>,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: Option<String>,
}

impl CompletionLogprobs {
    /// Logprobs of tokens whose text starts at `start_offset` of the choice's text.
    pub fn of(logprobs: &[engine::TokenLogprob], start_offset: usize) -> Self {
        let mut offset = start_offset;
        let mut text_offset = Vec::with_capacity(logprobs.len());
        for l in logprobs {
            text_offset.push(offset);
            offset += l.token.len();
        }
        Self {
            tokens: logprobs.iter().map(|l| l.token.clone()).collect(),
            token_logprobs: logprobs.iter().map(|l| l.logprob).collect(),
            top_logprobs: logprobs
                .iter()
                .map(|l| {
                    l.top
                        .iter()
                        .map(|(t, _, p)| (t.clone(), Value::from(*p)))
                        .collect()
                })
                .collect(),
            text_offset,
        }
    }

    /// The engine's logprobs back (a cached answer replayed; the legacy shape
    /// keeps no bytes, so each token's are its text's).
    pub fn tokens(&self) -> Vec<engine::TokenLogprob> {
        let top = |i: usize| -> Vec<(String, Vec<u8>, f32)> {
            self.top_logprobs.get(i).map_or_else(Vec::new, |m| {
                m.iter()
                    .map(|(t, p)| {
                        let p = p.as_f64().unwrap_or(f64::NEG_INFINITY) as f32;
                        (t.clone(), t.as_bytes().to_vec(), p)
                    })
                    .collect()
            })
        };
        self.tokens
            .iter()
            .zip(&self.token_logprobs)
            .enumerate()
            .map(|(i, (token, logprob))| engine::TokenLogprob {
                token: token.clone(),
                bytes: token.as_bytes().to_vec(),
                logprob: *logprob,
                top: top(i),
            })
            .collect()
    }
}
