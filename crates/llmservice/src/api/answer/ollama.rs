//! Ollama answers: `/api/chat` (a `message`) and `/api/generate` (a
//! `response`), streamed as NDJSON lines, the last one `done` with the
//! counts and durations Ollama reports.

use std::time::Instant;

use engine::chat::StreamDelta;
use serde_json::Value;

use super::{Answer, AnswerHead};
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{OllamaChunk, OllamaFunction, OllamaMessage, OllamaStats, OllamaToolCall};

pub struct OllamaAnswer {
    head: AnswerHead,
    records: [ChoiceRecord; 1],
    /// `/api/chat` answers with a `message`, `/api/generate` with a `response`.
    chat: bool,
    started: Instant,
    first_token: Option<Instant>,
}

impl OllamaAnswer {
    pub fn new(head: AnswerHead, chat: bool, started: Instant) -> Self {
        Self {
            head,
            records: [ChoiceRecord::default()],
            chat,
            started,
            first_token: None,
        }
    }

    /// A line with `thinking`, `text` and `calls`, and the stats when it is
    /// the last.
    fn line(
        &self,
        thinking: String,
        text: String,
        calls: Vec<OllamaToolCall>,
        stats: Option<OllamaStats>,
    ) -> OllamaChunk {
        let (message, response, thinking) = if self.chat {
            let message = OllamaMessage {
                role: "assistant",
                content: text,
                thinking,
                tool_calls: calls,
            };
            (Some(message), None, None)
        } else {
            (None, Some(text), Some(thinking).filter(|t| !t.is_empty()))
        };
        OllamaChunk {
            model: self.head.model.clone(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            message,
            response,
            thinking,
            done: stats.is_some(),
            stats,
        }
    }

    fn stats(&self) -> OllamaStats {
        let record = &self.records[0];
        let nanos = |d: std::time::Duration| d.as_nanos() as u64;
        let first = self.first_token.unwrap_or_else(Instant::now);
        OllamaStats {
            done_reason: match record.finish {
                Some(engine::FinishReason::Length) => "length",
                _ => "stop",
            },
            total_duration: nanos(self.started.elapsed()),
            load_duration: 0,
            prompt_eval_count: record.usage.prompt_tokens,
            prompt_eval_duration: nanos(first.saturating_duration_since(self.started)),
            eval_count: record.usage.completion_tokens,
            eval_duration: nanos(first.elapsed()),
        }
    }
}

fn ollama_call(call: &engine::chat::ToolCall) -> OllamaToolCall {
    OllamaToolCall {
        function: OllamaFunction {
            name: call.name.clone(),
            arguments: serde_json::from_str(&call.arguments)
                .unwrap_or(Value::Object(Default::default())),
        },
    }
}

impl Answer for OllamaAnswer {
    type Chunk = OllamaChunk;
    type Whole = OllamaChunk;

    const NDJSON: bool = true;

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn opening(&mut self) -> Vec<OllamaChunk> {
        Vec::new()
    }

    fn piece_chunks(&mut self, _index: u32, event: &ChoiceEvent) -> Vec<OllamaChunk> {
        self.first_token.get_or_insert_with(Instant::now);
        let ChoiceEvent::Delta(delta, _) = event else {
            return Vec::new();
        };
        match delta {
            StreamDelta::Reasoning(thinking) => {
                vec![self.line(thinking.clone(), String::new(), Vec::new(), None)]
            }
            StreamDelta::Content(text) if !text.is_empty() => {
                vec![self.line(String::new(), text.clone(), Vec::new(), None)]
            }
            // A call goes out whole: the parser sends its arguments at once,
            // when its JSON is complete.
            StreamDelta::ToolCallArguments { index, .. } if self.chat => {
                let call = self.records[0].output.tool_calls.get(*index);
                call.map(|c| {
                    let calls = vec![ollama_call(c)];
                    vec![self.line(String::new(), String::new(), calls, None)]
                })
                .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn finish_chunks(&mut self, _index: u32) -> Vec<OllamaChunk> {
        let stats = Some(self.stats());
        vec![self.line(String::new(), String::new(), Vec::new(), stats)]
    }

    fn cache_body(&self) -> serde_json::Value {
        super::ChatAnswer::cache_body_of(&self.records)
    }

    fn whole(&self) -> OllamaChunk {
        let output = &self.records[0].output;
        let calls = output.tool_calls.iter().map(ollama_call).collect();
        let (thinking, content) = (output.reasoning.clone(), output.content.clone());
        self.line(thinking, content, calls, Some(self.stats()))
    }
}
