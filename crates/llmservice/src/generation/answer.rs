//! The one per-choice record: what a choice has said (content and tool calls),
//! its logprobs, why it ended and what it cost. Fresh generations, built-in
//! function rounds and cache replays all reach it as the same [`ChoiceEvent`]s,
//! and the JSON answer, the SSE stream and the cache entry are all read from
//! it, so streamed and non-streamed answers cannot differ.

use engine::chat::{ParsedOutput, StreamDelta, ToolCall};
use engine::{FinishReason, TokenLogprob, Usage};

/// What one choice tells its answer, in order: any number of pieces, then `Done`.
#[derive(Debug, Clone)]
pub enum ChoiceEvent {
    /// Content or a call piece, with the logprobs of the tokens generated
    /// since the previous event.
    Delta(StreamDelta, Vec<TokenLogprob>),
    /// Why the choice ended, and its usage.
    Done(FinishReason, Usage),
}

/// One choice's answer so far.
#[derive(Debug, Clone, Default)]
pub struct ChoiceRecord {
    pub output: ParsedOutput,
    pub logprobs: Vec<TokenLogprob>,
    /// `None` while the choice is still generating.
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

impl ChoiceRecord {
    /// Records a piece of the answer.
    pub fn record(&mut self, delta: &StreamDelta, logprobs: &[TokenLogprob]) {
        self.logprobs.extend_from_slice(logprobs);
        match delta {
            StreamDelta::Reasoning(text) => self.output.reasoning.push_str(text),
            StreamDelta::Content(text) => self.output.content.push_str(text),
            StreamDelta::ToolCallStart { id, name, .. } => self.output.tool_calls.push(ToolCall {
                id: id.clone(),
                name: name.clone(),
                arguments: String::new(),
            }),
            StreamDelta::ToolCallArguments { index, fragment } => {
                if let Some(call) = self.output.tool_calls.get_mut(*index) {
                    call.arguments.push_str(fragment);
                }
            }
        }
    }

    pub fn finish(&mut self, reason: FinishReason, usage: Usage) {
        self.finish = Some(reason);
        self.usage = usage;
    }

    /// The events that rebuild this record from nothing: its reasoning, its
    /// content (with every logprob), each call's head and arguments, then
    /// `Done`. What a cache replay streams.
    pub fn replay(&self) -> Vec<ChoiceEvent> {
        let mut events = Vec::new();
        if !self.output.reasoning.is_empty() {
            events.push(ChoiceEvent::Delta(
                StreamDelta::Reasoning(self.output.reasoning.clone()),
                Vec::new(),
            ));
        }
        if !self.output.content.is_empty() || !self.logprobs.is_empty() {
            events.push(ChoiceEvent::Delta(
                StreamDelta::Content(self.output.content.clone()),
                self.logprobs.clone(),
            ));
        }
        for (index, call) in self.output.tool_calls.iter().enumerate() {
            events.push(ChoiceEvent::Delta(
                StreamDelta::ToolCallStart {
                    index,
                    id: call.id.clone(),
                    name: call.name.clone(),
                },
                Vec::new(),
            ));
            events.push(ChoiceEvent::Delta(
                StreamDelta::ToolCallArguments {
                    index,
                    fragment: call.arguments.clone(),
                },
                Vec::new(),
            ));
        }
        events.push(ChoiceEvent::Done(
            self.finish.unwrap_or(FinishReason::Stop),
            self.usage,
        ));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str) -> StreamDelta {
        StreamDelta::Content(text.to_owned())
    }

    #[test]
    fn a_replay_rebuilds_the_same_record() {
        let lp = |t: &str| TokenLogprob {
            token: t.to_owned(),
            bytes: t.as_bytes().to_vec(),
            logprob: -0.5,
            top: Vec::new(),
        };
        let mut record = ChoiceRecord::default();
        record.record(&StreamDelta::Reasoning("Hmm.".into()), &[lp("Hmm.")]);
        record.record(&piece("Hel"), &[lp("Hel")]);
        record.record(&piece("lo"), &[lp("lo")]);
        let start = StreamDelta::ToolCallStart {
            index: 0,
            id: "call_1".into(),
            name: "f".into(),
        };
        record.record(&start, &[]);
        for fragment in ["{\"a\":", "1}"] {
            let args = StreamDelta::ToolCallArguments {
                index: 0,
                fragment: fragment.into(),
            };
            record.record(&args, &[lp(fragment)]);
        }
        record.finish(
            FinishReason::Stop,
            Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(record.output.reasoning, "Hmm.");
        assert_eq!(record.output.content, "Hello");
        assert_eq!(record.output.tool_calls[0].arguments, "{\"a\":1}");

        let mut rebuilt = ChoiceRecord::default();
        for event in record.replay() {
            match event {
                ChoiceEvent::Delta(delta, logprobs) => rebuilt.record(&delta, &logprobs),
                ChoiceEvent::Done(reason, usage) => rebuilt.finish(reason, usage),
            }
        }
        assert_eq!(rebuilt.output, record.output);
        assert_eq!(rebuilt.logprobs.len(), record.logprobs.len());
        assert_eq!(rebuilt.finish, record.finish);
        assert_eq!(rebuilt.usage.completion_tokens, 4);
    }
}
