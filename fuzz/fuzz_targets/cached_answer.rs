//! Cached answers as the cache's tiers hand them back (the disk, or a Redis
//! that other replicas write): the chat and legacy-completion shapes a
//! replay decodes, and the logprobs it rebuilds from them. Never a panic; a
//! decoded answer serializes and decodes back to the same JSON, unless a
//! logprob overflowed f32 (JSON has no infinity: it is written `null`, and
//! such an entry is a miss when read back, which the replay treats as such).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use wire::{ChatCompletion, Completion};

fn round_trip<T: DeserializeOwned + Serialize>(value: &T) {
    let once = serde_json::to_value(value).expect("wire types serialize");
    match serde_json::from_value::<T>(once.clone()) {
        Ok(again) => assert_eq!(serde_json::to_value(&again).unwrap(), once),
        Err(e) => assert!(e.to_string().contains("null"), "{e}: {once}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else { return };
    if pick & 1 == 0 {
        if let Ok(answer) = serde_json::from_slice::<ChatCompletion>(body) {
            for choice in &answer.choices {
                if let Some(logprobs) = &choice.logprobs {
                    assert_eq!(logprobs.tokens().len(), logprobs.content.len());
                }
            }
            round_trip(&answer);
        }
    } else if let Ok(answer) = serde_json::from_slice::<Completion>(body) {
        for choice in &answer.choices {
            if let Some(logprobs) = &choice.logprobs {
                let n = logprobs.tokens.len().min(logprobs.token_logprobs.len());
                assert_eq!(logprobs.tokens().len(), n);
            }
        }
        round_trip(&answer);
    }
});
