//! The call syntaxes themselves: what a block of text at a marker (or at a
//! bare `{`) amounts to, decided only once the text settles it.

use serde_json::Value;

use super::{
    ToolCallFormat, FENCE, HERMES_CLOSE, HERMES_OPEN, MISTRAL_ARGS, MISTRAL_CALLS, MISTRAL_CALL_ID,
    PYTHON_TAG,
};

pub(super) enum Attempt {
    /// The text so far could still become a call or not.
    NeedMore,
    /// Not a call: its opening marker, if any, is plain text.
    Fail,
    Found {
        calls: Vec<(String, String)>,
        consumed: usize,
        close: Option<&'static str>,
    },
}

/// `<tool_call>` ws `{"name": .., "arguments": ..}`; the closing tag is
/// optional (the model may stop right after the JSON).
pub(super) fn attempt_hermes(buf: &str, scan: &mut Option<Scan>) -> Attempt {
    let at = skip_ws(buf, HERMES_OPEN.len());
    json_calls(buf, at, b"{", scan, Some(HERMES_CLOSE))
}

/// `[TOOL_CALLS]` then either Nemo's JSON list or v11's `name[ARGS]{..}`;
/// both are accepted for both, as fine-tunes mix them up.
pub(super) fn attempt_mistral(buf: &str, scan: &mut Option<Scan>) -> Attempt {
    let at = skip_ws(buf, MISTRAL_CALLS.len());
    match buf.as_bytes().get(at) {
        None => return Attempt::NeedMore,
        Some(b'[' | b'{') => return json_calls(buf, at, b"[{", scan, None),
        Some(_) => {}
    }
    let is_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut i = buf[at..]
        .find(|c| !is_name(c))
        .map_or(buf.len(), |n| at + n);
    if i == buf.len() {
        return Attempt::NeedMore;
    }
    let name = &buf[at..i];
    if name.is_empty() {
        return Attempt::Fail;
    }
    match tag_at(buf, i, MISTRAL_CALL_ID) {
        Tag::Partial => return Attempt::NeedMore,
        Tag::Absent => {}
        // The model's id is dropped: ours must be unique within the response.
        Tag::At(id) => {
            i = buf[id..]
                .find(|c: char| !c.is_ascii_alphanumeric())
                .map_or(buf.len(), |n| id + n);
        }
    }
    let args = match tag_at(buf, i, MISTRAL_ARGS) {
        Tag::Partial => return Attempt::NeedMore,
        Tag::Absent => return Attempt::Fail,
        Tag::At(args) => skip_ws(buf, args),
    };
    match json_at(buf, args, b"{", scan) {
        Step::More => Attempt::NeedMore,
        Step::Fail => Attempt::Fail,
        Step::Done(value, end) => match arguments_text(&value) {
            Some(arguments) => Attempt::Found {
                calls: vec![(name.to_owned(), arguments)],
                consumed: end,
                close: None,
            },
            None => Attempt::Fail,
        },
    }
}

/// A bare object, after `<|python_tag|>` (Llama) or in a fence (generic).
pub(super) fn attempt_bare(format: ToolCallFormat, buf: &str, scan: &mut Option<Scan>) -> Attempt {
    let (mut at, mut close) = (0, None);
    if format == ToolCallFormat::Llama3 && buf.starts_with(PYTHON_TAG) {
        at = PYTHON_TAG.len();
    } else if format == ToolCallFormat::GenericJson && buf.starts_with(FENCE) {
        let lang = buf[FENCE.len()..].find(|c: char| !c.is_ascii_alphabetic());
        let Some(lang) = lang else {
            return Attempt::NeedMore;
        };
        (at, close) = (FENCE.len() + lang, Some(FENCE));
    }
    json_calls(buf, skip_ws(buf, at), b"{", scan, close)
}

fn json_calls(
    buf: &str,
    at: usize,
    opens: &[u8],
    scan: &mut Option<Scan>,
    close: Option<&'static str>,
) -> Attempt {
    match json_at(buf, at, opens, scan) {
        Step::More => Attempt::NeedMore,
        Step::Fail => Attempt::Fail,
        Step::Done(value, end) => match calls_from_value(&value) {
            Some(calls) => Attempt::Found {
                calls,
                consumed: end,
                close,
            },
            None => Attempt::Fail,
        },
    }
}

/// The calls a JSON value stands for: a list of calls, `{"tool_calls": [..]}`,
/// or one call object.
fn calls_from_value(value: &Value) -> Option<Vec<(String, String)>> {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        Value::Object(object) => match object.get("tool_calls") {
            Some(Value::Array(items)) => items.as_slice(),
            Some(_) => return None,
            None => std::slice::from_ref(value),
        },
        _ => return None,
    };
    if items.is_empty() {
        return None;
    }
    items.iter().map(call_from_value).collect()
}

fn call_from_value(value: &Value) -> Option<(String, String)> {
    let object = value.as_object()?;
    // OpenAI's own shape nests the call under "function".
    let object = match object.get("function") {
        Some(Value::Object(function)) => function,
        _ => object,
    };
    let name = object.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    // Llama's template asks for "parameters"; everyone else says "arguments".
    let arguments = object
        .get("arguments")
        .or_else(|| object.get("parameters"))?;
    Some((name.to_owned(), arguments_text(arguments)?))
}

/// Compact JSON text of an arguments object.
fn arguments_text(value: &Value) -> Option<String> {
    match value {
        Value::Object(_) => serde_json::to_string(value).ok(),
        // OpenAI's shape (and some fine-tunes) carry the object as a string.
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(inner @ Value::Object(_)) => serde_json::to_string(&inner).ok(),
            _ => None,
        },
        Value::Null => Some("{}".to_owned()),
        _ => None,
    }
}

enum Step {
    More,
    Fail,
    Done(Value, usize),
}

/// The JSON value at `buf[at..]`, which must open with one of `opens`.
fn json_at(buf: &str, at: usize, opens: &[u8], scan: &mut Option<Scan>) -> Step {
    match buf.as_bytes().get(at) {
        None => return Step::More,
        Some(byte) if opens.contains(byte) => {}
        Some(_) => return Step::Fail,
    }
    let Some(end) = scan_json(buf, at, scan) else {
        return Step::More;
    };
    match serde_json::from_str(&buf[at..end]) {
        Ok(value) => Step::Done(value, end),
        Err(_) => Step::Fail,
    }
}

/// Where a streamed JSON value stands: kept between pushes so that a long
/// call is scanned once, not once per fragment.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scan {
    start: usize,
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

/// End of the object or array opening at `buf[start]`, once it has closed.
/// Only brackets outside strings are counted; serde_json judges the rest.
fn scan_json(buf: &str, start: usize, scan: &mut Option<Scan>) -> Option<usize> {
    if scan.as_ref().is_none_or(|s| s.start != start) {
        *scan = Some(Scan {
            start,
            pos: start,
            depth: 0,
            in_string: false,
            escaped: false,
        });
    }
    let s = scan.as_mut()?;
    let bytes = buf.as_bytes();
    while let Some(&byte) = bytes.get(s.pos) {
        s.pos += 1;
        if s.in_string {
            if s.escaped {
                s.escaped = false;
            } else if byte == b'\\' {
                s.escaped = true;
            } else if byte == b'"' {
                s.in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => s.in_string = true,
            b'{' | b'[' => s.depth += 1,
            b'}' | b']' => {
                // The first byte opened, so depth is at least 1 here.
                s.depth -= 1;
                if s.depth == 0 {
                    return Some(s.pos);
                }
            }
            _ => {}
        }
    }
    None
}

enum Tag {
    At(usize),
    Partial,
    Absent,
}

/// Whether `tag` is at `buf[i..]`: `At` the byte after it, or `Partial` while
/// `buf` ends inside it.
fn tag_at(buf: &str, i: usize, tag: &str) -> Tag {
    let rest = &buf[i..];
    if rest.starts_with(tag) {
        Tag::At(i + tag.len())
    } else if tag.starts_with(rest) {
        Tag::Partial
    } else {
        Tag::Absent
    }
}

fn skip_ws(buf: &str, i: usize) -> usize {
    buf.len() - buf[i..].trim_start().len()
}

/// Length of the longest proper prefix of `marker` that `text` ends with:
/// text that may yet become the marker. Markers are ASCII, so the cut is on a
/// character boundary.
pub(super) fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&n| text.ends_with(&marker[..n]))
        .unwrap_or(0)
}
