//! The six real chat templates rendered with hostile messages, tools and
//! extra variables (any JSON a client could send): an answer or an error,
//! never a panic or a hang.
#![no_main]

use std::sync::OnceLock;

use engine::chat::{normalize_messages, ChatTemplate, RenderInput};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/templates");
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
            .collect();
        paths.sort();
        assert!(paths.len() >= 6, "the six templates of ../shared/templates");
        paths
            .iter()
            .map(|p| {
                let source = std::fs::read_to_string(p).unwrap();
                ChatTemplate::new(&source, "<s>", "</s>").unwrap()
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let Ok(value) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    // {"messages": [...], "tools": [...], "extra": {...}} or a bare message list.
    let (mut messages, tools, extra) = match value {
        Value::Array(messages) => (messages, None, None),
        Value::Object(mut map) => {
            let messages = match map.remove("messages") {
                Some(Value::Array(m)) => m,
                _ => return,
            };
            let tools = match map.remove("tools") {
                Some(Value::Array(t)) => Some(t),
                _ => None,
            };
            let extra = match map.remove("extra") {
                Some(Value::Object(e)) => Some(e),
                _ => None,
            };
            (messages, tools, extra)
        }
        _ => return,
    };
    normalize_messages(&mut messages);
    let templates = templates();
    let template = &templates[usize::from(*pick) % templates.len()];
    let _ = template.render(&RenderInput {
        messages: &messages,
        tools: tools.as_deref(),
        add_generation_prompt: pick & 0x80 != 0,
        extra: extra.as_ref(),
    });
});
