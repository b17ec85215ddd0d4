//! Server-sent events read from an upstream, as the `data:` payloads they
//! carry. Hand-written because the framing is a few lines (events end at a
//! blank line, payloads are `data:` lines joined by newlines) and the crates
//! that do it bring their own stream types for no gain here.

/// Cuts a byte stream, arriving in chunks split anywhere, into events.
#[derive(Debug, Default)]
pub struct SseFramer {
    buffer: Vec<u8>,
}

impl SseFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `data:` payloads of the events that `chunk` completes, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        // Only the new bytes (and 3 before them, for a separator cut across
        // chunks) can hold the end of the pending event.
        let mut from = self.buffer.len().saturating_sub(3);
        self.buffer.extend_from_slice(chunk);
        let mut payloads = Vec::new();
        let mut start = 0;
        while let Some((len, sep)) = event_end(&self.buffer[from..]) {
            let end = from + len;
            payloads.extend(event_data(&self.buffer[start..end]));
            start = end + sep;
            from = start;
        }
        self.buffer.drain(..start);
        payloads
    }

    /// The payload of a last event that the stream ended without closing.
    pub fn finish(&mut self) -> Option<String> {
        event_data(&std::mem::take(&mut self.buffer))
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

    const STREAM: &[u8] =
        b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";

    #[test]
    fn events_split_at_blank_lines_in_either_line_ending() {
        let mut framer = SseFramer::new();
        assert_eq!(framer.push(STREAM), ["{\"a\":1}", "two\nlines", "[DONE]"]);
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_events() {
        let whole = SseFramer::new().push(STREAM);
        for cut in 0..=STREAM.len() {
            let mut framer = SseFramer::new();
            let mut seen = framer.push(&STREAM[..cut]);
            seen.extend(framer.push(&STREAM[cut..]));
            assert_eq!(seen, whole, "cut at {cut}");
        }
        let mut framer = SseFramer::new();
        let seen: Vec<String> = STREAM.iter().flat_map(|b| framer.push(&[*b])).collect();
        assert_eq!(seen, whole);
    }

    #[test]
    fn an_unclosed_last_event_is_read_at_the_end() {
        let mut framer = SseFramer::new();
        assert!(framer.push(b"data: a\n\ndata: b").len() == 1);
        assert_eq!(framer.finish().as_deref(), Some("b"));
    }
}
