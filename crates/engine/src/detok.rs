//! Incremental detokenization for streaming: turning token bytes into valid UTF-8 text, and
//! cutting that text at stop strings without ever emitting part of one.

use std::borrow::Cow;
use std::cmp::Reverse;

/// Accumulates raw token bytes (token pieces can end mid UTF-8 character) and yields only
/// complete, valid UTF-8 text.
#[derive(Debug, Default, Clone)]
pub struct Utf8Assembler {
    /// Bytes of a character whose remaining bytes have not arrived yet (at most 3).
    partial: Vec<u8>,
}

impl Utf8Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append the bytes of one token; return the newly completed valid text (maybe empty).
    ///
    /// Invalid sequences become U+FFFD exactly as `String::from_utf8_lossy` would replace them
    /// in the whole stream; an incomplete trailing sequence is held back for the next token.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        // Skip the copy in the common case of a token that does not continue a character.
        let input: Cow<[u8]> = if self.partial.is_empty() {
            Cow::Borrowed(bytes)
        } else {
            self.partial.extend_from_slice(bytes);
            Cow::Owned(std::mem::take(&mut self.partial))
        };
        let mut out = String::with_capacity(input.len());
        let mut rest: &[u8] = &input;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Already validated, so this borrows without replacing anything.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // `error_len` follows the same maximal-subpart rule as
                        // `from_utf8_lossy`, so one U+FFFD per error keeps the outputs equal.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // A valid prefix cut off by the token boundary: wait for the rest.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.partial = rest.to_vec();
        out
    }

    /// End of stream: flush any held-back bytes (lossily).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        out
    }
}

/// What to do with the text after feeding a piece into a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now.
    Continue(String),
    /// A stop string matched: emit this final text (the part before the stop string), then stop
    /// generating. `which` = index into the stop list.
    Stopped { text: String, which: usize },
}

/// Finds stop strings in streamed text. Text that might be the start of a stop string is held
/// back until it is known not to be; a stop string and everything after it is never emitted.
///
/// The stop that starts earliest in the whole text wins (tie: the longest, then the lowest
/// index), independent of how the text was split into pieces. To keep that promise a completed
/// match is not reported while an earlier- or equally-starting longer stop could still complete
/// with more text; the wait is bounded by the longest stop string.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Non-empty stops with their index in the caller's list, which `which` refers to.
    stops: Vec<(usize, String)>,
    /// Byte length of the longest stop; bounds how much text ever has to be held back.
    max_len: usize,
    /// Held-back tail: always shorter than `max_len`, so rescanning it per push is cheap.
    pending: String,
    /// Set once a stop matched or generation finished, so nothing more is ever emitted.
    done: bool,
}

/// A complete stop occurrence inside the pending text.
#[derive(Debug, Clone, Copy)]
struct Match {
    start: usize,
    which: usize,
}

impl StopMatcher {
    /// Empty strings in `stops` are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<(usize, String)> = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        let max_len = stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        Self {
            stops,
            max_len,
            pending: String::new(),
            done: false,
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.done {
            return StopOutcome::Continue(String::new());
        }
        self.pending.push_str(text);
        let found = self.earliest_match(&self.pending);
        match self.hold_start(&self.pending, found.map(|m| m.start)) {
            Some(hold) => {
                let tail = self.pending.split_off(hold);
                StopOutcome::Continue(std::mem::replace(&mut self.pending, tail))
            }
            None => match found {
                Some(m) => self.stop_at(m),
                None => StopOutcome::Continue(std::mem::take(&mut self.pending)),
            },
        }
    }

    /// End of generation without a stop: return the held-back remainder.
    ///
    /// Text is still cut at a stop that completed while a longer candidate was pending; use
    /// [`StopMatcher::finish_outcome`] to learn whether that happened.
    pub fn finish(&mut self) -> String {
        match self.finish_outcome() {
            StopOutcome::Continue(text) | StopOutcome::Stopped { text, .. } => text,
        }
    }

    /// Like [`StopMatcher::finish`], but reports a stop that matched in the held-back text
    /// (its pending longer rival can no longer complete once generation has ended).
    pub fn finish_outcome(&mut self) -> StopOutcome {
        if self.done {
            return StopOutcome::Continue(String::new());
        }
        match self.earliest_match(&self.pending) {
            Some(m) => self.stop_at(m),
            None => {
                self.done = true;
                StopOutcome::Continue(std::mem::take(&mut self.pending))
            }
        }
    }

    fn stop_at(&mut self, m: Match) -> StopOutcome {
        self.done = true;
        let mut text = std::mem::take(&mut self.pending);
        text.truncate(m.start);
        StopOutcome::Stopped {
            text,
            which: m.which,
        }
    }

    /// Earliest-starting complete stop in `text`; tie: longest, then lowest index.
    fn earliest_match(&self, text: &str) -> Option<Match> {
        self.stops
            .iter()
            .filter_map(|(which, s)| text.find(s.as_str()).map(|p| (p, Reverse(s.len()), *which)))
            .min()
            .map(|(start, _, which)| Match { start, which })
    }

    /// Start of the longest suffix of `text` that is a proper prefix of some stop, i.e. text that
    /// could still become a stop. With `limit`, only candidates starting at or before it count:
    /// later ones cannot beat a match that starts at `limit`.
    fn hold_start(&self, text: &str, limit: Option<usize>) -> Option<usize> {
        // A proper prefix is shorter than its stop, so no candidate starts earlier than this.
        let mut from = text.len().saturating_sub(self.max_len.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let end = limit.map_or(text.len(), |l| l.min(text.len()));
        text[from..]
            .char_indices()
            .map(|(i, _)| from + i)
            .take_while(|&i| i <= end)
            .find(|&i| {
                let tail = &text[i..];
                self.stops
                    .iter()
                    .any(|(_, s)| s.len() > tail.len() && s.starts_with(tail))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Split `s` at the given char positions, so every piece is valid UTF-8.
    fn split_chars<'a>(s: &'a str, cuts: &[Index]) -> Vec<&'a str> {
        let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| bounds[c.index(bounds.len())]).collect();
        at.extend([0, s.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| &s[w[0]..w[1]]).collect()
    }

    fn split_bytes<'a>(b: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(b.len() + 1)).collect();
        at.extend([0, b.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| &b[w[0]..w[1]]).collect()
    }

    fn assemble(chunks: &[&[u8]]) -> String {
        let mut asm = Utf8Assembler::new();
        let mut out: String = chunks.iter().map(|c| asm.push(c)).collect();
        out.push_str(&asm.finish());
        out
    }

    /// The whole-text definition the streaming matcher must agree with.
    fn reference(text: &str, stops: &[String]) -> (String, Option<usize>) {
        let best = stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| text.find(s.as_str()).map(|p| (p, Reverse(s.len()), i)))
            .min();
        match best {
            Some((p, _, i)) => (text[..p].to_string(), Some(i)),
            None => (text.to_string(), None),
        }
    }

    /// Streams `chunks`, checking after every step that emitted text never goes past the
    /// reference cut and that nothing at all comes out once a stop was reported.
    fn stream(chunks: &[&str], stops: &[String], expected: &str) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(stops.to_vec());
        let max_len = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let (mut out, mut which, mut fed) = (String::new(), None, 0);
        for chunk in chunks {
            fed += chunk.len();
            match m.push(chunk) {
                StopOutcome::Continue(t) if which.is_some() => assert_eq!(t, ""),
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, which: w } => {
                    assert!(which.is_none(), "stopped twice");
                    out.push_str(&text);
                    which = Some(w);
                }
            }
            assert!(
                expected.starts_with(&out),
                "emitted {out:?} beyond {expected:?}"
            );
            if which.is_none() {
                // Held-back text is always shorter than the longest stop.
                assert!(fed - out.len() < max_len.max(1));
            }
        }
        match m.finish_outcome() {
            StopOutcome::Continue(t) => {
                assert!(which.is_none() || t.is_empty());
                out.push_str(&t);
            }
            StopOutcome::Stopped { text, which: w } => {
                assert!(which.is_none(), "stopped twice");
                out.push_str(&text);
                which = Some(w);
            }
        }
        assert_eq!(m.push("more"), StopOutcome::Continue(String::new()));
        assert_eq!(m.finish(), "");
        (out, which)
    }

    fn small_text(max: usize) -> impl Strategy<Value = String> {
        let chars = vec!['a', 'b', '<', '/', '>', 's', 'é', '你', '😀'];
        prop::collection::vec(prop::sample::select(chars), 0..max)
            .prop_map(|v| v.into_iter().collect())
    }

    /// Bytes that are mostly UTF-8 fragments, to hit truncated, overlong and surrogate forms.
    fn utf8ish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let bytes = b"a\xC3\xA9\xE4\xBD\xA0\xF0\x9F\x98\x80\xFF\xC0\xED\xF4\x90".to_vec();
        prop::collection::vec(prop::sample::select(bytes), 0..40)
    }

    proptest! {
        #[test]
        fn assembler_matches_lossy(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..64), utf8ish_bytes()],
            cuts in prop::collection::vec(any::<Index>(), 0..12),
        ) {
            let out = assemble(&split_bytes(&bytes, &cuts));
            prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
        }

        #[test]
        fn assembler_round_trips_valid_text(
            text in prop_oneof![any::<String>(), small_text(30)],
            cuts in prop::collection::vec(any::<Index>(), 0..12),
        ) {
            prop_assert_eq!(assemble(&split_bytes(text.as_bytes(), &cuts)), text);
        }

        #[test]
        fn stops_match_reference(
            text in small_text(40),
            random_stops in prop::collection::vec(small_text(5), 0..3),
            // Substrings of the text, so stops actually occur and overlap each other.
            picks in prop::collection::vec((any::<Index>(), 0usize..6), 0..3),
            cuts in prop::collection::vec(any::<Index>(), 0..15),
        ) {
            let chars: Vec<char> = text.chars().collect();
            let mut stops = random_stops;
            for (start, len) in picks {
                let s = start.index(chars.len() + 1);
                stops.push(chars[s..(s + len).min(chars.len())].iter().collect());
            }
            let (expected, expected_which) = reference(&text, &stops);
            let (out, which) = stream(&split_chars(&text, &cuts), &stops, &expected);
            prop_assert_eq!(out, expected);
            prop_assert_eq!(which, expected_which);
        }
    }

    /// Pushes `chunks`, then `finish_outcome`; a stop shows as its text plus `[stop N]`.
    fn run(stops: &[&str], chunks: &[&str]) -> Vec<String> {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut outs: Vec<StopOutcome> = chunks.iter().map(|c| m.push(c)).collect();
        outs.push(m.finish_outcome());
        outs.into_iter()
            .map(|o| match o {
                StopOutcome::Continue(t) => t,
                StopOutcome::Stopped { text, which } => format!("{text}[stop {which}]"),
            })
            .collect()
    }

    #[test]
    fn stop_spanning_three_tokens() {
        let got = run(&["<|end|>"], &["Hello <|", "en", "d|> tail", "x"]);
        assert_eq!(got, ["Hello ", "", "[stop 0]", "", ""]);
    }

    #[test]
    fn stop_at_very_start() {
        assert_eq!(run(&["###"], &["###", "after"]), ["[stop 0]", "", ""]);
    }

    #[test]
    fn prefix_that_turns_out_not_to_be_a_stop() {
        let got = run(&["</s>"], &["a<", "/", "b", ">c"]);
        assert_eq!(got, ["a", "", "</b", ">c", ""]);
        // A prefix still pending at the end is flushed, not swallowed.
        assert_eq!(run(&["</s>"], &["done </"]), ["done ", "</"]);
    }

    #[test]
    fn earlier_starting_longer_stop_wins_over_chunking() {
        // "bc" completes first, but "abcd" starts earlier, so it must be waited for.
        let stops = ["bc", "abcd"];
        assert_eq!(run(&stops, &["abc", "d"]), ["", "[stop 1]", ""]);
        assert_eq!(run(&stops, &["abc", "x"]), ["", "a[stop 0]", ""]);
        assert_eq!(run(&stops, &["abc"]), ["", "a[stop 0]"]);
        // Same start: the longer stop wins even if the shorter one completes first.
        assert_eq!(run(&["\n", "\n\n"], &["a\n", "\nb"]), ["a", "[stop 1]", ""]);
    }

    #[test]
    fn empty_stops_are_ignored_but_indices_kept() {
        assert_eq!(run(&["", "x"], &["abxc"]), ["ab[stop 1]", ""]);
        assert_eq!(run(&[""], &["abc"]), ["abc", ""]);
    }

    #[test]
    fn multibyte_prefix_is_not_split() {
        let got = run(&["你好!"], &["x你", "好", "?"]);
        assert_eq!(got, ["x", "", "你好?", ""]);
    }

    #[test]
    fn assembler_holds_partial_chars() {
        let mut a = Utf8Assembler::default();
        let outs: Vec<String> = "é你😀".bytes().map(|b| a.push(&[b])).collect();
        assert_eq!(outs.concat(), "é你😀");
        assert_eq!((outs[0].as_str(), outs[1].as_str()), ("", "é"));
        assert_eq!(a.push(b"\xE4\xBD"), "");
        assert_eq!(a.push(b"x"), "\u{FFFD}x");
        assert_eq!(a.push(b"\xF0\x9F"), "");
        assert_eq!(a.finish(), "\u{FFFD}");
    }
}
