//! The output parser (a thinking model's reasoning split off, then the
//! tool-call parser) on model output split anywhere: it never panics, and the
//! reasoning, calls and content it finds do not depend on where the output
//! was split. The first byte picks the format (its top bits: reasoning split
//! off, the block opened by the prompt), the second the cuts.
#![no_main]

use engine::chat::{
    OutputParser, ParsedOutput, ReasoningStream, StreamDelta, ToolCall, ToolCallFormat,
    ToolCallStream, THINK_CLOSE,
};
use libfuzzer_sys::fuzz_target;

const FORMATS: [ToolCallFormat; 5] = [
    ToolCallFormat::Hermes,
    ToolCallFormat::Llama3,
    ToolCallFormat::MistralNemo,
    ToolCallFormat::MistralV11,
    ToolCallFormat::GenericJson,
];

fn ids() -> impl FnMut() -> String + Send + 'static {
    let mut n = 0;
    move || {
        n += 1;
        format!("call_{n}")
    }
}

fn collect(deltas: Vec<StreamDelta>) -> ParsedOutput {
    let mut out = ParsedOutput::default();
    for delta in deltas {
        match delta {
            StreamDelta::Reasoning(text) => out.reasoning.push_str(&text),
            StreamDelta::Content(text) => out.content.push_str(&text),
            StreamDelta::ToolCallStart { index, id, name } => {
                assert_eq!(index, out.tool_calls.len(), "calls start in order");
                out.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                });
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                out.tool_calls[index].arguments.push_str(&fragment);
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [format, seed, rest @ ..] = data else {
        return;
    };
    let (thinking, open) = (format & 0x80 != 0, format & 0x40 != 0);
    let format = FORMATS[usize::from(format & 0x3f) % FORMATS.len()];
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let parser = || OutputParser {
        reasoning: thinking.then(|| ReasoningStream::new(open)),
        calls: Some(ToolCallStream::with_id_source(format, ids())),
    };
    let mut stream = parser();
    let mut deltas = stream.push(text);
    deltas.extend(stream.finish());
    let whole = collect(deltas);
    assert!(
        !whole.reasoning.contains(THINK_CLOSE),
        "the block ends at its tag"
    );
    for call in &whole.tool_calls {
        let args: serde_json::Value =
            serde_json::from_str(&call.arguments).expect("arguments are JSON");
        assert!(
            args.is_object(),
            "arguments are an object: {}",
            call.arguments
        );
    }

    // Cut at every char boundary whose index the seed's bits select.
    let mut stream = parser();
    let mut deltas = Vec::new();
    let mut from = 0;
    for (i, (at, _)) in text.char_indices().enumerate().skip(1) {
        if (u32::from(*seed) >> (i % 8)) & 1 == 1 || *seed == 0 {
            deltas.extend(stream.push(&text[from..at]));
            from = at;
        }
    }
    deltas.extend(stream.push(&text[from..]));
    deltas.extend(stream.finish());
    assert_eq!(collect(deltas), whole, "split output parsed differently");
});
