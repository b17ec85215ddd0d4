//! Streaming detokenization: token bytes split anywhere come out as the same
//! text as the whole output decoded at once, and stop strings cut that text
//! the same way whatever the split.
#![no_main]

use engine::detok::{StopMatcher, StopOutcome, Utf8Assembler};
use libfuzzer_sys::fuzz_target;

/// Feeds `text` in pieces through a stop matcher: (text emitted, which stop).
fn stop_run(stops: &[String], pieces: &[&str]) -> (String, Option<usize>) {
    let mut matcher = StopMatcher::new(stops.to_vec());
    let mut out = String::new();
    for piece in pieces {
        match matcher.push(piece) {
            StopOutcome::Continue(text) => out.push_str(&text),
            StopOutcome::Stopped { text, which } => {
                out.push_str(&text);
                return (out, Some(which));
            }
        }
    }
    match matcher.finish_outcome() {
        StopOutcome::Continue(text) => {
            out.push_str(&text);
            (out, None)
        }
        StopOutcome::Stopped { text, which } => {
            out.push_str(&text);
            (out, Some(which))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [step, n_stops, rest @ ..] = data else {
        return;
    };
    let step = usize::from(*step).max(1);

    let mut assembler = Utf8Assembler::new();
    let mut text = String::new();
    for chunk in rest.chunks(step) {
        text.push_str(&assembler.push(chunk));
    }
    text.push_str(&assembler.finish());
    assert_eq!(
        text,
        String::from_utf8_lossy(rest),
        "split bytes decoded differently"
    );

    // The first lines of the text are the stop strings; the rest is the output.
    let mut lines = text.splitn(usize::from(n_stops % 4) + 1, '\n');
    let stops: Vec<String> = lines
        .by_ref()
        .take(usize::from(n_stops % 4))
        .map(str::to_owned)
        .collect();
    let Some(output) = lines.next() else { return };
    let whole = stop_run(&stops, &[output]);
    let mut pieces = Vec::new();
    let mut from = 0;
    for (i, (at, _)) in output.char_indices().enumerate() {
        if at > from && i % step == 0 {
            pieces.push(&output[from..at]);
            from = at;
        }
    }
    pieces.push(&output[from..]);
    assert_eq!(
        stop_run(&stops, &pieces),
        whole,
        "split text stopped differently"
    );
    if let (text, Some(which)) = &whole {
        assert!(
            !text.contains(stops[*which].as_str()),
            "a stop string was emitted"
        );
    }
});
