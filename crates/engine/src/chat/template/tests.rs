use std::path::PathBuf;

use chrono::TimeZone;
use serde_json::{json, Value};

use super::*;

fn templates_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/templates"
    ));
    assert!(
        dir.join("cases.json").is_file(),
        "shared templates missing at {}",
        dir.display()
    );
    dir
}

/// The day the reference renderings were made (mistral_small32 prints today's date).
fn reference_day() -> chrono::DateTime<chrono::Local> {
    chrono::Local
        .with_ymd_and_hms(2026, 11, 22, 12, 0, 0)
        .unwrap()
}

fn render_case(
    template: &ChatTemplate,
    case: &Value,
    normalize: bool,
) -> Result<String, TemplateError> {
    let mut messages = case["messages"].as_array().unwrap().clone();
    if normalize {
        normalize_messages(&mut messages);
    }
    let tools = case.get("tools").and_then(Value::as_array).cloned();
    template.render_at(
        &RenderInput {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: true,
            extra: None,
        },
        reference_day(),
    )
}

/// Every template × case renders byte-identically to Python jinja2 (as transformers
/// configures it), or fails where Python fails, with the template's own message.
#[test]
fn golden_renderings_match_python_jinja2() {
    let dir = templates_dir();
    let cases: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut compared = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jinja") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let template =
            ChatTemplate::new(&std::fs::read_to_string(&path).unwrap(), "<BOS>", "<EOS>")
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (case_name, case) in &cases {
            let expected = std::fs::read_to_string(
                dir.join("expected")
                    .join(format!("{name}__{case_name}.txt")),
            )
            .unwrap();
            // The references render raw inputs: compare without normalization.
            let got = render_case(&template, case, false);
            compared += 1;
            match (expected.strip_prefix("ERROR: "), got) {
                (None, Ok(text)) if text == expected => {}
                (None, Ok(text)) => failures.push(format!("{name}/{case_name}: rendering differs\n--- expected\n{expected}\n--- got\n{text}")),
                (None, Err(e)) => failures.push(format!("{name}/{case_name}: failed: {e}")),
                (Some(_), Ok(_)) => failures.push(format!("{name}/{case_name}: rendered but Python raised")),
                (Some(message), Err(TemplateError::Render(got))) => {
                    // raise_exception messages are the template's own words; other
                    // failures (a Python TypeError) only need to fail.
                    if message.starts_with("Conversation roles") || message.starts_with("After the optional") {
                        if got.trim() != message.trim() {
                            failures.push(format!("{name}/{case_name}: error {got:?}, expected {message:?}"));
                        }
                    }
                }
                (Some(_), Err(e)) => failures.push(format!("{name}/{case_name}: wrong error kind {e}")),
            }
        }
    }
    assert_eq!(compared, 30, "six templates x five cases");
    assert!(
        failures.is_empty(),
        "{} of {compared} differ:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// After normalization an assistant turn with `content: null` renders as with "".
#[test]
fn normalized_null_content_renders_like_empty() {
    let dir = templates_dir();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let source = std::fs::read_to_string(dir.join("qwen3.jinja")).unwrap();
    let template = ChatTemplate::new(&source, "<BOS>", "<EOS>").unwrap();
    let null = render_case(&template, &cases["tool_roundtrip_null"], true).unwrap();
    let empty = render_case(&template, &cases["tool_roundtrip"], true).unwrap();
    assert_eq!(null, empty);
}

#[test]
fn normalize_parses_string_arguments() {
    let mut messages = vec![json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
    ]})];
    normalize_messages(&mut messages);
    assert_eq!(messages[0]["content"], "");
    assert_eq!(
        messages[0]["tool_calls"][0]["function"]["arguments"],
        json!({"a": 1})
    );
    assert_eq!(
        messages[0]["tool_calls"][1]["function"]["arguments"],
        "not json"
    );
}

#[test]
fn tojson_is_python_json_dumps_without_html_escaping() {
    let t = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':')) }}|{{ y | tojson(sort_keys=true) }}",
        "",
        "",
    )
    .unwrap();
    let messages = [];
    let extra = json!({"x": {"s": "<a href='x'>&°C</a>", "n": [1, 2.5, null, true]}, "y": {"b": 1, "a": {"d": 1, "c": 2}}});
    let out = t
        .render(&RenderInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: false,
            extra: extra.as_object(),
        })
        .unwrap();
    assert_eq!(
        out,
        "{\"s\": \"<a href='x'>&°C</a>\", \"n\": [1, 2.5, null, true]}|{\n  \"s\": \"<a href='x'>&°C</a>\",\n  \"n\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}|{\"s\":\"<a href='x'>&°C</a>\",\"n\":[1,2.5,null,true]}|{\"a\": {\"c\": 2, \"d\": 1}, \"b\": 1}"
    );
}

#[test]
fn raise_exception_message_is_kept_verbatim() {
    let t = ChatTemplate::new(
        "{{ raise_exception('Only user and assistant roles are supported!') }}",
        "",
        "",
    )
    .unwrap();
    let err = t
        .render(&RenderInput {
            messages: &[],
            tools: None,
            add_generation_prompt: true,
            extra: None,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Only user and assistant roles are supported!"
    );
}

#[test]
fn a_broken_template_is_a_compile_error() {
    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(TemplateError::Compile(_))
    ));
}
