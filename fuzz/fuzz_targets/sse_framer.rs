//! An upstream's event stream cut into chunks anywhere: the same payloads as
//! the whole stream read at once, and never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::SseFramer;

fuzz_target!(|data: &[u8]| {
    let [cuts, stream @ ..] = data else { return };
    let mut whole = SseFramer::new();
    let mut expected = whole.push(stream);
    expected.extend(whole.finish());

    let mut framer = SseFramer::new();
    let mut seen = Vec::new();
    let step = usize::from(*cuts).max(1);
    for chunk in stream.chunks(step) {
        seen.extend(framer.push(chunk));
    }
    seen.extend(framer.finish());
    assert_eq!(seen, expected);
});
