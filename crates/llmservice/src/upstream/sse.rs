//! Server-sent events from an upstream, as the `data:` payloads they carry
//! (framing in [`wire::SseFramer`]).

use futures_util::{Stream, StreamExt};

/// The `data:` payload of each event, in order; an error when the
/// connection fails mid-stream.
pub fn payloads(
    response: reqwest::Response,
) -> impl Stream<Item = Result<String, String>> + Send + 'static {
    let mut bytes = response.bytes_stream();
    async_stream::stream! {
        let mut framer = wire::SseFramer::new();
        loop {
            match bytes.next().await {
                Some(Ok(chunk)) => {
                    for data in framer.push(&chunk) {
                        yield Ok(data);
                    }
                }
                Some(Err(error)) => {
                    yield Err(error.without_url().to_string());
                    return;
                }
                None => {
                    if let Some(data) = framer.finish() {
                        yield Ok(data);
                    }
                    return;
                }
            }
        }
    }
}
