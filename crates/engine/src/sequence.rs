//! Per-request state inside the scheduler: which tokens are in the KV cache,
//! the sampler, the text assembly and the channel back to the caller.

use std::time::Instant;

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::detok::{StopMatcher, StopOutcome, Utf8Assembler};
use crate::{Event, FinishReason, TokenLogprob, Usage};

/// Choices of one request (`n` > 1) share the prompt: the leader computes it,
/// the followers copy its KV cache instead of recomputing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Group {
    pub id: u64,
    pub leader: bool,
}

pub(crate) struct Sequence {
    /// Prompt followed by every generated token so far.
    pub tokens: Vec<LlamaToken>,
    pub n_prompt: usize,
    /// `tokens[..n_past]` are in this sequence's KV cache.
    pub n_past: usize,
    pub max_tokens: u32,
    pub n_generated: u32,
    pub cached_tokens: u32,
    /// Set once the sequence has been admitted for the first time (re-admission after
    /// preemption must not recount cached prompt tokens or time out).
    pub started: bool,
    pub ignore_eos: bool,
    /// Special tokens produce their text instead of nothing.
    pub special_text: bool,
    /// See [`crate::GenerateRequest::finish_within_budget`].
    pub finish_within_budget: bool,
    /// A thinking model's output, watched until its thought is over.
    pub thought: Option<crate::chat::ReasoningStream>,
    /// Tokens of the thought (see [`Sequence::answer_tokens`]).
    thought_tokens: u32,
    /// `Some(k)`: report logprobs with `k` alternatives.
    pub logprobs: Option<u32>,
    pub group: Option<Group>,
    /// Whether cached prompt KV may be reused. Seeded requests compute the whole
    /// prompt: reusing a prefix decodes the last prompt token in a different batch
    /// shape, which changes llama.cpp's numerics enough to change what a seeded
    /// sampler draws, and a seed promises the same answer.
    pub reuse_prefix: bool,
    /// A follower still waiting for its leader's prompt KV.
    pub awaiting_fork: bool,
    /// Past this instant a sequence still waiting for its first admission fails.
    pub deadline: Option<Instant>,
    pub queued_at: Instant,
    /// A stop string ended generation: nothing held back may be emitted.
    stopped_by_string: bool,
    pub sampler: LlamaSampler,
    /// Repetition penalties, applied before the sampler chain (`None`: off).
    pub penalties: Option<crate::sampling::Penalties>,
    /// The grammar the output must follow, if any.
    pub constraint: Option<crate::constraint::ConstraintState>,
    utf8: Utf8Assembler,
    stops: StopMatcher,
    /// Logprobs of tokens whose text is still held back.
    pending_logprobs: Vec<TokenLogprob>,
    events: mpsc::Sender<Event>,
    pub span: tracing::Span,
    /// Admission order: preemption picks the newest.
    pub arrival: u64,
    /// Tokens this sequence put into the batch being decoded.
    pub in_batch: usize,
    /// Index of this sequence's logits in the batch being decoded, if it asked for them.
    pub logits_at: Option<i32>,
    /// Prompt-lookup speculation, for a greedy sequence of a model that speculates.
    pub drafter: Option<crate::speculation::Drafter>,
    /// Guessed tokens in the batch being decoded, placed after this sequence's
    /// pending token; their logits are at consecutive indices from `drafts_at`.
    pub drafts: Vec<LlamaToken>,
    pub drafts_at: i32,
}

impl Sequence {
    pub fn new(
        tokens: Vec<LlamaToken>,
        max_tokens: u32,
        stops: Vec<String>,
        sampler: LlamaSampler,
        events: mpsc::Sender<Event>,
        span: tracing::Span,
        arrival: u64,
    ) -> Self {
        Self {
            n_prompt: tokens.len(),
            tokens,
            n_past: 0,
            max_tokens,
            n_generated: 0,
            cached_tokens: 0,
            started: false,
            ignore_eos: false,
            special_text: false,
            finish_within_budget: false,
            thought: None,
            thought_tokens: 0,
            logprobs: None,
            group: None,
            reuse_prefix: true,
            awaiting_fork: false,
            deadline: None,
            queued_at: Instant::now(),
            stopped_by_string: false,
            sampler,
            penalties: None,
            constraint: None,
            utf8: Utf8Assembler::new(),
            stops: StopMatcher::new(stops),
            pending_logprobs: Vec::new(),
            events,
            span,
            arrival,
            in_batch: 0,
            logits_at: None,
            drafter: None,
            drafts: Vec::new(),
            drafts_at: 0,
        }
    }

    /// Tokens generated for the answer: all of them but a thinking model's
    /// thought.
    pub fn answer_tokens(&self) -> u32 {
        self.n_generated - self.thought_tokens
    }

    /// The part of a sampled token's text that belongs to the answer: all of
    /// it, but a thinking model's thought (counted, for [`Self::answer_tokens`]).
    /// What a waiting grammar watches for its trigger.
    pub fn answer_part<'a>(&mut self, piece: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let Some(thought) = &mut self.thought else {
            return piece.into();
        };
        let mut answer = Vec::new();
        for part in thought.push(&String::from_utf8_lossy(piece)) {
            if let crate::chat::StreamDelta::Content(text) = part {
                answer.extend_from_slice(text.as_bytes());
            }
        }
        if thought.answering() {
            self.thought = None;
        } else {
            self.thought_tokens += 1;
        }
        answer.into()
    }

    /// Tokens that must still go through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.n_past
    }

    /// The caller dropped its stream: nobody is listening any more.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Takes one sampled token with its text bytes. Returns why the sequence
    /// ends, if it does.
    pub fn accept(
        &mut self,
        token: LlamaToken,
        piece: &[u8],
        is_eog: bool,
        logprob: Option<TokenLogprob>,
    ) -> Option<FinishReason> {
        if is_eog && !self.ignore_eos {
            return Some(FinishReason::Stop);
        }
        self.tokens.push(token);
        self.n_generated += 1;
        self.pending_logprobs.extend(logprob);
        let text = self.utf8.push(piece);
        if !text.is_empty() {
            match self.stops.push(&text) {
                StopOutcome::Continue(safe) => self.send_text(safe),
                StopOutcome::Stopped { text, which } => {
                    self.send_text(text);
                    self.stopped_by_string = true;
                    return Some(FinishReason::StopString(which));
                }
            }
        }
        (self.n_generated >= self.max_tokens).then_some(FinishReason::Length)
    }

    /// Flushes held-back text (unless a stop string ended it) and reports the end.
    /// A stop string completed inside the held-back tail still ends as `Stop`.
    pub fn finish(&mut self, reason: FinishReason) {
        let mut reason = reason;
        if !self.stopped_by_string {
            let tail = self.utf8.finish();
            let mut text = String::new();
            let outcome = match self.stops.push(&tail) {
                StopOutcome::Continue(safe) => {
                    text.push_str(&safe);
                    self.stops.finish_outcome()
                }
                stopped => stopped,
            };
            match outcome {
                StopOutcome::Continue(rest) => text.push_str(&rest),
                StopOutcome::Stopped {
                    text: before,
                    which,
                } => {
                    text.push_str(&before);
                    reason = FinishReason::StopString(which);
                }
            }
            self.send_text(text);
        }
        self.send(Event::Done {
            finish_reason: reason,
            usage: self.usage(),
        });
    }

    pub fn fail(&mut self, error: crate::EngineError) {
        self.send(Event::Error(error));
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.n_prompt as u32,
            completion_tokens: self.n_generated,
            cached_tokens: self.cached_tokens,
            draft_tokens: self.drafter.as_ref().map_or(0, |d| d.drafted),
            accepted_draft_tokens: self.drafter.as_ref().map_or(0, |d| d.accepted),
        }
    }

    /// Emits text with the logprobs of the tokens that produced it. Tokens whose
    /// text never appears (a stop string) take their logprobs with them.
    fn send_text(&mut self, text: String) {
        if !text.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            self.send(Event::Text { text, logprobs });
        }
    }

    fn send(&self, event: Event) {
        // The channel holds max_tokens + 2 events, one per token at most plus the
        // end, so it is never full; a closed channel is a cancelled request, which
        // the scheduler notices before the next step.
        if let Err(TrySendError::Full(_)) = self.events.try_send(event) {
            tracing::error!(parent: &self.span, "event channel full: dropping an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ReasoningStream;

    fn sequence() -> (Sequence, mpsc::Receiver<Event>) {
        let (events, receiver) = mpsc::channel(64);
        let seq = Sequence::new(
            Vec::new(),
            100,
            Vec::new(),
            LlamaSampler::greedy(),
            events,
            tracing::Span::none(),
            0,
        );
        (seq, receiver)
    }

    #[test]
    fn only_the_answer_counts_and_only_the_answer_is_watched() {
        let (mut thinking, _events) = sequence();
        thinking.thought = Some(ReasoningStream::new(false));
        let pieces = [
            "<think>",
            "\n",
            "a <call>",
            " it",
            "</think>",
            "\n\n<call>",
            "{",
            "}",
        ];
        let mut watched = Vec::new();
        for piece in pieces {
            watched.extend_from_slice(&thinking.answer_part(piece.as_bytes()));
            thinking.accept(LlamaToken(1), piece.as_bytes(), false, None);
        }
        assert_eq!(thinking.n_generated, 8);
        // The block's four tokens up to its closing tag are thought; a
        // trigger written there is not shown to the grammar.
        assert_eq!(thinking.answer_tokens(), 4);
        assert_eq!(String::from_utf8(watched).unwrap(), "\n\n<call>{}");
        // Without a block (or without a thinking model), all is answer.
        for thought in [Some(ReasoningStream::new(false)), None] {
            let (mut direct, _events) = sequence();
            direct.thought = thought;
            let mut watched = Vec::new();
            for piece in ["{", "\"a\"", ":", "1", "}"] {
                watched.extend_from_slice(&direct.answer_part(piece.as_bytes()));
                direct.accept(LlamaToken(1), piece.as_bytes(), false, None);
            }
            assert_eq!(direct.answer_tokens(), 5);
            assert_eq!(watched, br#"{"a":1}"#);
        }
        // A block the prompt opened needs no tag.
        let (mut opened, _events) = sequence();
        opened.thought = Some(ReasoningStream::new(true));
        assert!(opened.answer_part(b"<call>").is_empty());
        assert_eq!(&*opened.answer_part(b"</think><call>"), b"<call>");
    }
}
