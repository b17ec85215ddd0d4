//! `text_completion` answers and streams (the legacy completions API).

use std::borrow::Cow;

use engine::chat::{ParsedOutput, StreamDelta};

use super::chat::usage_of;
use super::{Answer, AnswerHead};
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{Completion, CompletionChoice, CompletionLogprobs, FinishReason};

pub struct TextAnswer {
    head: AnswerHead,
    with_logprobs: bool,
    /// The prompt text each choice repeats first (`echo`), or empty.
    echoes: Vec<String>,
    choices_per_prompt: usize,
    records: Vec<ChoiceRecord>,
}

impl TextAnswer {
    /// Choices are prompt-major: prompt p, choice c has index p * n + c, and
    /// `echoes` holds one entry per choice.
    pub fn new(head: AnswerHead, echoes: Vec<String>, n: usize, with_logprobs: bool) -> Self {
        Self {
            head,
            with_logprobs,
            records: vec![ChoiceRecord::default(); echoes.len()],
            echoes,
            choices_per_prompt: n,
        }
    }

    /// A cached answer as a new answer to this request, with the events that
    /// replay it. The text before the first generated token is the echo.
    pub fn replay(
        head: AnswerHead,
        cached: Completion,
        with_logprobs: bool,
    ) -> (Self, Vec<(u32, ChoiceEvent)>) {
        let usage = cached.usage.flatten().map(|u| usage_of(&u));
        let mut echoes = Vec::new();
        let mut events = Vec::new();
        for (index, choice) in cached.choices.into_iter().enumerate() {
            let split = choice
                .logprobs
                .as_ref()
                .and_then(|l| l.text_offset.first().copied())
                .filter(|&at| choice.text.is_char_boundary(at))
                .unwrap_or(0);
            let logprobs = choice.logprobs.map(|l| l.tokens()).unwrap_or_default();
            echoes.push(choice.text[..split].to_owned());
            let record = ChoiceRecord {
                output: ParsedOutput {
                    reasoning: String::new(),
                    content: choice.text[split..].to_owned(),
                    tool_calls: Vec::new(),
                },
                logprobs,
                finish: Some(match choice.finish_reason {
                    Some(FinishReason::Length) => engine::FinishReason::Length,
                    _ => engine::FinishReason::Stop,
                }),
                usage: match (index, usage) {
                    (0, Some(usage)) => usage,
                    _ => engine::Usage::default(),
                },
            };
            events.extend(record.replay().into_iter().map(|e| (index as u32, e)));
        }
        // The whole usage rides on the first choice.
        (Self::new(head, echoes, 1, with_logprobs), events)
    }

    fn chunk(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: self.head.id.clone(),
            object: Cow::Borrowed("text_completion"),
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage: self.head.include_usage.then_some(None),
            system_fingerprint: None,
        }
    }

    fn finish_reason(record: &ChoiceRecord) -> Option<FinishReason> {
        record.finish.map(FinishReason::from)
    }
}

impl Answer for TextAnswer {
    type Chunk = Completion;
    type Whole = Completion;

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn choices_per_prompt(&self) -> usize {
        self.choices_per_prompt
    }

    fn opening(&mut self) -> Vec<Completion> {
        self.echoes
            .iter()
            .enumerate()
            .filter(|(_, echo)| !echo.is_empty())
            .map(|(index, echo)| {
                self.chunk(vec![CompletionChoice {
                    text: echo.clone(),
                    index: index as u32,
                    logprobs: None,
                    finish_reason: None,
                }])
            })
            .collect()
    }

    fn piece_chunks(&mut self, index: u32, event: &ChoiceEvent) -> Vec<Completion> {
        let ChoiceEvent::Delta(StreamDelta::Content(text), logprobs) = event else {
            return Vec::new();
        };
        let i = index as usize;
        // The record already holds this piece: it starts where the text did before it.
        let offset = self.echoes[i].len() + self.records[i].output.content.len() - text.len();
        let logprobs = self
            .with_logprobs
            .then(|| CompletionLogprobs::of(logprobs, offset));
        vec![self.chunk(vec![CompletionChoice {
            text: text.clone(),
            index,
            logprobs,
            finish_reason: None,
        }])]
    }

    fn finish_chunks(&mut self, index: u32) -> Vec<Completion> {
        vec![self.chunk(vec![CompletionChoice {
            text: String::new(),
            index,
            logprobs: None,
            finish_reason: Self::finish_reason(&self.records[index as usize]),
        }])]
    }

    fn usage_chunk(&self) -> Option<Completion> {
        let mut chunk = self.chunk(Vec::new());
        chunk.usage = Some(Some(self.usage().into()));
        Some(chunk)
    }

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn whole(&self) -> Completion {
        let choices = self
            .records
            .iter()
            .zip(&self.echoes)
            .enumerate()
            .map(|(index, (record, echo))| CompletionChoice {
                text: format!("{echo}{}", record.output.content),
                index: index as u32,
                logprobs: self
                    .with_logprobs
                    .then(|| CompletionLogprobs::of(&record.logprobs, echo.len())),
                finish_reason: Self::finish_reason(record),
            })
            .collect();
        Completion {
            id: self.head.id.clone(),
            object: Cow::Borrowed("text_completion"),
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage: Some(Some(self.usage().into())),
            system_fingerprint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::answer::Answer;

    fn head() -> AnswerHead {
        AnswerHead {
            id: "cmpl-1".into(),
            created: 1,
            model: "m".into(),
            stream: true,
            include_usage: false,
        }
    }

    fn piece(text: &str) -> ChoiceEvent {
        let logprob = engine::TokenLogprob {
            token: text.into(),
            bytes: text.as_bytes().to_vec(),
            logprob: -0.5,
            top: vec![(text.into(), text.as_bytes().to_vec(), -0.5)],
        };
        ChoiceEvent::Delta(StreamDelta::Content(text.into()), vec![logprob])
    }

    #[test]
    fn echo_and_offsets_agree_between_stream_whole_and_replay() {
        let mut answer = TextAnswer::new(head(), vec!["The sky".into()], 1, true);
        let mut chunks = answer.opening();
        for event in [piece(" is"), piece(" blue")] {
            chunks.extend(answer.apply(0, event));
        }
        chunks.extend(answer.apply(
            0,
            ChoiceEvent::Done(engine::FinishReason::Length, engine::Usage::default()),
        ));
        let whole = answer.whole();
        let streamed: String = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .map(|c| c.text.as_str())
            .collect();
        assert_eq!(streamed, "The sky is blue");
        assert_eq!(whole.choices[0].text, streamed);
        let offsets: Vec<usize> = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter_map(|c| c.logprobs.as_ref())
            .flat_map(|l| l.text_offset.clone())
            .collect();
        assert_eq!(offsets, [7, 10]);
        assert_eq!(
            whole.choices[0].logprobs.as_ref().unwrap().text_offset,
            offsets
        );
        assert_eq!(whole.choices[0].finish_reason, Some(FinishReason::Length));

        let stored = serde_json::to_value(&whole).unwrap();
        let (mut replayed, events) = TextAnswer::replay(
            head(),
            serde_json::from_value(stored.clone()).unwrap(),
            true,
        );
        let mut chunks = replayed.opening();
        for (index, event) in events {
            chunks.extend(replayed.apply(index, event));
        }
        assert_eq!(serde_json::to_value(replayed.whole()).unwrap(), stored);
        let streamed: String = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .map(|c| c.text.as_str())
            .collect();
        assert_eq!(streamed, "The sky is blue");
    }
}
