//! Structured output and tools for chat: reading `response_format`, `grammar`,
//! `tools`/`tool_choice` and the legacy `functions`/`function_call` into what
//! the engine needs (a constraint, the tools the template shows), and shaping
//! parsed tool calls into OpenAI's wire form.

use engine::Constraint;
use serde_json::{json, Map, Value};

use super::builtins::{self, Builtin};
use crate::error::RequestError;
use crate::wire::ChatCompletionRequest;

mod grammar;
mod history;
#[cfg(test)]
mod tests;

pub use grammar::{
    answer_or_calls_constraint, call_constraint, triggered_call_constraint, MarkerToken,
};
pub use history::{
    adapt_for_generic, check_history, generic_tools_prompt, legacy_history_as_tools,
};

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
    pub fn builtin(&self, name: &str) -> Option<&'static Builtin> {
        self.server_side
            .contains(&name)
            .then(|| builtins::find(name))
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
fn read_function(value: &Value, param: &str) -> Result<ToolSpec, RequestError> {
    let object = value
        .as_object()
        .ok_or_else(|| RequestError::invalid(param, "a function must be an object"))?;
    let name = object.get("name").and_then(Value::as_str).ok_or_else(|| {
        RequestError::invalid(&format!("{param}.name"), "a function needs a name")
    })?;
    if !valid_name(name) {
        return Err(RequestError::invalid(
            &format!("{param}.name"),
            format!("invalid function name {name:?}: {NAME_RULE}"),
        ));
    }
    let description = match object.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(RequestError::invalid(
                &format!("{param}.description"),
                "description must be a string",
            ))
        }
    };
    let parameters = match object.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(RequestError::invalid(
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
pub fn plan(req: &ChatCompletionRequest) -> Result<Option<ToolPlan>, RequestError> {
    let tools = req.tools.as_ref().filter(|t| !t.is_empty());
    let legacy_functions = req.functions.as_ref().filter(|f| !f.is_empty());
    if tools.is_some() && legacy_functions.is_some() {
        return Err(RequestError::invalid(
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
                return Err(RequestError::invalid(
                    &format!("tools[{i}].type"),
                    "only tools of type \"function\" are supported",
                ));
            }
            let function = tool.get("function").ok_or_else(|| {
                RequestError::invalid(&format!("tools[{i}].function"), "a tool needs a function")
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
        for builtin in builtins::registry() {
            if !specs.iter().any(|s| s.name == builtin.name) {
                specs.push(ToolSpec::from(builtin));
                server_side.push(builtin.name);
            }
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(RequestError::invalid(
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
            Some(_) => Err(RequestError::invalid(
                choice_param,
                format!("{choice_param} requires tools to choose from"),
            )),
        };
    }
    let choice = choice.unwrap_or(ToolChoice::Auto);
    if let ToolChoice::Named(name) = &choice {
        if !specs.iter().any(|s| &s.name == name) {
            return Err(RequestError::invalid(
                choice_param,
                format!("{choice_param} names {name:?}, which is not among the offered tools"),
            ));
        }
    }
    // A named tool_choice asks for one call of that function, as OpenAI answers
    // it, whatever `parallel_tool_calls` says.
    let named = matches!(choice, ToolChoice::Named(_));
    Ok(Some(ToolPlan {
        specs,
        choice,
        parallel: !legacy && !named && req.parallel_tool_calls.unwrap_or(true),
        legacy,
        execute_builtins,
        server_side,
    }))
}

fn read_choice(
    value: Option<&Value>,
    param: &str,
    legacy: bool,
) -> Result<Option<ToolChoice>, RequestError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = || {
        let expected = if legacy {
            "\"none\", \"auto\" or {\"name\": ...}"
        } else {
            "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
        };
        RequestError::invalid(param, format!("{param} must be {expected}"))
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
pub fn output_constraint(
    response_format: Option<&Value>,
    grammar: Option<&str>,
) -> Result<Option<Constraint>, RequestError> {
    let format =
        match response_format {
            None | Some(Value::Null) => None,
            Some(Value::Object(format)) => {
                let kind = format.get("type").and_then(Value::as_str);
                match kind {
                    Some("text") => None,
                    Some("json_object") => Some(Constraint::JsonSchema(
                        // llama-cpp-python's extension: a schema next to the type.
                        match format.get("schema") {
                            Some(schema @ Value::Object(_)) => schema.clone(),
                            _ => engine::any_json_object(),
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
                                return Err(RequestError::invalid(
                                    "response_format.json_schema.schema",
                                    "json_schema needs a schema object",
                                ))
                            }
                        }
                    }
                    _ => return Err(RequestError::invalid(
                        "response_format.type",
                        "response_format type must be \"text\", \"json_object\" or \"json_schema\"",
                    )),
                }
            }
            Some(_) => {
                return Err(RequestError::invalid(
                    "response_format",
                    "response_format must be an object",
                ))
            }
        };
    match (grammar, format) {
        (Some(_), Some(_)) => Err(RequestError::invalid(
            "grammar",
            "send either grammar or a JSON response_format, not both",
        )),
        (Some(grammar), None) if grammar.trim().is_empty() => {
            Err(RequestError::invalid("grammar", "grammar is empty"))
        }
        (Some(grammar), None) => Ok(Some(Constraint::Gbnf(grammar.to_owned()))),
        (None, format) => Ok(format),
    }
}

impl From<&Builtin> for ToolSpec {
    fn from(builtin: &Builtin) -> Self {
        ToolSpec {
            name: builtin.name.to_owned(),
            description: Some(builtin.description.to_owned()),
            parameters: (builtin.parameters)(),
        }
    }
}
