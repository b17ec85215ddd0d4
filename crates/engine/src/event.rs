use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::EngineError;

/// Why generation ended, in the vocabulary OpenAI's API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token.
    Stop,
    /// A stop string: its index in the request's stop list (OpenAI's API calls
    /// this `stop` too; Anthropic's says which sequence it was).
    StopString(usize),
    /// `max_tokens` reached, or the context is full.
    Length,
}

/// Real token counts for one finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV was reused from an earlier request instead of recomputed.
    pub cached_tokens: u32,
    /// Tokens guessed by speculation and checked, and how many of them were kept
    /// (each kept one is a generated token that needed no step of its own).
    pub draft_tokens: u32,
    pub accepted_draft_tokens: u32,
}

/// A generated token's log-probability under the model, and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (lossy where the token is part of a UTF-8 character).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens at this position, most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What the engine sends back for one request, in order: any number of `Text`,
/// then exactly one `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// Newly generated text: always whole UTF-8 characters, never part of a stop
    /// string; with logprobs on, the tokens that produced it.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}

/// The receiving end of one request. Dropping it cancels the request: the
/// scheduler notices at its next step and frees the sequence. It also holds the
/// request's place in the model's queue, so capacity frees when the stream drops.
#[derive(Debug)]
pub struct EventStream {
    pub(crate) rx: mpsc::Receiver<Event>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl EventStream {
    /// The next event, or `None` once the engine has nothing more to say.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}
