use std::path::PathBuf;

use proptest::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use super::*;

const GOLDENS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tool_calls/goldens.json"
));
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/templates");
const MARKERS: [&str; 3] = [HERMES_OPEN, MISTRAL_CALLS, PYTHON_TAG];

/// A realistic model output and what it must parse to.
#[derive(Debug, Deserialize)]
struct Golden {
    name: String,
    format: String,
    text: String,
    content: String,
    calls: Vec<GoldenCall>,
}

#[derive(Debug, Deserialize)]
struct GoldenCall {
    name: String,
    arguments: Value,
}

fn goldens() -> Vec<Golden> {
    serde_json::from_str(GOLDENS).expect("goldens.json")
}

fn format_named(name: &str) -> ToolCallFormat {
    match name {
        "Hermes" => ToolCallFormat::Hermes,
        "Llama3" => ToolCallFormat::Llama3,
        "MistralNemo" => ToolCallFormat::MistralNemo,
        "MistralV11" => ToolCallFormat::MistralV11,
        "GenericJson" => ToolCallFormat::GenericJson,
        other => panic!("unknown format {other}"),
    }
}

/// Ids that two parsers of the same text agree on, so whole calls compare.
fn counting_ids() -> impl FnMut() -> String + Send + 'static {
    let mut n = 0;
    move || {
        n += 1;
        format!("call_{n:024}")
    }
}

fn stream_deltas(format: ToolCallFormat, pieces: &[&str]) -> Vec<StreamDelta> {
    let mut stream = ToolCallStream::with_id_source(format, counting_ids());
    let mut deltas = Vec::new();
    for piece in pieces {
        deltas.extend(stream.push(piece));
    }
    deltas.extend(stream.finish());
    deltas
}

/// Reassembles a delta stream, checking that calls open in index order and
/// that no arguments arrive for a call before its start.
fn reassemble(deltas: &[StreamDelta]) -> Result<ParsedOutput, String> {
    let mut parsed = ParsedOutput::default();
    for delta in deltas {
        match delta {
            StreamDelta::Reasoning(_) => return Err("the call parser gave reasoning".into()),
            StreamDelta::Content(text) => parsed.content.push_str(text),
            StreamDelta::ToolCallStart { index, id, name } => {
                if *index != parsed.tool_calls.len() {
                    return Err(format!("start of call {index} out of order"));
                }
                parsed.tool_calls.push(ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                });
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                match parsed.tool_calls.get_mut(*index) {
                    Some(call) => call.arguments.push_str(fragment),
                    None => return Err(format!("arguments of call {index} before its start")),
                }
            }
        }
    }
    Ok(parsed)
}

/// Cuts `text` at the char boundaries picked by `picks`.
fn split<'a>(text: &'a str, picks: &[usize]) -> Vec<&'a str> {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let mut cuts: Vec<usize> = picks.iter().map(|p| bounds[p % bounds.len()]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut from = 0;
    for cut in cuts.into_iter().chain([text.len()]) {
        pieces.push(&text[from..cut]);
        from = cut;
    }
    pieces
}

/// The streamed pieces must add up to exactly what `parse` makes of the text.
fn check_split(format: ToolCallFormat, text: &str, pieces: &[&str]) -> Result<(), String> {
    let want = parse_with_ids(format, text, counting_ids());
    let got = reassemble(&stream_deltas(format, pieces))?;
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{format:?} {pieces:?}\n streamed {got:?}\n parsed   {want:?}"
        ))
    }
}

#[test]
fn goldens_parse() {
    let mut failures = Vec::new();
    for golden in goldens() {
        let parsed = parse(format_named(&golden.format), &golden.text);
        let calls: Vec<(String, String)> = parsed
            .tool_calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        let want: Vec<(String, String)> = golden
            .calls
            .iter()
            .map(|c| (c.name.clone(), serde_json::to_string(&c.arguments).unwrap()))
            .collect();
        if parsed.content != golden.content || calls != want {
            failures.push(format!(
                "{}: got {:?} {calls:?}, want {:?} {want:?}",
                golden.name, parsed.content, golden.content
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn goldens_stream_at_every_single_cut_and_char_by_char() {
    for golden in goldens() {
        let format = format_named(&golden.format);
        let text = golden.text.as_str();
        for (cut, _) in text.char_indices().skip(1) {
            check_split(format, text, &[&text[..cut], &text[cut..]])
                .unwrap_or_else(|e| panic!("{}: {e}", golden.name));
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        check_split(format, text, &chars).unwrap_or_else(|e| panic!("{}: {e}", golden.name));
    }
}

proptest! {
    #[test]
    fn goldens_stream_like_parse_for_any_split(picks in prop::collection::vec(any::<usize>(), 0..24)) {
        for golden in goldens() {
            let pieces = split(&golden.text, &picks);
            let checked = check_split(format_named(&golden.format), &golden.text, &pieces);
            prop_assert!(checked.is_ok(), "{}: {}", golden.name, checked.unwrap_err());
        }
    }

    #[test]
    fn content_never_carries_a_marker(picks in prop::collection::vec(any::<usize>(), 0..24)) {
        // Goldens whose content keeps a marker on purpose (malformed blocks,
        // a think block that talks about tags) are not about leaks.
        for golden in goldens().iter().filter(|g| !MARKERS.iter().any(|m| g.content.contains(m))) {
            let pieces = split(&golden.text, &picks);
            for delta in stream_deltas(format_named(&golden.format), &pieces) {
                if let StreamDelta::Content(text) = delta {
                    prop_assert!(
                        !MARKERS.iter().any(|m| text.contains(m)),
                        "{}: {text:?} from {pieces:?}", golden.name
                    );
                }
            }
        }
    }

    #[test]
    fn any_text_streams_like_parse(
        format in prop::sample::select(vec![
            ToolCallFormat::Hermes,
            ToolCallFormat::Llama3,
            ToolCallFormat::MistralNemo,
            ToolCallFormat::MistralV11,
            ToolCallFormat::GenericJson,
        ]),
        parts in prop::collection::vec(prop::sample::select(vec![
            "<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[TOOL",
            "<|python_tag|>", "<|py", "<think>", "</think>", "```", "```json\n", "{", "}", "[", "]",
            "\"name\"", "\"arguments\"", "\"parameters\"", "\"tool_calls\"", ":", ",", "\"f\"",
            "\"é\\\"\"", "\\", "1", " ", "\n", ";", "get_weather", "ü", "x1",
            r#"{"name": "f", "arguments": {"a": "}"}}"#, r#"{"a": 1}"#, "[TOOL_CALLS]f[ARGS]", "[TOOL_CALLS][",
        ]), 0..40),
        picks in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let text = parts.concat();
        let checked = check_split(format, &text, &split(&text, &picks));
        prop_assert!(checked.is_ok(), "{text:?}: {}", checked.unwrap_err());
    }
}

#[test]
fn detects_the_real_templates() {
    let cases = [
        ("qwen25", ToolCallFormat::Hermes),
        ("qwen3", ToolCallFormat::Hermes),
        ("llama31", ToolCallFormat::Llama3),
        ("mistral_nemo", ToolCallFormat::MistralNemo),
        ("mistral_small32", ToolCallFormat::MistralV11),
        ("gemma3", ToolCallFormat::GenericJson),
    ];
    for (name, format) in cases {
        let path = PathBuf::from(SHARED).join(format!("{name}.jinja"));
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(ToolCallFormat::detect(&source), format, "{name}");
    }
}

/// What each template renders for an assistant turn with a call must parse
/// back to that call: the syntax we parse is the one the model was taught.
#[test]
fn parses_the_templates_own_rendering_of_a_call() {
    let cases = [
        ("qwen25", "<|im_start|>assistant\n", "<|im_end|>"),
        ("qwen3", "<|im_start|>assistant\n", "<|im_end|>"),
        (
            "llama31",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
        ("mistral_nemo", "[/INST]", "<EOS>"),
        ("mistral_small32", "[/INST]", "<EOS>"),
    ];
    for (name, open, close) in cases {
        let dir = PathBuf::from(SHARED);
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let path = dir
            .join("expected")
            .join(format!("{name}__tool_roundtrip.txt"));
        let rendering =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let start = rendering
            .find(open)
            .unwrap_or_else(|| panic!("{name}: no {open:?}"))
            + open.len();
        let end = start + rendering[start..].find(close).unwrap();
        let parsed = parse(ToolCallFormat::detect(&source), &rendering[start..end]);
        assert_eq!(parsed.content, "", "{name}");
        let calls: Vec<(&str, &str)> = parsed
            .tool_calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            [("get_weather", r#"{"city":"Paris","unit":"celsius"}"#)],
            "{name}"
        );
    }
}

#[test]
fn default_ids_look_like_openai_ids_and_differ() {
    let text =
        r#"{"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}"#;
    let mut ids: Vec<String> = parse(ToolCallFormat::GenericJson, text)
        .tool_calls
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.extend(
        parse(ToolCallFormat::GenericJson, text)
            .tool_calls
            .into_iter()
            .map(|c| c.id),
    );
    for id in &ids {
        let tail = id.strip_prefix("call_").unwrap_or_else(|| panic!("{id}"));
        assert!(
            tail.len() == 24 && tail.chars().all(|c| c.is_ascii_alphanumeric()),
            "{id}"
        );
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

#[test]
fn stream_deltas_arrive_as_soon_as_they_are_certain() {
    let mut stream = ToolCallStream::with_id_source(ToolCallFormat::Hermes, counting_ids());
    assert_eq!(
        stream.push("Checking"),
        [StreamDelta::Content("Checking".into())]
    );
    // Could be the start of a marker, or trailing whitespace before a call.
    assert_eq!(
        stream.push(" now.\n<tool"),
        [StreamDelta::Content(" now.".into())]
    );
    assert_eq!(
        stream.push(r#"_call>{"name": "f", "arguments": {"a": [1, 2]"#),
        []
    );
    assert_eq!(
        stream.push("}}</tool_call>"),
        [
            StreamDelta::ToolCallStart {
                index: 0,
                id: format!("call_{:024}", 1),
                name: "f".into()
            },
            StreamDelta::ToolCallArguments {
                index: 0,
                fragment: r#"{"a":[1,2]}"#.into()
            },
        ]
    );
    assert_eq!(stream.finish(), []);
}

#[test]
fn empty_and_whitespace_outputs() {
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3,
        ToolCallFormat::GenericJson,
    ] {
        assert_eq!(parse(format, ""), ParsedOutput::default());
        assert_eq!(parse(format, " \n").content, " \n");
    }
}

#[test]
fn detect_falls_back_to_generic_json() {
    assert_eq!(
        ToolCallFormat::detect("{{ messages }}"),
        ToolCallFormat::GenericJson
    );
    assert_eq!(
        ToolCallFormat::detect("role == 'ipython'"),
        ToolCallFormat::Llama3
    );
}
