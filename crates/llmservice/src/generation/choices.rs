//! Reading the engine's events for each choice of a request.

use std::time::Instant;

use engine::chat::{OutputParser, StreamDelta};
use engine::{EngineError, Event, EventStream, TokenLogprob, Usage};
use futures_util::{Stream, StreamExt};

use super::ChoiceEvent;
use crate::error::RequestError;
use crate::telemetry::{Metrics, TokenTimer};

/// One choice's generation, started: its first event is already in hand, so an
/// error before any output can still be answered with a proper HTTP status.
pub struct Choice {
    pub index: u32,
    first: Option<Event>,
    stream: EventStream,
    timer: TokenTimer,
}

/// Waits for every choice's first event; any error there fails the request.
/// Text events are timed for the model's latency metrics from `started`.
pub async fn start(
    streams: Vec<EventStream>,
    metrics: &Metrics,
    model: &str,
    started: Instant,
) -> Result<Vec<Choice>, RequestError> {
    let mut choices = Vec::with_capacity(streams.len());
    for (index, mut stream) in streams.into_iter().enumerate() {
        match stream.recv().await {
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(EngineError::ShutDown.into()),
            first => choices.push(Choice {
                index: index as u32,
                first,
                stream,
                timer: metrics.token_timer(model, started),
            }),
        }
    }
    Ok(choices)
}

impl Choice {
    pub async fn next(&mut self) -> Option<Event> {
        let event = match self.first.take() {
            Some(event) => Some(event),
            None => self.stream.recv().await,
        };
        if let Some(Event::Text { .. }) = &event {
            self.timer.text();
        }
        event
    }
}

impl Choice {
    /// This choice's events as the answer sees them: text through `parser`
    /// into reasoning, content and call pieces, each with
    /// the logprobs of the tokens since the previous piece, then `Done`. Tokens
    /// the parser took without a piece (a closing tag) still send their
    /// logprobs, on an empty content piece before `Done`.
    pub fn events(
        mut self,
        mut parser: OutputParser,
    ) -> impl Stream<Item = Result<ChoiceEvent, RequestError>> + Send {
        async_stream::stream! {
            let mut pending: Vec<TokenLogprob> = Vec::new();
            while let Some(event) = self.next().await {
                match event {
                    Event::Text { text, logprobs } => {
                        pending.extend(logprobs);
                        for delta in parser.push(&text) {
                            yield Ok(ChoiceEvent::Delta(delta, std::mem::take(&mut pending)));
                        }
                    }
                    Event::Done { finish_reason, usage } => {
                        for delta in parser.finish() {
                            yield Ok(ChoiceEvent::Delta(delta, std::mem::take(&mut pending)));
                        }
                        if !pending.is_empty() {
                            yield Ok(ChoiceEvent::Delta(StreamDelta::Content(String::new()), pending));
                        }
                        yield Ok(ChoiceEvent::Done(finish_reason, usage));
                        return;
                    }
                    Event::Error(error) => {
                        yield Err(error.into());
                        return;
                    }
                }
            }
            // The engine went away without finishing the choice.
            yield Err(EngineError::ShutDown.into());
        }
    }
}

/// Every choice's events as one stream of `(choice index, event)`, interleaved
/// as they come. `parser` makes each choice's output parser.
pub fn merge(
    choices: Vec<Choice>,
    parser: impl Fn() -> OutputParser,
) -> impl Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send {
    futures_util::stream::select_all(choices.into_iter().map(|choice| {
        let index = choice.index;
        Box::pin(choice.events(parser()).map(move |event| (index, event)))
    }))
}

/// Usage of a request with several choices per prompt: each prompt counts once
/// (as OpenAI counts it), completions add up. `usages` are in choice order.
pub fn total_usage(usages: &[Usage], choices_per_prompt: usize) -> Usage {
    let mut total = Usage::default();
    for (i, u) in usages.iter().enumerate() {
        if i % choices_per_prompt.max(1) == 0 {
            total.prompt_tokens += u.prompt_tokens;
            total.cached_tokens += u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
        total.draft_tokens += u.draft_tokens;
        total.accepted_draft_tokens += u.accepted_draft_tokens;
    }
    total
}
