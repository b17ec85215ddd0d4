//! Anthropic `message` answers and their named-event streams: content comes
//! as blocks (`thinking`, `text`, `tool_use`), each opened, filled by deltas and stopped,
//! then one `message_delta` with the stop reason and usage, and `message_stop`.

use axum::response::sse::Event as SseEvent;
use engine::chat::StreamDelta;
use serde_json::Value;

use super::{Answer, AnswerHead};
use crate::api::error::{anthropic_body, ApiError};
use crate::api::sse::wire_json;
use crate::error::RequestError;
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{
    BlockDelta, ContentBlock, Message, MessageDelta, MessagesEvent, MessagesUsage, StopReason,
};

pub struct MessagesAnswer {
    head: AnswerHead,
    records: [ChoiceRecord; 1],
    /// The prompt's tokens, known before the first event (for `message_start`).
    input_tokens: u32,
    /// The request's stop sequences, to name the one that ended the answer.
    stops: Vec<String>,
    /// Blocks opened so far on the stream; the last one may still be open.
    blocks: usize,
    open: Option<OpenBlock>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Thinking,
    Text,
    /// A call, by its index among the answer's calls.
    Call(usize),
}

impl MessagesAnswer {
    pub fn new(head: AnswerHead, input_tokens: u32, stops: Vec<String>) -> Self {
        Self {
            head,
            records: [ChoiceRecord::default()],
            input_tokens,
            stops,
            blocks: 0,
            open: None,
        }
    }

    fn record(&self) -> &ChoiceRecord {
        &self.records[0]
    }

    fn stop_reason(&self) -> (StopReason, Option<String>) {
        let record = self.record();
        match record.finish {
            Some(engine::FinishReason::Length) => (StopReason::MaxTokens, None),
            _ if !record.output.tool_calls.is_empty() => (StopReason::ToolUse, None),
            Some(engine::FinishReason::StopString(i)) => {
                (StopReason::StopSequence, self.stops.get(i).cloned())
            }
            _ => (StopReason::EndTurn, None),
        }
    }

    /// The usage of a finished answer (the engine's counts).
    fn message_usage(&self) -> MessagesUsage {
        let usage = self.record().usage;
        MessagesUsage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cache_read_input_tokens: usage.cached_tokens,
        }
    }

    fn message(&self, content: Vec<ContentBlock>, usage: MessagesUsage) -> Message {
        let (stop_reason, stop_sequence) = match self.record().finish {
            Some(_) => {
                let (reason, sequence) = self.stop_reason();
                (Some(reason), sequence)
            }
            None => (None, None),
        };
        Message {
            id: self.head.id.clone(),
            kind: "message",
            role: "assistant",
            model: self.head.model.clone(),
            content,
            stop_reason,
            stop_sequence,
            usage,
        }
    }

    /// Closes the open block, if any.
    fn close(&mut self, events: &mut Vec<MessagesEvent>) {
        if self.open.take().is_some() {
            events.push(MessagesEvent::ContentBlockStop {
                index: self.blocks - 1,
            });
        }
    }

    /// Opens `block` as the next one, closing the one before.
    fn open(&mut self, kind: OpenBlock, block: ContentBlock, events: &mut Vec<MessagesEvent>) {
        self.close(events);
        events.push(MessagesEvent::ContentBlockStart {
            index: self.blocks,
            content_block: block,
        });
        self.blocks += 1;
        self.open = Some(kind);
    }
}

impl Answer for MessagesAnswer {
    type Chunk = MessagesEvent;
    type Whole = Message;

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn opening(&mut self) -> Vec<MessagesEvent> {
        let usage = MessagesUsage {
            input_tokens: self.input_tokens,
            ..Default::default()
        };
        vec![MessagesEvent::MessageStart {
            message: self.message(Vec::new(), usage),
        }]
    }

    fn piece_chunks(&mut self, _index: u32, event: &ChoiceEvent) -> Vec<MessagesEvent> {
        let mut events = Vec::new();
        let ChoiceEvent::Delta(delta, _) = event else {
            return events;
        };
        match delta {
            StreamDelta::Reasoning(thinking) => {
                if self.open != Some(OpenBlock::Thinking) {
                    let block = ContentBlock::Thinking {
                        thinking: String::new(),
                        signature: String::new(),
                    };
                    self.open(OpenBlock::Thinking, block, &mut events);
                }
                events.push(MessagesEvent::ContentBlockDelta {
                    index: self.blocks - 1,
                    delta: BlockDelta::ThinkingDelta {
                        thinking: thinking.clone(),
                    },
                });
            }
            StreamDelta::Content(text) if text.is_empty() => {}
            StreamDelta::Content(text) => {
                if self.open != Some(OpenBlock::Text) {
                    let block = ContentBlock::Text {
                        text: String::new(),
                    };
                    self.open(OpenBlock::Text, block, &mut events);
                }
                events.push(MessagesEvent::ContentBlockDelta {
                    index: self.blocks - 1,
                    delta: BlockDelta::TextDelta { text: text.clone() },
                });
            }
            StreamDelta::ToolCallStart { index, id, name } => {
                let block = ContentBlock::ToolUse {
                    id: id.clone(),
                    name: name.clone(),
                    input: Value::Object(Default::default()),
                };
                self.open(OpenBlock::Call(*index), block, &mut events);
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                if self.open == Some(OpenBlock::Call(*index)) && !fragment.is_empty() {
                    events.push(MessagesEvent::ContentBlockDelta {
                        index: self.blocks - 1,
                        delta: BlockDelta::InputJsonDelta {
                            partial_json: fragment.clone(),
                        },
                    });
                }
            }
        }
        events
    }

    fn finish_chunks(&mut self, _index: u32) -> Vec<MessagesEvent> {
        let mut events = Vec::new();
        self.close(&mut events);
        let (stop_reason, stop_sequence) = self.stop_reason();
        events.push(MessagesEvent::MessageDelta {
            delta: MessageDelta {
                stop_reason: Some(stop_reason),
                stop_sequence,
            },
            usage: self.message_usage(),
        });
        events.push(MessagesEvent::MessageStop);
        events
    }

    fn cache_body(&self) -> serde_json::Value {
        super::ChatAnswer::cache_body_of(&self.records)
    }

    fn whole(&self) -> Message {
        let output = &self.record().output;
        let mut content = Vec::new();
        if !output.reasoning.is_empty() {
            content.push(ContentBlock::Thinking {
                thinking: output.reasoning.clone(),
                signature: String::new(),
            });
        }
        if !output.content.is_empty() {
            content.push(ContentBlock::Text {
                text: output.content.clone(),
            });
        }
        for call in &output.tool_calls {
            content.push(ContentBlock::ToolUse {
                id: call.id.clone(),
                name: call.name.clone(),
                input: serde_json::from_str(&call.arguments)
                    .unwrap_or(Value::Object(Default::default())),
            });
        }
        self.message(content, self.message_usage())
    }

    fn sse_event(chunk: &MessagesEvent) -> SseEvent {
        SseEvent::default()
            .event(chunk.name())
            .data(wire_json(chunk))
    }

    fn sse_error_event(error: RequestError) -> SseEvent {
        let body = anthropic_body(&ApiError::from(error));
        SseEvent::default().event("error").data(body.to_string())
    }

    fn sse_close() -> Option<SseEvent> {
        None
    }
}
