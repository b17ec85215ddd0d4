//! The JSON body reader for every request shape the server takes: a value
//! or a 400-style error naming a field, never a panic; a refused body names
//! no field for a syntax error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use wire::{parse_body, BodyError};

fn check<T: DeserializeOwned>(data: &[u8]) {
    if let Err(BodyError {
        message,
        param,
        code,
    }) = parse_body::<T>(data)
    {
        assert!(!message.is_empty());
        if message.starts_with("could not parse") {
            assert_eq!(param, None, "{message}");
        }
        if code.is_some() {
            assert!(param.is_some(), "a missing field is named: {message}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else { return };
    const SHAPES: [fn(&[u8]); 17] = [
        check::<wire::ChatCompletionRequest>,
        check::<wire::CompletionRequest>,
        check::<wire::EmbeddingRequest>,
        check::<wire::RerankRequest>,
        check::<wire::TokenizeRequest>,
        check::<wire::DetokenizeRequest>,
        check::<wire::MessagesRequest>,
        check::<wire::CountTokensRequest>,
        check::<wire::ResponsesRequest>,
        check::<wire::OllamaChatRequest>,
        check::<wire::OllamaGenerateRequest>,
        check::<wire::OllamaShowRequest>,
        check::<wire::OllamaEmbedRequest>,
        check::<wire::OllamaEmbeddingsRequest>,
        check::<wire::RagDocumentsRequest>,
        check::<wire::RagSearchRequest>,
        check::<wire::RagChatRequest>,
    ];
    SHAPES[usize::from(*pick) % SHAPES.len()](body);
});
