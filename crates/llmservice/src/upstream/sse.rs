//! Server-sent events from an upstream, as the `data:` payloads they carry.
//! Hand-written because the framing is a few lines (events end at a blank
//! line, payloads are `data:` lines joined by newlines) and the crates that
//! do it bring their own stream types for no gain here.

use futures_util::{Stream, StreamExt};

/// The `data:` payload of each event, in order; an error when the
/// connection fails mid-stream.
pub fn payloads(
    response: reqwest::Response,
) -> impl Stream<Item = Result<String, String>> + Send + 'static {
    let mut bytes = response.bytes_stream();
    async_stream::stream! {
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            match bytes.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                Some(Err(error)) => {
                    yield Err(error.without_url().to_string());
                    return;
                }
                None => {
                    if let Some(data) = event_data(&buffer) {
                        yield Ok(data);
                    }
                    return;
                }
            }
            while let Some(end) = event_end(&buffer) {
                let event: Vec<u8> = buffer.drain(..end.0 + end.1).collect();
                if let Some(data) = event_data(&event[..end.0]) {
                    yield Ok(data);
                }
            }
        }
    }
}

/// Where the first event ends: (its length, the separator's length).
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// An event's `data:` lines, joined; `None` for comments and empty events.
fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_at_blank_lines_in_either_line_ending() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";
        let mut rest: &[u8] = stream;
        let mut seen = Vec::new();
        while let Some((len, sep)) = event_end(rest) {
            if let Some(data) = event_data(&rest[..len]) {
                seen.push(data);
            }
            rest = &rest[len + sep..];
        }
        assert_eq!(seen, ["{\"a\":1}", "two\nlines", "[DONE]"]);
    }
}
