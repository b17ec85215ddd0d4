//! Renders a GGUF's `tokenizer.chat_template` (Jinja) with minijinja, configured
//! to match Python jinja2 as `transformers` sets it up: trim_blocks,
//! lstrip_blocks, loop controls, Python string/dict methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that behaves like `json.dumps(ensure_ascii=False)`.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

/// The template's name inside its environment.
const NAME: &str = "chat_template";
/// Context variable carrying the render's clock, read by `strftime_now`.
const NOW_VAR: &str = "__llmservice_now";

#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("{0}")]
    Render(String),
}

/// What to render: OpenAI-style messages (normalized), optional tools, options.
pub struct RenderInput<'a> {
    pub messages: &'a [serde_json::Value],
    pub tools: Option<&'a [serde_json::Value]>,
    pub add_generation_prompt: bool,
    /// Extra template variables (e.g. `enable_thinking`).
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// A compiled chat template; compile once per model, render per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    supports_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("supports_tools", &self.supports_tools)
            .finish()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            supports_tools: source.contains("tools"),
        })
    }

    /// Whether the template renders tool definitions itself.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<String, TemplateError> {
        self.render_at(input, chrono::Local::now())
    }

    /// Renders with a fixed clock for `strftime_now` (tests pin it).
    pub fn render_at(
        &self,
        input: &RenderInput<'_>,
        now: chrono::DateTime<chrono::Local>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        let mut context = serde_json::Map::new();
        if let Some(extra) = input.extra {
            context.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        context.insert("messages".into(), input.messages.to_vec().into());
        context.insert(
            "tools".into(),
            input.tools.map_or(serde_json::Value::Null, |t| t.to_vec().into()),
        );
        context.insert("add_generation_prompt".into(), input.add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        context.insert(NOW_VAR.into(), now.timestamp().into());
        // JSON null becomes Python's None, which templates test with `is not none`.
        let value = Value::from(minijinja::value::Serde(&context));
        template.render(value).map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// `raise_exception(msg)` errors keep the template's message verbatim; others
/// carry minijinja's description.
fn describe(error: &Error) -> String {
    if error.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = error.detail() {
            return detail.to_owned();
        }
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(state: &State, format: String) -> Result<Value, Error> {
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .and_then(|ts| chrono::DateTime::from_timestamp(ts, 0))
        .map(|utc| utc.with_timezone(&chrono::Local))
        .unwrap_or_else(chrono::Local::now);
    let mut out = String::new();
    use std::fmt::Write;
    write!(out, "{}", now.format(&format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("bad strftime format {format:?}")))?;
    Ok(Value::from(out))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`.
/// minijinja's built-in `tojson` HTML-escapes `<>&'`, which would corrupt tool prompts.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair"));
        }
        // Python's defaults: ", " without indent, "," with it.
        None => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
    };
    let mut json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        sort_all_keys(&mut json);
    }
    let mut out = Vec::new();
    let formatter = PyFormatter {
        indent: indent.map(|n| " ".repeat(n)),
        item_sep,
        key_sep,
        depth: 0,
        has_value: false,
    };
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    json.serialize(&mut serializer)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

fn sort_all_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut v) in entries {
                sort_all_keys(&mut v);
                map.insert(k, v);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_all_keys),
        _ => {}
    }
}

/// Writes JSON with Python's separators and indentation. Written by hand because
/// serde_json's formatters only produce `,`/`:` (compact) or its own pretty style.
struct PyFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    depth: usize,
    has_value: bool,
}

impl PyFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn begin<W: ?Sized + std::io::Write>(&mut self, w: &mut W, open: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + std::io::Write>(&mut self, w: &mut W, close: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(close)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            let sep = if self.indent.is_some() {
                self.item_sep.trim_end()
            } else {
                &self.item_sep
            };
            w.write_all(sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// Normalizes OpenAI wire messages for templates as llama.cpp does: an assistant
/// turn's `content: null` becomes `""` (Qwen 3's template fails on null, in Python
/// too), and tool-call `arguments` sent as a JSON string become an object.
pub fn normalize_messages(messages: &mut [serde_json::Value]) {
    for message in messages {
        let Some(object) = message.as_object_mut() else { continue };
        if object.get("content").is_none_or(serde_json::Value::is_null)
            && object.get("role").and_then(|r| r.as_str()) == Some("assistant")
        {
            object.insert("content".into(), "".into());
        }
        let Some(calls) = object.get_mut("tool_calls").and_then(|c| c.as_array_mut()) else {
            continue;
        };
        for call in calls {
            let Some(arguments) = call.pointer_mut("/function/arguments") else { continue };
            if let Some(text) = arguments.as_str() {
                if let Ok(parsed) = serde_json::from_str::<serde_json::Value>(text) {
                    *arguments = parsed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
