//! `/v1/rag/chat` answers: `{answer, sources, model, usage}`, or a stream of
//! the sources, the answer's text pieces, and the finish with usage.

use engine::chat::StreamDelta;

use super::{Answer, AnswerHead};
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{RagChatAnswer, RagChatEvent, RagSource};

pub struct RagAnswer {
    head: AnswerHead,
    records: [ChoiceRecord; 1],
    sources: Vec<RagSource>,
}

impl RagAnswer {
    pub fn new(head: AnswerHead, sources: Vec<RagSource>) -> Self {
        Self {
            head,
            records: [ChoiceRecord::default()],
            sources,
        }
    }

    fn finish_reason(&self) -> String {
        match self.records[0].finish {
            Some(engine::FinishReason::Length) => "length",
            _ => "stop",
        }
        .to_owned()
    }

    fn usage_json(&self) -> serde_json::Value {
        let usage = self.usage();
        serde_json::to_value(crate::wire::Usage::from(usage)).unwrap_or_default()
    }
}

impl Answer for RagAnswer {
    type Chunk = RagChatEvent;
    type Whole = RagChatAnswer;

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn opening(&mut self) -> Vec<RagChatEvent> {
        vec![RagChatEvent::Sources {
            sources: self.sources.clone(),
            model: self.head.model.clone(),
        }]
    }

    fn piece_chunks(&mut self, _index: u32, event: &ChoiceEvent) -> Vec<RagChatEvent> {
        match event {
            ChoiceEvent::Delta(StreamDelta::Content(text), _) if !text.is_empty() => {
                vec![RagChatEvent::Delta {
                    delta: text.clone(),
                }]
            }
            _ => Vec::new(),
        }
    }

    fn finish_chunks(&mut self, _index: u32) -> Vec<RagChatEvent> {
        vec![RagChatEvent::Done {
            finish_reason: self.finish_reason(),
            usage: self.usage_json(),
        }]
    }

    fn cache_body(&self) -> serde_json::Value {
        super::ChatAnswer::cache_body_of(&self.records)
    }

    fn whole(&self) -> RagChatAnswer {
        RagChatAnswer {
            answer: self.records[0].output.content.clone(),
            sources: self.sources.clone(),
            model: self.head.model.clone(),
            finish_reason: self.finish_reason(),
            usage: self.usage_json(),
        }
    }
}
