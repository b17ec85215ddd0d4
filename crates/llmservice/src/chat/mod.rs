//! Chat as a domain, apart from HTTP: the messages a request sends, the tools
//! it offers and the output it constrains, the prompt the template renders,
//! the grammars that keep calls valid, and the built-in functions the server
//! runs itself in rounds.

pub mod anthropic;
pub mod builtins;
mod constraints;
mod messages;
pub mod ollama;

mod prompt;
pub mod rag;
pub mod responses;
mod rounds;
pub mod tools;

use serde_json::{json, Map, Value};

use crate::error::RequestError;
use crate::generation;
use crate::wire::{ChatCompletionRequest, SamplingFields};

pub use constraints::{compile, compile_for};
pub use messages::prepare_messages;
pub use prompt::{ChatPrompt, Prompt};
pub use rounds::Rounds;
pub use tools::ToolPlan;

/// A chat request, checked: its messages shaped for templates, its tools and
/// the output constraint it asks for.
pub struct ChatJob {
    pub messages: Vec<Value>,
    pub plan: Option<ToolPlan>,
    /// `response_format` or `grammar`, as asked (not yet compiled).
    pub output: Option<engine::Constraint>,
    /// Built-in function calls run here, in rounds.
    pub builtins: bool,
    pub n: u32,
    /// `Some(k)` when the client asked for logprobs with `k` alternatives.
    pub logprobs: Option<u32>,
    /// A thinking model's reasoning goes apart from its answer (unless
    /// `reasoning_format: "none"`).
    pub reasoning: bool,
}

impl ChatJob {
    pub fn new(req: &ChatCompletionRequest) -> Result<Self, RequestError> {
        generation::validate(&req.sampling)?;
        let messages = prepare_messages(&req.messages)?;
        let plan = tools::plan(req)?;
        let output =
            tools::output_constraint(req.response_format.as_ref(), req.grammar.as_deref())?;
        // A JSON response_format goes with tools (the answer or calls); a
        // GBNF grammar cannot be joined to a call grammar.
        let joinable = matches!(output, None | Some(engine::Constraint::JsonSchema(_)));
        if !joinable && plan.as_ref().is_some_and(ToolPlan::active) {
            return Err(RequestError::unsupported(
                output_param(req.grammar.as_deref()),
                "a grammar cannot be combined with tools the model may call; send \
                 tool_choice \"none\", leave the tools out, or use a JSON response_format",
            ));
        }
        let builtins = plan
            .as_ref()
            .is_some_and(|p| p.execute_builtins && p.active());
        let n = req.sampling.n.unwrap_or(1);
        if builtins && n > 1 {
            return Err(RequestError::invalid(
                "n",
                "execute_builtin_functions runs one conversation: n must be 1",
            ));
        }
        Ok(Self {
            messages,
            plan,
            output,
            builtins,
            n,
            logprobs: logprobs_request(&req.sampling)?,
            reasoning: separates_reasoning(req.reasoning_format.as_deref())?,
        })
    }

    /// Whether `template`'s model has its reasoning split from its answer.
    pub fn splits_reasoning(&self, template: &engine::chat::ChatTemplate) -> bool {
        self.reasoning && template.thinks()
    }

    /// The tools the model is offered, if any (`tool_choice: none` offers none).
    pub fn active_plan(&self) -> Option<&ToolPlan> {
        self.plan.as_ref().filter(|p| p.active())
    }

    /// Whether calls are answered in the legacy `function_call` shape.
    pub fn legacy(&self) -> bool {
        self.active_plan().is_some_and(|p| p.legacy)
    }

    /// What identifies the answer besides sampling, for the response cache.
    /// The key sorts object keys, so schemas go in as text: their property
    /// order is what the model sees and writes.
    pub fn cache_payload(&self, req: &ChatCompletionRequest) -> Value {
        let mut payload = json!({
            "messages": self.messages,
            "chat_template_kwargs": req.chat_template_kwargs,
            "tools": self.plan.as_ref().map(|p| (Value::Array(p.template_tools()).to_string(), format!("{:?}", p.choice), p.parallel, p.legacy)),
            "response_format": req.response_format.as_ref().map(Value::to_string),
            "grammar": req.grammar,
        });
        // Only the answer that keeps its thoughts in the content differs.
        if !self.reasoning {
            payload["reasoning_format"] = "none".into();
        }
        payload
    }
}

/// Reads llama-server's `reasoning_format`: whether a thinking model's
/// reasoning goes apart from its answer.
fn separates_reasoning(format: Option<&str>) -> Result<bool, RequestError> {
    match format {
        None | Some("auto" | "deepseek" | "deepseek-legacy") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => Err(RequestError::invalid(
            "reasoning_format",
            format!("unknown reasoning_format {other:?}; expected auto, deepseek or none"),
        )),
    }
}

/// The string under `key` in a JSON item of another API's request, which
/// must be there; `at` names the item.
fn required_str<'a>(item: &'a Value, key: &str, at: &str) -> Result<&'a str, RequestError> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| RequestError::invalid(&format!("{at}.{key}"), format!("{key} is required")))
}

/// Sets each of `fields` in a translated request's body that has a value.
fn insert_present<const N: usize>(body: &mut Map<String, Value>, fields: [(&str, Value); N]) {
    for (key, value) in fields {
        if !value.is_null() {
            body.insert(key.to_owned(), value);
        }
    }
}

/// Another API's request, translated into a chat body, as the chat request
/// it stands for; `param` names what a client would fix if it does not read.
fn chat_from_body(
    body: Map<String, Value>,
    param: &str,
) -> Result<ChatCompletionRequest, RequestError> {
    serde_json::from_value(Value::Object(body))
        .map_err(|e| RequestError::invalid(param, format!("invalid request: {e}")))
}

/// Refuses a request for an answer in audio, as OpenAI refuses it for a
/// model without audio, rather than answering in text (models run here have
/// no voice; an upstream may).
pub fn check_text_only(req: &ChatCompletionRequest) -> Result<(), RequestError> {
    let modalities = req.extra.get("modalities").and_then(Value::as_array);
    let audio = modalities.is_some_and(|m| m.iter().any(|m| m.as_str() == Some("audio")))
        || req.extra.get("audio").is_some_and(|a| !a.is_null());
    if audio {
        return Err(RequestError::unsupported(
            "modalities",
            "audio output is not supported: models run here answer in text",
        ));
    }
    Ok(())
}

/// The field an output constraint came from: `grammar` when one was sent,
/// else `response_format`.
pub fn output_param(grammar: Option<&str>) -> &'static str {
    if grammar.is_some() {
        "grammar"
    } else {
        "response_format"
    }
}

/// Chat asks with `logprobs: true` and `top_logprobs: k`.
fn logprobs_request(sampling: &SamplingFields) -> Result<Option<u32>, RequestError> {
    match &sampling.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {
            if sampling.top_logprobs.is_some_and(|k| k > 0) {
                return Err(RequestError::invalid(
                    "logprobs",
                    "top_logprobs requires logprobs: true",
                ));
            }
            Ok(None)
        }
        Some(Value::Bool(true)) => Ok(Some(sampling.top_logprobs.unwrap_or(0))),
        Some(_) => Err(RequestError::invalid(
            "logprobs",
            "logprobs must be true or false",
        )),
    }
}
