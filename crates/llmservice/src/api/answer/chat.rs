//! `chat.completion` answers and `chat.completion.chunk` streams.

use std::borrow::Cow;

use engine::chat::{ParsedOutput, StreamDelta};

use super::{Answer, AnswerHead};
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessage, FinishReason, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta,
};

pub struct ChatAnswer {
    head: AnswerHead,
    shape: ChatShape,
    records: Vec<ChoiceRecord>,
    /// Retrieved sources the answer was given (requests with `rag`).
    sources: Option<Vec<crate::wire::RagSource>>,
}

/// What the request asked of the answer's shape.
#[derive(Debug, Clone, Copy)]
pub struct ChatShape {
    /// Asked with `functions`: calls are `function_call` (the first one only).
    pub legacy: bool,
    /// Each token's logprobs go with the answer.
    pub logprobs: bool,
}

impl ChatAnswer {
    pub fn new(head: AnswerHead, n: usize, shape: ChatShape) -> Self {
        Self {
            head,
            shape,
            records: vec![ChoiceRecord::default(); n],
            sources: None,
        }
    }

    /// The answer with the sources retrieval gave the model.
    pub fn with_sources(mut self, sources: Option<Vec<crate::wire::RagSource>>) -> Self {
        self.sources = sources;
        self
    }

    /// A cached answer as a new answer to this request, with the events that
    /// replay it.
    pub fn replay(
        head: AnswerHead,
        cached: ChatCompletion,
        shape: ChatShape,
    ) -> (Self, Vec<(u32, ChoiceEvent)>) {
        let answer = Self::new(head, cached.choices.len(), shape);
        (answer, Self::events_of(cached))
    }

    /// The events that replay a cached answer, each with its choice's index.
    pub fn events_of(cached: ChatCompletion) -> Vec<(u32, ChoiceEvent)> {
        let mut events = Vec::new();
        for (index, choice) in cached.choices.into_iter().enumerate() {
            let calls = match (choice.message.tool_calls, choice.message.function_call) {
                (Some(calls), _) => calls,
                (None, Some(function)) => vec![ToolCall {
                    id: String::new(),
                    kind: Cow::Borrowed("function"),
                    function,
                }],
                (None, None) => Vec::new(),
            };
            let record = ChoiceRecord {
                output: ParsedOutput {
                    reasoning: choice.message.reasoning_content.unwrap_or_default(),
                    content: choice.message.content.unwrap_or_default(),
                    tool_calls: calls
                        .into_iter()
                        .map(|c| engine::chat::ToolCall {
                            id: c.id,
                            name: c.function.name,
                            arguments: c.function.arguments,
                        })
                        .collect(),
                },
                logprobs: choice.logprobs.map(|l| l.tokens()).unwrap_or_default(),
                finish: Some(match choice.finish_reason {
                    FinishReason::Length => engine::FinishReason::Length,
                    _ => engine::FinishReason::Stop,
                }),
                // The request's usage rides on the first choice.
                usage: if index == 0 {
                    usage_of(&cached.usage)
                } else {
                    engine::Usage::default()
                },
            };
            events.extend(record.replay().into_iter().map(|e| (index as u32, e)));
        }
        events
    }

    /// The chat completion that `records` make, as the response cache keeps
    /// it: what another API's answer stores, so that chat and the APIs
    /// translated onto it share entries.
    pub fn cache_body_of(records: &[ChoiceRecord]) -> serde_json::Value {
        let head = AnswerHead {
            id: String::new(),
            created: 0,
            model: String::new(),
            stream: false,
            include_usage: false,
        };
        let shape = ChatShape {
            legacy: false,
            logprobs: false,
        };
        let answer = Self {
            records: records.to_vec(),
            ..Self::new(head, 0, shape)
        };
        super::json_value(&answer.whole())
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.head.id.clone(),
            object: "chat.completion.chunk",
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            system_fingerprint: None,
            usage: self.head.include_usage.then_some(None),
            sources: None,
        }
    }

    fn choice_chunk(
        &self,
        index: u32,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> ChatCompletionChunk {
        self.chunk(vec![ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        }])
    }

    /// A parser piece as a chunk's delta; `None` for calls after the first in
    /// the legacy shape, which holds one call.
    fn delta(&self, delta: &StreamDelta) -> Option<ChatDelta> {
        let delta = match delta {
            StreamDelta::Reasoning(text) => ChatDelta {
                reasoning_content: Some(text.clone()),
                ..Default::default()
            },
            StreamDelta::Content(text) => ChatDelta {
                content: Some(text.clone()),
                ..Default::default()
            },
            StreamDelta::ToolCallStart { index, id, name } if !self.shape.legacy => ChatDelta {
                tool_calls: Some(vec![ToolCallDelta {
                    index: *index,
                    id: Some(id.clone()),
                    kind: Some("function"),
                    function: FunctionCallDelta {
                        name: Some(name.clone()),
                        arguments: String::new(),
                    },
                }]),
                ..Default::default()
            },
            StreamDelta::ToolCallArguments { index, fragment } if !self.shape.legacy => ChatDelta {
                tool_calls: Some(vec![ToolCallDelta {
                    index: *index,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: fragment.clone(),
                    },
                }]),
                ..Default::default()
            },
            StreamDelta::ToolCallStart { index: 0, name, .. } => ChatDelta {
                function_call: Some(FunctionCallDelta {
                    name: Some(name.clone()),
                    arguments: String::new(),
                }),
                ..Default::default()
            },
            StreamDelta::ToolCallArguments { index: 0, fragment } => ChatDelta {
                function_call: Some(FunctionCallDelta {
                    name: None,
                    arguments: fragment.clone(),
                }),
                ..Default::default()
            },
            _ => return None,
        };
        Some(delta)
    }

    fn finish_reason(&self, record: &ChoiceRecord) -> FinishReason {
        // A cut-off answer says so even when calls were read before the cut:
        // the text after them may be a call that never closed.
        match (record.finish, record.output.tool_calls.is_empty()) {
            (Some(engine::FinishReason::Length), _) => FinishReason::Length,
            (_, true) => FinishReason::Stop,
            (_, false) if self.shape.legacy => FinishReason::FunctionCall,
            (_, false) => FinishReason::ToolCalls,
        }
    }

    /// The assistant message: calls as `tool_calls`, or as the legacy
    /// `function_call` (the first call) for `functions` requests.
    fn message(&self, output: &ParsedOutput) -> ChatMessage {
        let calls = &output.tool_calls;
        let content = if !calls.is_empty() && output.content.trim().is_empty() {
            None
        } else {
            Some(output.content.clone())
        };
        let (tool_calls, function_call) = match calls.first() {
            None => (None, None),
            Some(first) if self.shape.legacy => (
                None,
                Some(FunctionCall {
                    name: first.name.clone(),
                    arguments: first.arguments.clone(),
                }),
            ),
            Some(_) => (Some(calls.iter().map(ToolCall::from).collect()), None),
        };
        ChatMessage {
            role: Cow::Borrowed("assistant"),
            reasoning_content: Some(output.reasoning.clone()).filter(|r| !r.is_empty()),
            content,
            tool_calls,
            function_call,
        }
    }
}

impl Answer for ChatAnswer {
    type Chunk = ChatCompletionChunk;
    type Whole = ChatCompletion;

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn choices_per_prompt(&self) -> usize {
        self.records.len()
    }

    fn opening(&mut self) -> Vec<ChatCompletionChunk> {
        (0..self.records.len() as u32)
            .map(|index| {
                let role = ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Default::default()
                };
                self.choice_chunk(index, role, None, None)
            })
            .enumerate()
            .map(|(i, mut chunk)| {
                if i == 0 {
                    chunk.sources = self.sources.clone();
                }
                chunk
            })
            .collect()
    }

    fn piece_chunks(&mut self, index: u32, event: &ChoiceEvent) -> Vec<ChatCompletionChunk> {
        let ChoiceEvent::Delta(delta, logprobs) = event else {
            return Vec::new();
        };
        let Some(delta) = self.delta(delta) else {
            return Vec::new();
        };
        let logprobs = self.shape.logprobs.then(|| ChatLogprobs::of(logprobs));
        vec![self.choice_chunk(index, delta, logprobs, None)]
    }

    fn finish_chunks(&mut self, index: u32) -> Vec<ChatCompletionChunk> {
        let finish = self.finish_reason(&self.records[index as usize]);
        vec![self.choice_chunk(index, ChatDelta::default(), None, Some(finish))]
    }

    fn usage_chunk(&self) -> Option<ChatCompletionChunk> {
        let mut chunk = self.chunk(Vec::new());
        chunk.usage = Some(Some(self.usage().into()));
        Some(chunk)
    }

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn whole(&self) -> ChatCompletion {
        let choices = self
            .records
            .iter()
            .enumerate()
            .map(|(index, record)| ChatChoice {
                index: index as u32,
                message: self.message(&record.output),
                logprobs: self
                    .shape
                    .logprobs
                    .then(|| ChatLogprobs::of(&record.logprobs)),
                finish_reason: self.finish_reason(record),
            })
            .collect();
        ChatCompletion {
            id: self.head.id.clone(),
            object: Cow::Borrowed("chat.completion"),
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage: self.usage().into(),
            system_fingerprint: None,
            sources: self.sources.clone(),
        }
    }
}

/// Wire usage back to the engine's counts.
pub(super) fn usage_of(usage: &crate::wire::Usage) -> engine::Usage {
    engine::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.prompt_tokens_details.cached_tokens,
        draft_tokens: usage.completion_tokens_details.as_ref().map_or(0, |d| {
            d.accepted_prediction_tokens + d.rejected_prediction_tokens
        }),
        accepted_draft_tokens: usage
            .completion_tokens_details
            .as_ref()
            .map_or(0, |d| d.accepted_prediction_tokens),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::api::answer::Answer;

    fn head() -> AnswerHead {
        AnswerHead {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            stream: true,
            include_usage: true,
        }
    }

    fn logprob(token: &str) -> engine::TokenLogprob {
        engine::TokenLogprob {
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob: -1.0,
            top: vec![(token.into(), token.as_bytes().to_vec(), -1.0)],
        }
    }

    /// Two choices, interleaved: one answers in text, one calls a tool.
    fn events() -> Vec<(u32, ChoiceEvent)> {
        let usage = |completion_tokens| engine::Usage {
            prompt_tokens: 5,
            completion_tokens,
            cached_tokens: 2,
            ..Default::default()
        };
        vec![
            (
                0,
                ChoiceEvent::Delta(StreamDelta::Content("Hel".into()), vec![logprob("Hel")]),
            ),
            (
                1,
                ChoiceEvent::Delta(
                    StreamDelta::ToolCallStart {
                        index: 0,
                        id: "call_a".into(),
                        name: "f".into(),
                    },
                    vec![logprob("<")],
                ),
            ),
            (
                0,
                ChoiceEvent::Delta(StreamDelta::Content("lo".into()), vec![logprob("lo")]),
            ),
            (
                1,
                ChoiceEvent::Delta(
                    StreamDelta::ToolCallArguments {
                        index: 0,
                        fragment: "{\"x\":1}".into(),
                    },
                    vec![logprob("{")],
                ),
            ),
            (0, ChoiceEvent::Done(engine::FinishReason::Stop, usage(2))),
            (1, ChoiceEvent::Done(engine::FinishReason::Stop, usage(3))),
        ]
    }

    fn shape() -> ChatShape {
        ChatShape {
            legacy: false,
            logprobs: true,
        }
    }

    /// What a client reading the stream assembles for each choice.
    fn read_stream(chunks: &[ChatCompletionChunk]) -> Vec<(String, String, usize, Option<Value>)> {
        let mut out = vec![(String::new(), String::new(), 0, None); 2];
        for chunk in chunks {
            for c in &chunk.choices {
                let o = &mut out[c.index as usize];
                o.0 += c.delta.content.as_deref().unwrap_or_default();
                for call in c.delta.tool_calls.iter().flatten() {
                    o.1 += &call.function.arguments;
                }
                o.2 += c.logprobs.as_ref().map_or(0, |l| l.content.len());
                if let Some(f) = c.finish_reason {
                    o.3 = Some(serde_json::to_value(f).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn the_stream_and_the_whole_answer_say_the_same() {
        let mut answer = ChatAnswer::new(head(), 2, shape());
        let mut chunks = answer.opening();
        for (index, event) in events() {
            chunks.extend(answer.apply(index, event));
        }
        assert!(answer.is_done());
        let whole = answer.whole();
        let read = read_stream(&chunks);
        for (i, choice) in whole.choices.iter().enumerate() {
            assert_eq!(
                read[i].0,
                choice.message.content.clone().unwrap_or_default()
            );
            let arguments: String = choice
                .message
                .tool_calls
                .iter()
                .flatten()
                .map(|c| c.function.arguments.clone())
                .collect();
            assert_eq!(read[i].1, arguments);
            assert_eq!(read[i].2, choice.logprobs.as_ref().unwrap().content.len());
            assert_eq!(
                read[i].3,
                Some(serde_json::to_value(choice.finish_reason).unwrap())
            );
        }
        assert_eq!(whole.choices[1].finish_reason, FinishReason::ToolCalls);
        assert_eq!(whole.choices[1].message.content, None);
        // Usage: the prompt once, every choice's completion.
        assert_eq!(whole.usage.prompt_tokens, 5);
        assert_eq!(whole.usage.completion_tokens, 5);
        let last = chunks.last().unwrap();
        assert!(last.choices.is_empty());
        assert_eq!(
            last.usage.as_ref().unwrap().as_ref().unwrap().total_tokens,
            10
        );
    }

    #[test]
    fn a_replayed_answer_is_the_stored_one() {
        let mut answer = ChatAnswer::new(head(), 2, shape());
        for (index, event) in events() {
            answer.apply(index, event);
        }
        let stored = serde_json::to_value(answer.whole()).unwrap();
        let cached: ChatCompletion = serde_json::from_value(stored.clone()).unwrap();
        let (mut replayed, events) = ChatAnswer::replay(head(), cached, shape());
        let mut chunks = replayed.opening();
        for (index, event) in events {
            chunks.extend(replayed.apply(index, event));
        }
        assert_eq!(serde_json::to_value(replayed.whole()).unwrap(), stored);
        assert_eq!(read_stream(&chunks)[0].0, "Hello");
        assert_eq!(read_stream(&chunks)[1].1, "{\"x\":1}");
    }

    #[test]
    fn the_legacy_shape_holds_the_first_call_only() {
        let legacy = ChatShape {
            legacy: true,
            logprobs: false,
        };
        let mut answer = ChatAnswer::new(head(), 1, legacy);
        let mut chunks = Vec::new();
        for index in 0..2 {
            let start = StreamDelta::ToolCallStart {
                index,
                id: format!("c{index}"),
                name: format!("f{index}"),
            };
            chunks.extend(answer.apply(0, ChoiceEvent::Delta(start, Vec::new())));
        }
        chunks.extend(answer.apply(
            0,
            ChoiceEvent::Done(engine::FinishReason::Stop, engine::Usage::default()),
        ));
        let whole = answer.whole();
        assert_eq!(whole.choices[0].finish_reason, FinishReason::FunctionCall);
        assert_eq!(
            whole.choices[0]
                .message
                .function_call
                .as_ref()
                .unwrap()
                .name,
            "f0"
        );
        assert!(whole.choices[0].message.tool_calls.is_none());
        let calls = chunks
            .iter()
            .filter(|c| c.choices.iter().any(|c| c.delta.function_call.is_some()))
            .count();
        assert_eq!(calls, 1);
    }
}
