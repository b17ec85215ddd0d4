//! Server-sent events: OpenAI's streams are bare JSON payloads closed by
//! `data: [DONE]`; Anthropic's name each event and need no closing marker.

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};

use super::error::ApiError;

/// Wraps a stream of events as an SSE response.
pub fn sse<S>(events: S) -> Response
where
    S: Stream<Item = SseEvent> + Send + 'static,
{
    Sse::new(events.map(Ok::<_, std::convert::Infallible>)).into_response()
}

/// A bare `data:` payload.
pub fn data(payload: String) -> SseEvent {
    SseEvent::default().data(payload)
}

/// OpenAI's closing `data: [DONE]`.
pub fn done() -> SseEvent {
    data("[DONE]".to_owned())
}

/// An error after an OpenAI stream started: one `data: {"error": ...}` payload.
pub fn sse_error(error: impl Into<ApiError>) -> String {
    error.into().body().to_string()
}

/// Serializes a wire value (they always serialize).
pub fn wire_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types always serialize")
}
