//! BGE-M3's head files (a torch `.pt` zip holding a pickle, or safetensors)
//! from arbitrary bytes: a `Linear` whose sizes agree, or an error; never a
//! panic, an overflow, or an allocation sized by a hostile header.
#![no_main]

use std::path::Path;

use engine::heads::Linear;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [kind, bytes @ ..] = data else { return };
    let safetensors = kind & 1 == 1;
    if let Ok(linear) = Linear::from_bytes(bytes, safetensors, Path::new("head")) {
        let y = linear.apply(&vec![1.0; linear.n_in]);
        assert_eq!(y.len(), linear.n_out);
    }
});
