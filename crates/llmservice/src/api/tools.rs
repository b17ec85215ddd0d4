//! Structured output and tools for chat: reading `response_format`, `grammar`,
//! `tools`/`tool_choice` and the legacy `functions`/`function_call` into what
//! the engine needs (a constraint, the tools the template shows), and shaping
//! parsed tool calls into OpenAI's wire form.

use engine::chat::{ToolCall, ToolCallFormat};
use engine::Constraint;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::functions;
use super::types::ChatCompletionRequest;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The request's tools, checked.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub specs: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// Asked with `functions`: answer with `function_call`.
    pub legacy: bool,
    /// Run calls of built-in functions here and continue the conversation.
    pub execute_builtins: bool,
    /// The built-ins this server added to the tools (a client tool of the same
    /// name is the client's, and its calls go back to the client).
    pub server_side: Vec<&'static str>,
}

impl ToolPlan {
    /// The built-in that runs here for a call of `name`, if the server offered it.
    pub fn builtin(&self, name: &str) -> Option<&'static functions::Builtin> {
        self.server_side
            .contains(&name)
            .then(|| functions::find(name))
            .flatten()
    }

    /// Whether the model is offered tools at all (`tool_choice: none` hides them).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// Tools in OpenAI's request shape, as chat templates read them.
    pub fn template_tools(&self) -> Vec<Value> {
        self.specs
            .iter()
            .map(|s| {
                let mut function = Map::new();
                function.insert("name".into(), s.name.clone().into());
                if let Some(d) = &s.description {
                    function.insert("description".into(), d.clone().into());
                }
                function.insert("parameters".into(), s.parameters.clone());
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// The tools a constrained call may use.
    fn allowed(&self) -> Vec<&ToolSpec> {
        match &self.choice {
            ToolChoice::Named(name) => self.specs.iter().filter(|s| &s.name == name).collect(),
            _ => self.specs.iter().collect(),
        }
    }

    /// Whether the output must be a call (and so is constrained to one).
    pub fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }
}

const NAME_RULE: &str = "function names are 1 to 64 characters of a-z, A-Z, 0-9, _ and -";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads one function definition (`tools[i].function` or `functions[i]`).
fn read_function(value: &Value, param: &str) -> Result<ToolSpec, ApiError> {
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::invalid(param, "a function must be an object"))?;
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(&format!("{param}.name"), "a function needs a name"))?;
    if !valid_name(name) {
        return Err(ApiError::invalid(
            &format!("{param}.name"),
            format!("invalid function name {name:?}: {NAME_RULE}"),
        ));
    }
    let description = match object.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{param}.description"),
                "description must be a string",
            ))
        }
    };
    let parameters = match object.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{param}.parameters"),
                "parameters must be a JSON schema object",
            ))
        }
    };
    Ok(ToolSpec {
        name: name.to_owned(),
        description,
        parameters,
    })
}

/// Reads `tools`/`tool_choice`/`parallel_tool_calls`, or the legacy
/// `functions`/`function_call`, and the built-ins a request opts into.
/// `None` when the request offers no tools.
pub fn plan(req: &ChatCompletionRequest) -> Result<Option<ToolPlan>, ApiError> {
    let tools = req.tools.as_ref().filter(|t| !t.is_empty());
    let legacy_functions = req.functions.as_ref().filter(|f| !f.is_empty());
    if tools.is_some() && legacy_functions.is_some() {
        return Err(ApiError::invalid(
            "functions",
            "send either tools or the legacy functions, not both",
        ));
    }
    let legacy = legacy_functions.is_some() || (tools.is_none() && req.function_call.is_some());
    let mut specs = Vec::new();
    if let Some(tools) = tools {
        for (i, tool) in tools.iter().enumerate() {
            let kind = tool.get("type").and_then(Value::as_str);
            if kind != Some("function") {
                return Err(ApiError::invalid(
                    &format!("tools[{i}].type"),
                    "only tools of type \"function\" are supported",
                ));
            }
            let function = tool.get("function").ok_or_else(|| {
                ApiError::invalid(&format!("tools[{i}].function"), "a tool needs a function")
            })?;
            specs.push(read_function(function, &format!("tools[{i}].function"))?);
        }
    }
    if let Some(functions) = legacy_functions {
        for (i, f) in functions.iter().enumerate() {
            specs.push(read_function(f, &format!("functions[{i}]"))?);
        }
    }
    let execute_builtins = req.execute_builtin_functions.unwrap_or(false);
    let mut server_side = Vec::new();
    if execute_builtins {
        for builtin in functions::registry() {
            if !specs.iter().any(|s| s.name == builtin.name) {
                specs.push(builtin.spec());
                server_side.push(builtin.name);
            }
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(ApiError::invalid(
                if legacy { "functions" } else { "tools" },
                format!("function {:?} is defined twice", spec.name),
            ));
        }
    }
    let (choice_param, choice) = if legacy {
        ("function_call", req.function_call.as_ref())
    } else {
        ("tool_choice", req.tool_choice.as_ref())
    };
    let choice = read_choice(choice, choice_param, legacy)?;
    if specs.is_empty() {
        return match choice {
            None | Some(ToolChoice::None) | Some(ToolChoice::Auto) => Ok(None),
            Some(_) => Err(ApiError::invalid(
                choice_param,
                format!("{choice_param} requires tools to choose from"),
            )),
        };
    }
    let choice = choice.unwrap_or(ToolChoice::Auto);
    if let ToolChoice::Named(name) = &choice {
        if !specs.iter().any(|s| &s.name == name) {
            return Err(ApiError::invalid(
                choice_param,
                format!("{choice_param} names {name:?}, which is not among the offered tools"),
            ));
        }
    }
    Ok(Some(ToolPlan {
        specs,
        choice,
        parallel: !legacy && req.parallel_tool_calls.unwrap_or(true),
        legacy,
        execute_builtins,
        server_side,
    }))
}

fn read_choice(
    value: Option<&Value>,
    param: &str,
    legacy: bool,
) -> Result<Option<ToolChoice>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = || {
        let expected = if legacy {
            "\"none\", \"auto\" or {\"name\": ...}"
        } else {
            "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
        };
        ApiError::invalid(param, format!("{param} must be {expected}"))
    };
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::String(s) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" if !legacy => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Value::Object(o) => {
            let name = if legacy {
                o.get("name")
            } else {
                if o.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad());
                }
                o.get("function").and_then(|f| f.get("name"))
            };
            ToolChoice::Named(name.and_then(Value::as_str).ok_or_else(bad)?.to_owned())
        }
        _ => return Err(bad()),
    }))
}

/// The constraint from `response_format` or `grammar`, if any.
pub fn output_constraint(req: &ChatCompletionRequest) -> Result<Option<Constraint>, ApiError> {
    let format =
        match &req.response_format {
            None | Some(Value::Null) => None,
            Some(Value::Object(format)) => {
                let kind = format.get("type").and_then(Value::as_str);
                match kind {
                    Some("text") => None,
                    Some("json_object") => Some(Constraint::JsonSchema(
                        // llama-cpp-python's extension: a schema next to the type.
                        match format.get("schema") {
                            Some(schema @ Value::Object(_)) => schema.clone(),
                            _ => json!({"type": "object"}),
                        },
                    )),
                    Some("json_schema") => {
                        let schema = format
                            .get("json_schema")
                            .and_then(|s| s.get("schema"))
                            .or_else(|| format.get("schema"));
                        match schema {
                            Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                                Some(Constraint::JsonSchema(schema.clone()))
                            }
                            _ => {
                                return Err(ApiError::invalid(
                                    "response_format.json_schema.schema",
                                    "json_schema needs a schema object",
                                ))
                            }
                        }
                    }
                    _ => return Err(ApiError::invalid(
                        "response_format.type",
                        "response_format type must be \"text\", \"json_object\" or \"json_schema\"",
                    )),
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format must be an object",
                ))
            }
        };
    match (&req.grammar, format) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "grammar",
            "send either grammar or a JSON response_format, not both",
        )),
        (Some(grammar), None) if grammar.trim().is_empty() => {
            Err(ApiError::invalid("grammar", "grammar is empty"))
        }
        (Some(grammar), None) => Ok(Some(Constraint::Gbnf(grammar.clone()))),
        (None, format) => Ok(format),
    }
}

/// How a marker is written in a Lark grammar: by token id when it is one
/// control token of the vocabulary, as text otherwise.
pub type MarkerToken<'a> = &'a dyn Fn(&str) -> Option<i32>;

fn lark_marker(text: &str, control: MarkerToken<'_>) -> String {
    match control(text) {
        Some(id) => format!("<[{id}]>"),
        None => lark_string(text),
    }
}

fn lark_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

fn lark_json(schema: &Value) -> String {
    format!(
        "%json {}",
        serde_json::to_string(&engine::with_json_options(schema)).expect("values serialize")
    )
}

/// One call as a JSON object: `{"name": <one of the tools>, <args_key>: {...}}`.
fn call_schema(allowed: &[&ToolSpec], args_key: &str) -> Value {
    let variants: Vec<Value> = allowed
        .iter()
        .map(|s| {
            json!({
                "type": "object",
                "properties": {"name": {"const": s.name}, args_key: s.parameters},
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    if variants.len() == 1 {
        variants.into_iter().next().expect("one")
    } else {
        json!({"anyOf": variants})
    }
}

/// Most calls one forced answer may hold. Without a bound a small model can
/// repeat calls until `max_tokens` cuts the last one in half; real parallel
/// calls are a handful.
const MAX_PARALLEL_CALLS: usize = 8;

/// How one family writes its calls, as Lark pieces: forced output is `lead
/// first next*`; output that waits for `trigger` continues with `after_trigger
/// first next*`.
struct CallSyntax {
    /// The text that opens a call, for tool_choice auto (`None`: no marker).
    trigger: Option<&'static str>,
    lead: String,
    after_trigger: &'static str,
    /// The first call, after its marker.
    first: String,
    /// Each further call, marker included (`None`: one block holds them all).
    next: Option<String>,
    /// The rules the pieces use.
    rules: String,
}

impl CallSyntax {
    fn grammar(&self, lead: &str, parallel: bool) -> String {
        let next = match &self.next {
            Some(next) if parallel => format!("({next}){{0,{}}}", MAX_PARALLEL_CALLS - 1),
            _ => String::new(),
        };
        format!("start: {lead} {} {next}\n{}", self.first, self.rules)
    }
}

/// The Lark pieces of `format`'s calls of the allowed tools; `None` for the
/// generic JSON form, which has no syntax around its JSON.
fn call_syntax(
    plan: &ToolPlan,
    format: ToolCallFormat,
    control: MarkerToken<'_>,
) -> Option<CallSyntax> {
    let allowed = plan.allowed();
    let syntax = match format {
        ToolCallFormat::Hermes => {
            let (open, close) = (
                lark_marker("<tool_call>", control),
                lark_marker("</tool_call>", control),
            );
            CallSyntax {
                trigger: Some("<tool_call>"),
                lead: format!("{open} \"\\n\""),
                // The newline after the marker may have come with its token.
                after_trigger: "\"\\n\"?",
                first: format!("call \"\\n\" {close}"),
                next: Some(format!("\"\\n\" {open} \"\\n\" call \"\\n\" {close}")),
                rules: format!("call: {}\n", lark_json(&call_schema(&allowed, "arguments"))),
            }
        }
        ToolCallFormat::Llama3 => CallSyntax {
            trigger: Some("<|python_tag|>"),
            lead: String::new(),
            after_trigger: "",
            first: "call".to_owned(),
            next: Some("\"; \" call".to_owned()),
            rules: format!(
                "call: {}\n",
                lark_json(&call_schema(&allowed, "parameters"))
            ),
        },
        ToolCallFormat::MistralNemo => {
            let list = json!({"type": "array", "items": call_schema(&allowed, "arguments"),
                "minItems": 1, "maxItems": if plan.parallel { MAX_PARALLEL_CALLS } else { 1 }});
            CallSyntax {
                trigger: Some("[TOOL_CALLS]"),
                lead: lark_marker("[TOOL_CALLS]", control),
                after_trigger: "",
                first: lark_json(&list),
                next: None,
                rules: String::new(),
            }
        }
        ToolCallFormat::MistralV11 => {
            let alternatives: Vec<String> = allowed
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {}",
                        lark_string(&s.name),
                        lark_marker("[ARGS]", control),
                        lark_json(&s.parameters)
                    )
                })
                .collect();
            let marker = lark_marker("[TOOL_CALLS]", control);
            CallSyntax {
                trigger: Some("[TOOL_CALLS]"),
                lead: marker.clone(),
                after_trigger: "",
                first: "call".to_owned(),
                next: Some(format!("{marker} call")),
                rules: format!("call: {}\n", alternatives.join(" | ")),
            }
        }
        ToolCallFormat::GenericJson => return None,
    };
    Some(syntax)
}

/// The grammar that makes the output a valid call (or calls, with
/// `parallel_tool_calls`) of the allowed tools, in the model family's syntax.
pub fn call_constraint(
    plan: &ToolPlan,
    format: ToolCallFormat,
    control: MarkerToken<'_>,
) -> Constraint {
    if let Some(syntax) = call_syntax(plan, format, control) {
        return Constraint::Lark(syntax.grammar(&syntax.lead, plan.parallel));
    }
    let call = call_schema(&plan.allowed(), "arguments");
    if plan.parallel {
        Constraint::JsonSchema(json!({
            "type": "object",
            "properties": {"tool_calls": {"type": "array", "items": call,
                "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}},
            "required": ["tool_calls"],
            "additionalProperties": false,
        }))
    } else {
        Constraint::JsonSchema(call)
    }
}

/// For `tool_choice: "auto"`: free output until the model opens a call with
/// its family's marker, and from there valid calls of the offered tools only,
/// so a call the model starts is a call the client can run. `None` for
/// syntaxes without a marker (the generic JSON form), which stay free.
pub fn triggered_call_constraint(
    plan: &ToolPlan,
    format: ToolCallFormat,
    control: MarkerToken<'_>,
) -> Option<Constraint> {
    let syntax = call_syntax(plan, format, control)?;
    Some(Constraint::Triggered {
        trigger: syntax.trigger?.to_owned(),
        then: syntax.grammar(syntax.after_trigger, plan.parallel),
    })
}

/// For templates that cannot show tools: the system prompt text that
/// describes them and the generic JSON call form the parser reads.
pub fn generic_tools_prompt(plan: &ToolPlan) -> String {
    let tools: Vec<Value> = plan
        .allowed()
        .iter()
        .map(|s| json!({"name": s.name, "description": s.description, "parameters": s.parameters}))
        .collect();
    let mut text = String::from("You can call these tools:\n");
    for tool in &tools {
        text.push_str(&tool.to_string());
        text.push('\n');
    }
    text.push_str(
        "To call tools, reply with only this JSON and nothing else: \
         {\"tool_calls\": [{\"name\": \"<tool name>\", \"arguments\": {<arguments>}}]}\n",
    );
    if plan.forced() {
        text.push_str("You must call a tool now.");
    } else {
        text.push_str("If no tool is needed, answer normally.");
    }
    text
}

/// Legacy function-calling history as tools: an assistant `function_call`
/// becomes a one-call `tool_calls`, and a `role: "function"` result a `tool`
/// message answering it, so every template shows the calls it knows how to.
pub fn legacy_history_as_tools(messages: &mut [Value]) {
    let mut made = 0usize;
    let mut new_id = || {
        made += 1;
        // Nine alphanumerics: the one id shape every template accepts (Mistral's).
        format!("call{:05}", made % 100_000)
    };
    // Legacy calls not answered yet, as (name, id).
    let mut open: Vec<(String, String)> = Vec::new();
    for message in messages.iter_mut() {
        let Some(object) = message.as_object_mut() else {
            continue;
        };
        match object.get("role").and_then(Value::as_str) {
            Some("assistant") => {
                let Some(call) = object.remove("function_call").filter(|c| !c.is_null()) else {
                    continue;
                };
                if object.get("tool_calls").is_some_and(|c| !c.is_null()) {
                    continue;
                }
                let id = new_id();
                let name = call["name"].as_str().unwrap_or_default().to_owned();
                let arguments = call.get("arguments").cloned().unwrap_or(json!("{}"));
                object.insert(
                    "tool_calls".into(),
                    json!([{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]),
                );
                open.push((name, id));
            }
            Some("function") => {
                let name = object
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let answered = open
                    .iter()
                    .rposition(|(n, _)| n == name)
                    .or(open.len().checked_sub(1));
                let id = match answered {
                    Some(i) => open.remove(i).1,
                    None => new_id(),
                };
                object.insert("role".into(), "tool".into());
                object.insert("tool_call_id".into(), id.into());
            }
            _ => {}
        }
    }
}

/// Adapts a checked history for a template without tool support: calls become
/// the generic JSON the model is asked to write, and the tools' description
/// goes into the system message.
pub fn adapt_for_generic(messages: &mut Vec<Value>, plan: Option<&ToolPlan>) {
    // Call ids to names, so a result can say which tool it came from.
    let mut names = std::collections::HashMap::new();
    for message in messages.iter_mut() {
        let Some(object) = message.as_object_mut() else {
            continue;
        };
        if object.get("role").and_then(Value::as_str) == Some("tool") {
            // Such templates know only user and assistant turns: a result is
            // told to the model as the user's next turn.
            let id = object.get("tool_call_id").and_then(Value::as_str);
            let name = object
                .get("name")
                .or_else(|| id.and_then(|id| names.get(id)))
                .cloned()
                .unwrap_or(Value::Null);
            let content = object.get("content").cloned().unwrap_or_default();
            let text = json!({"tool_result": {"name": name, "content": content}}).to_string();
            object.insert("role".into(), "user".into());
            object.insert("content".into(), text.into());
            object.remove("tool_call_id");
            object.remove("name");
            continue;
        }
        let Some(calls) = object.remove("tool_calls") else {
            continue;
        };
        let calls: Vec<Value> = calls
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                if let Some(id) = c["id"].as_str() {
                    names.insert(id.to_owned(), c["function"]["name"].clone());
                }
                json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
            })
            .collect();
        let text = json!({ "tool_calls": calls }).to_string();
        let content = match object.get("content").and_then(Value::as_str) {
            Some(before) if !before.is_empty() => format!("{before}\n{text}"),
            _ => text,
        };
        object.insert("content".into(), content.into());
    }
    // Results that follow each other, or a result and the user's next words,
    // are one user turn (templates such as Gemma's insist on alternation).
    messages.dedup_by(|next, prev| {
        let is_user = |m: &Value| m.get("role").and_then(Value::as_str) == Some("user");
        if !(is_user(prev) && is_user(next)) {
            return false;
        }
        let joined = format!(
            "{}\n\n{}",
            prev["content"].as_str().unwrap_or(""),
            next["content"].as_str().unwrap_or("")
        );
        prev["content"] = joined.into();
        true
    });
    let Some(plan) = plan.filter(|p| p.active()) else {
        return;
    };
    let prompt = generic_tools_prompt(plan);
    match messages.first_mut() {
        Some(Value::Object(first))
            if first.get("role").and_then(Value::as_str) == Some("system") =>
        {
            let before = first.get("content").and_then(Value::as_str).unwrap_or("");
            let joined = if before.is_empty() {
                prompt
            } else {
                format!("{before}\n\n{prompt}")
            };
            first.insert("content".into(), joined.into());
        }
        _ => messages.insert(0, json!({"role": "system", "content": prompt})),
    }
}

/// Checks the tool parts of a history: assistant `tool_calls` and `function_call`
/// well formed, tool results answering a call. Malformed history is the
/// client's mistake (400), never a template failure (500).
pub fn check_history(messages: &[Value]) -> Result<(), ApiError> {
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
            let param = format!("messages[{i}].tool_calls");
            if role != "assistant" {
                return Err(ApiError::invalid(
                    &param,
                    "only assistant messages carry tool_calls",
                ));
            }
            let calls = calls
                .as_array()
                .ok_or_else(|| ApiError::invalid(&param, "tool_calls must be an array"))?;
            for (j, call) in calls.iter().enumerate() {
                let param = format!("{param}[{j}]");
                check_call(call.get("function"), &format!("{param}.function"))?;
                if let Some(id) = call.get("id") {
                    if !id.is_string() {
                        return Err(ApiError::invalid(
                            &format!("{param}.id"),
                            "id must be a string",
                        ));
                    }
                }
            }
        }
        if let Some(call) = message.get("function_call").filter(|c| !c.is_null()) {
            check_call(Some(call), &format!("messages[{i}].function_call"))?;
        }
        if role == "tool" {
            match message.get("tool_call_id") {
                Some(Value::String(_)) => {}
                _ => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].tool_call_id"),
                        "a tool message needs the tool_call_id it answers",
                    ))
                }
            }
        }
        if role == "function" && !message.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].name"),
                "a function message needs the function's name",
            ));
        }
    }
    Ok(())
}

fn check_call(function: Option<&Value>, param: &str) -> Result<(), ApiError> {
    let function = function
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::invalid(param, "a call needs a function object"))?;
    if !function.get("name").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(
            &format!("{param}.name"),
            "a call needs a name",
        ));
    }
    match function.get("arguments") {
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(_)) => Ok(()),
            _ => Err(ApiError::invalid(
                &format!("{param}.arguments"),
                "arguments must be a JSON object encoded as a string",
            )),
        },
        Some(Value::Object(_)) => Ok(()),
        _ => Err(ApiError::invalid(
            &format!("{param}.arguments"),
            "a call needs its arguments",
        )),
    }
}

/// `message.tool_calls[i]` as OpenAI sends it.
pub fn wire_call(call: &ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn reads_tool_choices() {
        let plan = plan(&request(json!({"tools": weather()})))
            .unwrap()
            .unwrap();
        assert_eq!(plan.choice, ToolChoice::Auto);
        assert!(plan.parallel);
        let named = json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        let plan = plan_of(named);
        assert_eq!(plan.choice, ToolChoice::Named("get_weather".into()));
        let legacy = plan_of(
            json!({"functions": [weather()[0]["function"]], "function_call": {"name": "get_weather"}}),
        );
        assert!(legacy.legacy && !legacy.parallel);
        assert_eq!(legacy.choice, ToolChoice::Named("get_weather".into()));
    }

    fn plan_of(extra: Value) -> ToolPlan {
        plan(&request(extra)).unwrap().unwrap()
    }

    #[test]
    fn every_family_grammar_compiles_against_a_real_vocabulary() {
        let path = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf"
        ));
        let engine = engine::Engine::load(&path, engine::EngineConfig::default()).unwrap();
        let control = |t: &str| engine.control_token(t);
        for format in [
            ToolCallFormat::Hermes,
            ToolCallFormat::Llama3,
            ToolCallFormat::MistralNemo,
            ToolCallFormat::MistralV11,
            ToolCallFormat::GenericJson,
        ] {
            for parallel in [true, false] {
                let plan = plan_of(json!({"tools": weather(), "parallel_tool_calls": parallel}));
                let forced = ToolPlan {
                    choice: ToolChoice::Required,
                    ..plan.clone()
                };
                let calls = call_constraint(&forced, format, &control);
                if let Err(e) = engine.compile_constraint(&calls) {
                    panic!("{format:?} forced, parallel {parallel}: {e}\n{calls:?}");
                }
                match triggered_call_constraint(&plan, format, &control) {
                    Some(triggered) => {
                        if let Err(e) = engine.compile_constraint(&triggered) {
                            panic!("{format:?} triggered, parallel {parallel}: {e}\n{triggered:?}");
                        }
                    }
                    None => assert_eq!(format, ToolCallFormat::GenericJson),
                }
            }
        }
    }

    #[test]
    fn a_client_tool_named_like_a_builtin_stays_the_clients() {
        let own = json!([{"type": "function", "function": {"name": "get_current_time",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let plan = plan_of(json!({"tools": own, "execute_builtin_functions": true}));
        assert!(plan.builtin("get_current_time").is_none());
        assert!(plan.builtin("days_between").is_some());
        assert!(plan_of(json!({"tools": weather()}))
            .builtin("days_between")
            .is_none());
    }

    #[test]
    fn rejects_bad_tools() {
        for (extra, param) in [
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": weather(), "functions": [weather()[0]["function"]]}),
                "functions",
            ),
            (json!({"tools": [weather()[0], weather()[0]]}), "tools"),
        ] {
            let error = plan(&request(extra.clone())).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{extra}");
            assert_eq!(error.status, 400);
        }
    }

    #[test]
    fn reads_response_formats() {
        let c = output_constraint(&request(
            json!({"response_format": {"type": "json_object"}}),
        ))
        .unwrap();
        assert_eq!(c, Some(Constraint::JsonSchema(json!({"type": "object"}))));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let c = output_constraint(&request(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}))).unwrap();
        assert_eq!(c, Some(Constraint::JsonSchema(schema)));
        assert_eq!(
            output_constraint(&request(json!({"response_format": {"type": "text"}}))).unwrap(),
            None
        );
        for bad in [
            json!({"response_format": {"type": "yaml"}}),
            json!({"response_format": {"type": "json_schema"}}),
            json!({"response_format": "json"}),
            json!({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}),
            json!({"grammar": "  "}),
        ] {
            assert!(output_constraint(&request(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_checks() {
        let ok = json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]);
        check_history(ok.as_array().unwrap()).unwrap();
        for (bad, param) in [
            (
                json!([{"role": "assistant", "tool_calls": {"a": 1}}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]),
                "messages[0].tool_calls[0].function.name",
            ),
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_calls": []}]),
                "messages[0].tool_calls",
            ),
        ] {
            let error = check_history(bad.as_array().unwrap()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn call_grammars_name_markers_by_id_when_they_are_control_tokens() {
        let plan = plan_of(
            json!({"tools": weather(), "tool_choice": "required", "parallel_tool_calls": false}),
        );
        let control = |text: &str| (text == "[TOOL_CALLS]").then_some(5);
        let Constraint::Lark(nemo) = call_constraint(&plan, ToolCallFormat::MistralNemo, &control)
        else {
            panic!("lark expected");
        };
        assert!(nemo.starts_with("start: <[5]> %json"), "{nemo}");
        assert!(nemo.contains("\"maxItems\":1"), "{nemo}");
        let Constraint::Lark(hermes) = call_constraint(&plan, ToolCallFormat::Hermes, &control)
        else {
            panic!("lark expected");
        };
        assert!(
            hermes.starts_with("start: \"<tool_call>\" \"\\n\" call \"\\n\" \"</tool_call>\""),
            "{hermes}"
        );
        assert!(hermes.contains("\ncall: %json"), "{hermes}");
        assert!(matches!(
            call_constraint(&plan, ToolCallFormat::GenericJson, &control),
            Constraint::JsonSchema(_)
        ));
    }

    #[test]
    fn generic_history_turns_calls_into_text() {
        let mut messages = vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        ];
        let plan = plan_of(json!({"tools": weather()}));
        adapt_for_generic(&mut messages, Some(&plan));
        assert_eq!(messages[0]["role"], "system");
        assert!(messages[0]["content"]
            .as_str()
            .unwrap()
            .contains("get_weather"));
        assert_eq!(
            messages[2]["content"],
            r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}"#
        );
        assert!(messages[2].get("tool_calls").is_none());
    }

    #[test]
    fn generic_history_tells_results_as_user_turns_that_alternate() {
        let mut messages = vec![
            json!({"role": "user", "content": "weather in Paris and Rome?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": "rain"}),
            json!({"role": "user", "content": "and so?"}),
        ];
        adapt_for_generic(&mut messages, None);
        let roles: Vec<_> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(
            messages[2]["content"],
            "{\"tool_result\":{\"name\":\"get_weather\",\"content\":\"sunny\"}}\n\n\
             {\"tool_result\":{\"name\":\"get_weather\",\"content\":\"rain\"}}\n\nand so?"
        );
        assert!(messages[2].get("tool_call_id").is_none());
    }

    #[test]
    fn legacy_history_becomes_tool_calls_and_results() {
        let mut messages = vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}),
            json!({"role": "function", "name": "get_weather", "content": "sunny"}),
        ];
        legacy_history_as_tools(&mut messages);
        let call = &messages[1]["tool_calls"][0];
        let id = call["id"].as_str().unwrap();
        assert_eq!(id.len(), 9, "Mistral's templates take 9 alphanumerics");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}");
        assert!(messages[1].get("function_call").is_none());
        assert_eq!(messages[2]["role"], "tool");
        assert_eq!(messages[2]["tool_call_id"], id);
        check_history(&messages).unwrap();
    }
}
