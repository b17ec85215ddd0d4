//! Anthropic's Messages API as a chat request: one translation onto the
//! OpenAI-shaped request the chat pipeline already checks and runs, so both
//! APIs share the templates, tools, constraints and scheduler.

use serde_json::{json, Map, Value};

use super::{chat_from_body, insert_present, required_str};
use crate::error::RequestError;
use crate::wire::{ChatCompletionRequest, MessagesRequest};

/// The parts of a Messages request that make the prompt (shared with
/// `count_tokens`, which has no `max_tokens`).
pub struct PromptParts<'a> {
    pub system: Option<&'a Value>,
    pub messages: &'a [Value],
    pub tools: Option<&'a [Value]>,
    pub tool_choice: Option<&'a Value>,
    pub thinking: Option<&'a Value>,
}

impl<'a> From<&'a MessagesRequest> for PromptParts<'a> {
    fn from(req: &'a MessagesRequest) -> Self {
        Self {
            system: req.system.as_ref(),
            messages: &req.messages,
            tools: req.tools.as_deref(),
            tool_choice: req.tool_choice.as_ref(),
            thinking: req.thinking.as_ref(),
        }
    }
}

/// The chat request a Messages request stands for.
pub fn chat_request(req: &MessagesRequest) -> Result<ChatCompletionRequest, RequestError> {
    let mut body = prompt_body(&req.model, &PromptParts::from(req))?;
    let fields = [
        ("max_tokens", json!(req.max_tokens)),
        ("stop", json!(req.stop_sequences)),
        ("temperature", json!(req.temperature)),
        ("top_p", json!(req.top_p)),
        ("top_k", json!(req.top_k)),
        ("stream", json!(req.stream)),
    ];
    insert_present(&mut body, fields);
    chat_from_body(body, "messages")
}

/// The chat request for counting a prompt's tokens.
pub fn count_request(
    model: &str,
    parts: &PromptParts,
) -> Result<ChatCompletionRequest, RequestError> {
    chat_from_body(prompt_body(model, parts)?, "messages")
}

fn prompt_body(model: &str, parts: &PromptParts) -> Result<Map<String, Value>, RequestError> {
    let mut messages = Vec::new();
    if let Some(system) = parts.system {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    for (i, message) in parts.messages.iter().enumerate() {
        turn(message, &format!("messages[{i}]"), &mut messages)?;
    }
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), messages.into());
    if let Some(tools) = parts.tools {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, &format!("tools[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            body.insert("tools".into(), tools.into());
        }
    }
    // Thinking models' templates read `enable_thinking` (Qwen3's). Without
    // `thinking` the model does as its template does, as on the other APIs
    // (and the same question shares their cached answer).
    if let Some(thinking) = parts.thinking {
        let thinks = match thinking.get("type").and_then(Value::as_str) {
            Some("enabled" | "adaptive") => true,
            Some("disabled") => false,
            _ => {
                return Err(RequestError::invalid(
                    "thinking.type",
                    "thinking.type must be \"enabled\", \"adaptive\" or \"disabled\"",
                ))
            }
        };
        body.insert(
            "chat_template_kwargs".into(),
            json!({"enable_thinking": thinks}),
        );
    }
    if let Some(choice) = parts.tool_choice {
        let (choice, parallel) = tool_choice(choice)?;
        body.insert("tool_choice".into(), choice);
        if let Some(parallel) = parallel {
            body.insert("parallel_tool_calls".into(), parallel.into());
        }
    }
    Ok(body)
}

/// One Messages turn as chat messages: a user turn's `tool_result` blocks
/// become `tool` messages (before its text, as chat history orders them), an
/// assistant turn's `tool_use` blocks its `tool_calls`.
fn turn(message: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), RequestError> {
    let role = message.get("role").and_then(Value::as_str);
    let content = message.get("content").unwrap_or(&Value::Null);
    let blocks = match content {
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        Value::Array(blocks) => blocks.clone(),
        _ => {
            return Err(RequestError::invalid(
                &format!("{at}.content"),
                "content must be a string or a list of content blocks",
            ))
        }
    };
    let mut text = String::new();
    let mut thought = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        match (role, block.get("type").and_then(Value::as_str)) {
            (_, Some("text")) => text.push_str(block["text"].as_str().unwrap_or_default()),
            // A tool loop's thoughts go back to the template, which decides
            // what to show; redacted ones are another model's.
            (Some("assistant"), Some("thinking")) => {
                thought.push_str(block["thinking"].as_str().unwrap_or_default());
            }
            (_, Some("thinking" | "redacted_thinking")) => {}
            (Some("user"), Some("tool_result")) => out.push(json!({
                "role": "tool",
                "tool_call_id": required_str(block, "tool_use_id", &here)?,
                "content": block.get("content").map(|c| text_of(c, &here)).transpose()?.unwrap_or_default(),
            })),
            (Some("assistant"), Some("tool_use")) => calls.push(json!({
                "id": required_str(block, "id", &here)?,
                "type": "function",
                "function": {
                    "name": required_str(block, "name", &here)?,
                    "arguments": block.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            (_, kind) => {
                return Err(RequestError::unsupported(
                    &here,
                    format!("content blocks of type {kind:?} are not supported in a {} turn", role.unwrap_or("?")),
                ))
            }
        }
    }
    match role {
        Some("user") if !text.is_empty() || blocks.is_empty() => {
            out.push(json!({"role": "user", "content": text}));
        }
        Some("user") => {}
        Some("assistant") => {
            let mut turn = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                turn["tool_calls"] = calls.into();
            }
            if !thought.is_empty() {
                turn["reasoning_content"] = thought.into();
            }
            out.push(turn);
        }
        _ => {
            return Err(RequestError::invalid(
                &format!("{at}.role"),
                "role must be \"user\" or \"assistant\"",
            ))
        }
    }
    Ok(())
}

/// A string, or the text of a list of `text` blocks.
fn text_of(value: &Value, at: &str) -> Result<String, RequestError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::new();
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(block["text"].as_str().unwrap_or_default()),
                    kind => {
                        return Err(RequestError::unsupported(
                            at,
                            format!("only text blocks are supported here, got {kind:?}"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(RequestError::invalid(
            at,
            "expected a string or a list of text blocks",
        )),
    }
}

/// `{name, description, input_schema}` as a chat function tool. Anthropic's
/// server tools (`web_search`, `bash`, ...) carry a `type` and are not run here.
fn tool(tool: &Value, at: &str) -> Result<Value, RequestError> {
    if let Some(kind) = tool.get("type").and_then(Value::as_str) {
        if kind != "custom" {
            return Err(RequestError::unsupported(
                at,
                format!("server tools ({kind}) are not supported; send tools with an input_schema"),
            ));
        }
    }
    let name = required_str(tool, "name", at)?;
    let schema = tool.get("input_schema").ok_or_else(|| {
        RequestError::invalid(&format!("{at}.input_schema"), "input_schema is required")
    })?;
    let mut function = json!({"name": name, "parameters": schema});
    if let Some(description) = tool.get("description") {
        function["description"] = description.clone();
    }
    Ok(json!({"type": "function", "function": function}))
}

/// Anthropic's `tool_choice` as chat's, and `parallel_tool_calls` when
/// `disable_parallel_tool_use` says so.
fn tool_choice(choice: &Value) -> Result<(Value, Option<bool>), RequestError> {
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|disable| !disable);
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            json!({"type": "function", "function": {"name": required_str(choice, "name", "tool_choice")?}})
        }
        _ => {
            return Err(RequestError::invalid(
                "tool_choice.type",
                "tool_choice.type must be \"auto\", \"any\", \"tool\" or \"none\"",
            ))
        }
    };
    Ok((chat, parallel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_tool_round_trip_becomes_chat_history() {
        let req = request(json!({
            "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["END"],
            "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And so?"}]},
            ],
        }));
        let chat = chat_request(&req).unwrap();
        let roles: Vec<_> = chat
            .messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[0]["content"], "Be brief.");
        let call = &chat.messages[2]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_1");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(chat.messages[3]["tool_call_id"], "toolu_1");
        assert_eq!(chat.messages[3]["content"], "sunny");
        assert_eq!(chat.tool_choice, Some(json!("required")));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert_eq!(chat.sampling.max_tokens, Some(50));
        let tool = &chat.tools.as_ref().unwrap()[0];
        assert_eq!(tool["function"]["parameters"], json!({"type": "object"}));
    }

    #[test]
    fn a_named_tool_choice_and_bad_blocks() {
        let (choice, parallel) = tool_choice(&json!({"type": "tool", "name": "f"})).unwrap();
        assert_eq!(choice["function"]["name"], "f");
        assert_eq!(parallel, None);
        let image = request(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {}}]}]}));
        let error = chat_request(&image).unwrap_err();
        assert_eq!(error.param(), Some("messages[0].content[0]"));
        let role = request(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
        );
        assert_eq!(
            chat_request(&role).unwrap_err().param(),
            Some("messages[0].role")
        );
        let server_tool = request(json!({"model": "m", "max_tokens": 5, "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}));
        assert_eq!(
            chat_request(&server_tool).unwrap_err().param(),
            Some("tools[0]")
        );
    }
}
