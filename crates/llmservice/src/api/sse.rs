//! OpenAI-style server-sent events: JSON payloads, closed by `data: [DONE]`.

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};

use super::error::ApiError;

/// Wraps a stream of JSON payloads as SSE, closed by `data: [DONE]`.
pub fn sse<S>(payloads: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let events = payloads
        .chain(futures_util::stream::once(async { "[DONE]".to_owned() }))
        .map(|data| Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)));
    Sse::new(events).into_response()
}

/// An error after the stream started: one `data: {"error": ...}` payload.
pub fn sse_error(error: impl Into<ApiError>) -> String {
    error.into().body().to_string()
}

/// Serializes a wire value (they always serialize).
pub fn wire_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types always serialize")
}
