//! Answers built from their choices' records ([`ChoiceRecord`]): the SSE
//! chunks as events arrive, and at the end the whole answer that is both the
//! JSON response and the cache entry. Fresh generations, built-in function
//! rounds and cache replays all drive the same [`Answer`], through [`collect`]
//! or [`stream`].

mod chat;
mod completions;
mod messages;
mod ollama;
mod rag;
mod responses;

use axum::response::sse::Event as SseEvent;
use futures_util::{Stream, StreamExt};
use serde::Serialize;

use super::error::ollama_body;
use super::sse::{data, done, sse_error, wire_json};
use crate::error::RequestError;
use crate::generation::{total_usage, ChoiceEvent, ChoiceRecord};

pub use chat::{ChatAnswer, ChatShape};
pub use completions::TextAnswer;
pub use messages::MessagesAnswer;
pub use ollama::OllamaAnswer;
pub use rag::RagAnswer;
pub use responses::ResponsesAnswer;

/// What every answer carries besides its choices.
#[derive(Debug, Clone)]
pub struct AnswerHead {
    pub id: String,
    pub created: i64,
    /// The name the client used.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether a stream ends with a usage chunk.
    pub include_usage: bool,
}

impl AnswerHead {
    /// A new answer's head: an id with `prefix`, created now, delivered as
    /// `sampling` asks (`stream`, `stream_options.include_usage`).
    pub fn new(prefix: &str, model: &str, sampling: &crate::wire::SamplingFields) -> Self {
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: chrono::Utc::now().timestamp(),
            model: model.to_owned(),
            stream: sampling.stream.unwrap_or(false),
            include_usage: crate::generation::include_usage(sampling),
        }
    }
}

/// The choices' records with the wire shape of one endpoint.
pub trait Answer: Send + 'static {
    type Chunk: Serialize;
    type Whole: Serialize;

    fn head(&self) -> &AnswerHead;
    /// The records, in choice order.
    fn records(&self) -> &[ChoiceRecord];
    fn records_mut(&mut self) -> &mut [ChoiceRecord];
    /// Choices that share one prompt (their prompt tokens count once): one,
    /// unless the API asks for several (`n`).
    fn choices_per_prompt(&self) -> usize {
        1
    }
    /// The chunks that open a stream, before any event.
    fn opening(&mut self) -> Vec<Self::Chunk>;
    /// The chunks a recorded piece becomes (none for a piece the shape hides).
    fn piece_chunks(&mut self, index: u32, event: &ChoiceEvent) -> Vec<Self::Chunk>;
    /// The chunks that close a finished choice.
    fn finish_chunks(&mut self, index: u32) -> Vec<Self::Chunk>;
    /// The last chunk, with the usage of every choice, for answers that ask
    /// for it (`stream_options.include_usage`; APIs whose last chunk carries
    /// usage anyway have none).
    fn usage_chunk(&self) -> Option<Self::Chunk> {
        None
    }
    /// The whole answer: the JSON response and the cache entry.
    fn whole(&self) -> Self::Whole;

    /// The whole answer as the response cache keeps it (APIs translated
    /// onto chat keep a chat completion, see [`ChatAnswer::cache_body_of`]).
    fn cache_body(&self) -> serde_json::Value {
        json_value(&self.whole())
    }

    /// An error after the stream started as a chunk of the stream, for APIs
    /// whose error events are numbered with the rest (Responses); the others
    /// hand the error back for [`Answer::sse_error_event`].
    fn error_chunk(&mut self, error: RequestError) -> Result<Self::Chunk, RequestError> {
        Err(error)
    }

    /// A chunk as the SSE event that carries it (OpenAI's: a bare payload).
    fn sse_event(chunk: &Self::Chunk) -> SseEvent {
        data(wire_json(chunk))
    }

    /// An error after the stream started (OpenAI's: `data: {"error": ...}`).
    fn sse_error_event(error: RequestError) -> SseEvent {
        data(sse_error(error))
    }

    /// The event that closes a stream, if the API has one (`data: [DONE]`).
    fn sse_close() -> Option<SseEvent> {
        Some(done())
    }

    /// Whether a stream is newline-delimited JSON rather than SSE (Ollama).
    const NDJSON: bool = false;

    /// Records one event and returns the chunks it becomes on a stream.
    fn apply(&mut self, index: u32, event: ChoiceEvent) -> Vec<Self::Chunk> {
        let mut chunks = Vec::new();
        let Some(record) = self.records_mut().get_mut(index as usize) else {
            return chunks;
        };
        match &event {
            ChoiceEvent::Delta(delta, logprobs) => record.record(delta, logprobs),
            ChoiceEvent::Done(reason, usage) => record.finish(*reason, *usage),
        }
        match event {
            ChoiceEvent::Done(..) => chunks.extend(self.finish_chunks(index)),
            piece => chunks.extend(self.piece_chunks(index, &piece)),
        }
        if self.is_done() && self.head().include_usage {
            chunks.extend(self.usage_chunk());
        }
        chunks
    }

    fn is_done(&self) -> bool {
        self.records().iter().all(|r| r.finish.is_some())
    }

    /// The usage of the whole request.
    fn usage(&self) -> engine::Usage {
        let usages: Vec<_> = self.records().iter().map(|r| r.usage).collect();
        total_usage(&usages, self.choices_per_prompt())
    }
}

/// A wire value as JSON.
pub fn json_value<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("wire types always serialize")
}

/// Reads every event into `answer`; the first error fails the whole answer.
pub async fn collect<A, S>(mut answer: A, events: S) -> Result<A, RequestError>
where
    A: Answer,
    S: Stream<Item = (u32, Result<ChoiceEvent, RequestError>)>,
{
    let mut events = std::pin::pin!(events);
    while let Some((index, event)) = events.next().await {
        answer.apply(index, event?);
        if answer.is_done() {
            return Ok(answer);
        }
    }
    Err(engine::EngineError::ShutDown.into())
}

/// What a stream carries before its API frames it.
enum Piece<C> {
    Chunk(C),
    Error(RequestError),
    /// Every choice finished (or the stream ended in an error).
    End,
}

/// The answer's chunks while `events` arrive; `finished` sees the whole
/// answer once every choice is done (to store and log it).
fn pieces<A, S>(
    mut answer: A,
    events: S,
    finished: impl FnOnce(&A) + Send + 'static,
) -> impl Stream<Item = Piece<A::Chunk>> + Send
where
    A: Answer,
    A::Chunk: Send,
    S: Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send + 'static,
{
    let mut finished = Some(finished);
    async_stream::stream! {
        for chunk in answer.opening() {
            yield Piece::Chunk(chunk);
        }
        let mut events = Box::pin(events);
        while let Some((index, event)) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    yield failure(&mut answer, error);
                    yield Piece::End;
                    return;
                }
            };
            let chunks = answer.apply(index, event);
            if answer.is_done() {
                if let Some(finished) = finished.take() {
                    finished(&answer);
                }
            }
            for chunk in chunks {
                yield Piece::Chunk(chunk);
            }
            if answer.is_done() {
                yield Piece::End;
                return;
            }
        }
        // The engine went away without finishing every choice.
        yield failure(&mut answer, engine::EngineError::ShutDown.into());
        yield Piece::End;
    }
}

/// An error after the stream started, as the answer reports it.
fn failure<A: Answer>(answer: &mut A, error: RequestError) -> Piece<A::Chunk> {
    match answer.error_chunk(error) {
        Ok(chunk) => Piece::Chunk(chunk),
        Err(error) => Piece::Error(error),
    }
}

/// The answer as SSE events (an error after the stream started is the API's
/// error event).
pub fn stream<A, S>(
    answer: A,
    events: S,
    finished: impl FnOnce(&A) + Send + 'static,
) -> impl Stream<Item = SseEvent> + Send
where
    A: Answer,
    A::Chunk: Send,
    S: Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send + 'static,
{
    pieces(answer, events, finished).filter_map(|piece| {
        std::future::ready(match piece {
            Piece::Chunk(chunk) => Some(A::sse_event(&chunk)),
            Piece::Error(error) => Some(A::sse_error_event(error)),
            Piece::End => A::sse_close(),
        })
    })
}

/// The answer as newline-delimited JSON (Ollama's streams): one chunk per
/// line; an error after the stream started is one `{"error": ...}` line.
pub fn lines<A, S>(
    answer: A,
    events: S,
    finished: impl FnOnce(&A) + Send + 'static,
) -> impl Stream<Item = String> + Send
where
    A: Answer,
    A::Chunk: Send,
    S: Stream<Item = (u32, Result<ChoiceEvent, RequestError>)> + Send + 'static,
{
    pieces(answer, events, finished).filter_map(|piece| {
        std::future::ready(match piece {
            Piece::Chunk(chunk) => Some(wire_json(&chunk) + "\n"),
            Piece::Error(error) => Some(ollama_body(&error.into()).to_string() + "\n"),
            Piece::End => None,
        })
    })
}
