//! Renders a GGUF's `tokenizer.chat_template` (Jinja) with minijinja, set up to
//! produce exactly what Python jinja2 produces when `transformers` renders it:
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[loopcontrols])` with `raise_exception`, `strftime_now` and its
//! own `tojson`. Prompts that differ by a byte tokenize differently, so any
//! divergence from the reference renderer shows up as degraded model output.

use std::fmt::Write as _;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{merge_maps, Serde, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use serde::Serialize;

/// The template's name inside its private environment.
const NAME: &str = "chat_template";
/// Context variable that carries the render's clock to `strftime_now`; the
/// environment is shared between renders, so the clock cannot live in it.
const NOW_VAR: &str = "__chat_template_now";

#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// A render failure; `raise_exception` messages are carried verbatim since
    /// they are the template author's words meant for the API client.
    #[error("{0}")]
    Render(String),
}

/// What to render: OpenAI-style messages (normalized), optional tools, options.
pub struct RenderInput<'a> {
    pub messages: &'a [serde_json::Value],
    pub tools: Option<&'a [serde_json::Value]>,
    pub add_generation_prompt: bool,
    /// Extra template variables (e.g. `enable_thinking`); the fixed variables
    /// above win on a name clash.
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// A compiled Hugging Face chat template (Jinja) as stored in a GGUF's
/// `tokenizer.chat_template`; compile once per model, render per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    supports_tools: bool,
    tool_call_format: super::ToolCallFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("supports_tools", &self.supports_tools)
            .finish_non_exhaustive()
    }
}

/// The variables every template sees, as `transformers` passes them.
#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [serde_json::Value],
    // `None` becomes Python's `None`, which templates test with `is not none`.
    tools: Option<&'a [serde_json::Value]>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
    #[serde(rename = "__chat_template_now")]
    now: String,
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
        // jinja2's default `Undefined`: missing keys are falsy and print as
        // nothing, but looking up an attribute *of* an undefined value fails.
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // Chat prompts are plain text; HTML escaping would corrupt them.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Templates call Python methods: `.startswith`, `.strip`, `.items()`, ...
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // minijinja calls `none` iterable, Python does not: Gemma 3 relies on it
        // to reject `content: None` with "Invalid content type".
        env.add_test("iterable", |v: &Value| !v.is_none() && v.try_iter().is_ok());
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Replaces the built-in, which HTML-escapes `<>&'` inside tool schemas.
        env.add_filter("tojson", super::pyjson::tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        let supports_tools = env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(describe(&e)))?
            .undeclared_variables(false)
            .contains("tools");
        // A template that cannot show tools to the model cannot teach it a
        // syntax either: such models are asked for the generic JSON form.
        let tool_call_format = if supports_tools {
            super::ToolCallFormat::detect(source)
        } else {
            super::ToolCallFormat::GenericJson
        };
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            supports_tools,
            tool_call_format,
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template reads the `tools` variable, i.e. can present tool
    /// definitions to the model itself.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// Whether the model thinks in a `<think>` block before it answers.
    pub fn thinks(&self) -> bool {
        super::template_thinks(&self.source)
    }

    /// How this model writes tool calls.
    pub fn tool_call_format(&self) -> super::ToolCallFormat {
        self.tool_call_format
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<String, TemplateError> {
        self.render_at(input, chrono::Local::now())
    }

    /// Same as [`render`](Self::render) but with a fixed "now" for
    /// `strftime_now`, so tests can pin the clock.
    pub fn render_at(
        &self,
        input: &RenderInput<'_>,
        now: chrono::DateTime<chrono::Local>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        let context = Value::from(Serde(Context {
            messages: input.messages,
            tools: input.tools,
            add_generation_prompt: input.add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            // RFC 3339 keeps the caller's UTC offset, so `%z`/`%H` stay local.
            now: now.to_rfc3339(),
        }));
        // In `merge_maps` the last map wins, so extras cannot override these.
        let context = match input.extra {
            Some(extra) => merge_maps([Value::from(Serde(extra)), context]),
            None => context,
        };
        template
            .render(context)
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// Marks an error as the template's own `raise_exception`, so its message can
/// be told apart from minijinja's errors however deep it was raised.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

fn describe(error: &Error) -> String {
    let mut chain: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = chain {
        if let Some(raised) = current.downcast_ref::<Raised>() {
            return raised.0.clone();
        }
        chain = current.source();
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        let _ = write!(message, ": {inner}");
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(Raised(message)))
}

fn strftime_now(state: &State, format: &str) -> Result<Value, Error> {
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| v.as_str().map(chrono::DateTime::parse_from_rfc3339))
        .and_then(Result::ok)
        .unwrap_or_else(|| chrono::Local::now().fixed_offset());
    let mut out = String::new();
    // chrono reports an unknown specifier as a fmt error rather than panicking
    // only when written through `write!`, not through `to_string()`.
    write!(out, "{}", now.format(format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Normalizes OpenAI wire messages for templates as llama.cpp does: an
/// assistant turn's `content: null` (or missing, as with tool calls) becomes
/// `""`, since templates such as Qwen 3's fail on None (in Python too); and
/// tool-call `arguments` sent as a JSON string become the object templates
/// iterate over. Arguments that do not parse to an object stay as sent, so the
/// model sees what the client wrote.
pub fn normalize_messages(messages: &mut [serde_json::Value]) {
    for message in messages {
        let Some(object) = message.as_object_mut() else {
            continue;
        };
        let is_assistant = object.get("role").and_then(|r| r.as_str()) == Some("assistant");
        if is_assistant && object.get("content").is_none_or(serde_json::Value::is_null) {
            object.insert("content".into(), "".into());
        }
        let Some(calls) = object.get_mut("tool_calls").and_then(|c| c.as_array_mut()) else {
            continue;
        };
        for call in calls {
            let Some(arguments) = call.pointer_mut("/function/arguments") else {
                continue;
            };
            let parsed = arguments
                .as_str()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok());
            if let Some(parsed @ serde_json::Value::Object(_)) = parsed {
                *arguments = parsed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use chrono::TimeZone;
    use serde_json::{json, Value as Json};

    use super::*;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/templates");

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The day the references were rendered (mistral_small32 prints the date).
    fn reference_day() -> chrono::DateTime<chrono::Local> {
        chrono::Local
            .with_ymd_and_hms(2026, 11, 22, 12, 0, 0)
            .unwrap()
    }

    fn render(
        template: &ChatTemplate,
        messages: &[Json],
        tools: Option<&Json>,
        extra: &Json,
    ) -> Result<String, TemplateError> {
        let input = RenderInput {
            messages,
            tools: tools.and_then(Json::as_array).map(Vec::as_slice),
            add_generation_prompt: true,
            extra: extra.as_object(),
        };
        template.render_at(&input, reference_day())
    }

    /// Every template x case against Python jinja2's rendering. With
    /// `normalize` the inputs first go through [`normalize_messages`] as the
    /// server does; null assistant content then renders exactly as "" does, so
    /// the `_null` case must match the plain `tool_roundtrip` reference.
    fn check_golden(normalize: bool) {
        let dir = PathBuf::from(SHARED);
        assert!(
            dir.join("cases.json").is_file(),
            "reference templates missing: no cases.json in {SHARED}"
        );
        let cases: serde_json::Map<String, Json> =
            serde_json::from_str(&read(&dir.join("cases.json"))).unwrap();
        let (mut compared, mut failures) = (0, Vec::new());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "jinja") {
                continue;
            }
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let source = read(&path);
            let template = ChatTemplate::new(&source, "<BOS>", "<EOS>")
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for (case_name, case) in &cases {
                let reference = match case_name.strip_suffix("_null") {
                    Some(base) if normalize => base,
                    _ => case_name,
                };
                let expected = read(
                    &dir.join("expected")
                        .join(format!("{name}__{reference}.txt")),
                );
                let mut messages = case["messages"].as_array().unwrap().clone();
                if normalize {
                    normalize_messages(&mut messages);
                }
                compared += 1;
                let problem = match (
                    expected.strip_prefix("ERROR:"),
                    render(&template, &messages, case.get("tools"), &Json::Null),
                ) {
                    (None, Ok(text)) if text == expected => continue,
                    (None, Ok(text)) => {
                        format!("differs\n--- expected\n{expected}\n--- got\n{text}")
                    }
                    (None, Err(e)) => format!("failed: {e}"),
                    (Some(_), Ok(_)) => "rendered, but Python raised".into(),
                    // A message from the template's own raise_exception must match
                    // verbatim; Python's internal errors (TypeError) need only fail.
                    (Some(message), Err(TemplateError::Render(got)))
                        if source.contains(message.trim()) && got != message.trim() =>
                    {
                        format!("error {got:?}, expected {message:?}")
                    }
                    (Some(_), Err(TemplateError::Render(_))) => continue,
                    (Some(_), Err(e)) => format!("wrong error kind: {e}"),
                };
                failures.push(format!("{name}__{case_name}: {problem}"));
            }
        }
        assert_eq!(
            compared, 30,
            "expected six templates x five cases in {SHARED}"
        );
        assert!(
            failures.is_empty(),
            "{} of {compared} renderings differ from Python jinja2:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    #[test]
    fn golden_renderings_match_python_jinja2() {
        check_golden(false);
    }

    #[test]
    fn golden_renderings_match_after_normalization() {
        check_golden(true);
    }

    #[test]
    fn supports_tools_follows_the_template() {
        for (name, expected) in [("gemma3", false), ("qwen3", true), ("mistral_nemo", true)] {
            let source = read(&Path::new(SHARED).join(format!("{name}.jinja")));
            assert_eq!(
                ChatTemplate::new(&source, "", "").unwrap().supports_tools(),
                expected,
                "{name}"
            );
        }
    }

    fn render_str(source: &str) -> Result<String, TemplateError> {
        let extra = json!({
            "x": {"s": "<a href='x'>&°C", "n": [1, 2.5, null]},
            "y": {"b": 1, "a": {"d": 1, "c": 2}},
            "enable_thinking": false,
            "bos_token": "extras cannot override this",
        });
        let template = ChatTemplate::new(source, "<s>", "</s>")?;
        render(
            &template,
            &[json!({"role": "user", "content": "hi"})],
            None,
            &extra,
        )
    }

    /// jinja2 as transformers configures it, feature by feature.
    #[test]
    fn renders_like_transformers_jinja2() {
        for (source, expected) in [
            // Lenient undefined: a missing key is falsy, prints and iterates as nothing.
            ("{% if messages[0]['nope'] %}y{% else %}n{% endif %}[{{ nope }}]{% for i in nope %}i{% endfor %}", "n[]"),
            // The built-in `tojson` would HTML-escape tool descriptions.
            ("{{ x | tojson }}", r#"{"s": "<a href='x'>&°C", "n": [1, 2.5, null]}"#),
            ("{{ tools is none }} {{ none is iterable }} {{ 'ab' is iterable }}", "True False True"),
            ("{{ bos_token }}{{ enable_thinking }}|{{ add_generation_prompt }}", "<s>False|True"),
            ("{{ strftime_now('%Y-%m-%d %H:%M') }}/{{ strftime_now('%d %b %Y') }}", "2026-11-22 12:00/22 Nov 2026"),
            ("{{ ' x '.strip() }}{{ 'abc'.startswith('a') }}{% for k, v in y.a.items() %}{{ k }}={{ v }}{% endfor %}{{ y.get('z', '-') }}", "xTrued=1c=2-"),
            ("{% for i in [1, 2, 3] %}\n  {% if i == 2 %}\n    {% continue %}\n  {% endif %}\n{{ i }}\n{% endfor %}", "1\n3\n"),
        ] {
            assert_eq!(render_str(source).unwrap(), expected, "{source}");
        }
    }

    #[test]
    fn errors_are_reported() {
        let raise = "{% macro m() %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endmacro %}{{ m() }}";
        let err = render_str(raise).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Render(m) if m == "Only user and assistant roles are supported!"),
            "{err:?}"
        );
        let err = render_str("{{ messages.nope.deeper }}").unwrap_err();
        assert!(err.to_string().contains("undefined"), "{err}");
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(TemplateError::Compile(_))
        ));
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn normalize_fills_null_content_and_parses_string_arguments() {
        let call =
            |args: Json| json!({"type": "function", "function": {"name": "f", "arguments": args}});
        let mut messages = vec![
            json!({"role": "assistant", "content": null, "tool_calls": [
                call(json!("{\"a\": 1}")), call(json!("not json")), call(json!("[1]")), call(json!({"b": 2}))
            ]}),
            json!({"role": "assistant", "tool_calls": []}),
            json!({"role": "user", "content": null}),
        ];
        normalize_messages(&mut messages);
        let args: Vec<_> = messages[0]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["function"]["arguments"])
            .collect();
        assert_eq!(
            args,
            [
                &json!({"a": 1}),
                &json!("not json"),
                &json!("[1]"),
                &json!({"b": 2})
            ]
        );
        assert_eq!(messages[0]["content"], "");
        assert_eq!(messages[1]["content"], "");
        // Only assistant turns: a user's null content is the client's error to see.
        assert_eq!(messages[2]["content"], Json::Null);
    }
}
