//! Call grammars: the Lark grammar of valid calls in a model family's syntax,
//! forced (`required`, a named tool) or triggered by the family's call marker
//! (`auto`).

use engine::chat::ToolCallFormat;
use engine::Constraint;
use serde_json::{json, Value};

use super::{ToolPlan, ToolSpec};

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
    // The generic form: one call object per line, as its prompt asks. In a
    // list of calls a line break after the last one may end the output: a
    // model that closes its JSON with one (a habit) is not made to open
    // another call. (A single call ends at its closing brace.)
    let call = call_schema(&plan.allowed(), "arguments");
    if plan.parallel {
        Constraint::Lark(format!(
            "start: call (\"\\n\" call){{0,{}}} \"\\n\"?\ncall: {}\n",
            MAX_PARALLEL_CALLS - 1,
            lark_json(&call)
        ))
    } else {
        Constraint::JsonSchema(call)
    }
}

/// For `tool_choice: "auto"` with a JSON `response_format`: the answer the
/// schema describes, or calls of the offered tools in the model family's
/// syntax (OpenAI takes the two together: an agent's structured final answer
/// and its tools).
pub fn answer_or_calls_constraint(
    plan: &ToolPlan,
    format: ToolCallFormat,
    control: MarkerToken<'_>,
    answer: &Value,
) -> Constraint {
    let calls = match call_syntax(plan, format, control) {
        Some(syntax) => {
            let next = match &syntax.next {
                Some(next) if plan.parallel => {
                    format!("({next}){{0,{}}}", MAX_PARALLEL_CALLS - 1)
                }
                _ => String::new(),
            };
            format!(
                "calls: {} {} {next}\n{}",
                syntax.lead, syntax.first, syntax.rules
            )
        }
        // The generic form: one call object per line, as for a forced call.
        None => {
            let call = lark_json(&call_schema(&plan.allowed(), "arguments"));
            if plan.parallel {
                let more = MAX_PARALLEL_CALLS - 1;
                format!("calls: call (\"\\n\" call){{0,{more}}} \"\\n\"?\ncall: {call}\n")
            } else {
                format!("calls: {call}\n")
            }
        }
    };
    Constraint::Lark(format!(
        "start: answer | calls\nanswer: {}\n{calls}",
        lark_json(answer)
    ))
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
