//! OpenAI's Responses API as a chat request: input items become chat
//! messages, flat function tools become chat tools, `text.format` becomes
//! `response_format`; the chat pipeline then checks and runs it like any
//! other. A stored conversation (`previous_response_id`) is kept as the chat
//! messages it ended with, so a next turn renders the same prompt prefix.

use serde_json::{json, Map, Value};

use super::{chat_from_body, insert_present, required_str};
use crate::error::RequestError;
use crate::wire::{ChatCompletionRequest, OutputItem, ResponseObject, ResponsesRequest};

/// A Responses request as a chat request, and the conversation it continues
/// as chat messages: the stored history, then this request's input (without
/// `instructions`, which hold for one response only).
pub struct Translated {
    pub chat: ChatCompletionRequest,
    pub history: Vec<Value>,
}

/// The chat request `req` stands for, after `previous` (the messages of the
/// stored response it continues).
pub fn chat_request(
    req: &ResponsesRequest,
    previous: Vec<Value>,
) -> Result<Translated, RequestError> {
    let mut history = previous;
    match &req.input {
        Some(Value::String(text)) => history.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, &format!("input[{i}]"), &mut history)?;
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => {
            return Err(RequestError::invalid(
                "input",
                "input must be a string or a list of items",
            ))
        }
    }
    if history.is_empty() {
        return Err(RequestError::invalid("input", "input is required"));
    }
    let mut messages = Vec::with_capacity(history.len() + 1);
    if let Some(instructions) = &req.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    messages.extend(history.iter().cloned());
    let mut body = Map::new();
    body.insert("model".into(), req.model.clone().into());
    body.insert("messages".into(), messages.into());
    if let Some(tools) = &req.tools {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, &format!("tools[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            body.insert("tools".into(), tools.into());
        }
    }
    if let Some(choice) = &req.tool_choice {
        body.insert("tool_choice".into(), tool_choice(choice)?);
    }
    if let Some(format) = req.text.as_ref().and_then(|t| t.get("format")) {
        if let Some(format) = response_format(format)? {
            body.insert("response_format".into(), format);
        }
    }
    let fields = [
        ("max_tokens", json!(req.max_output_tokens)),
        ("temperature", json!(req.temperature)),
        ("top_p", json!(req.top_p)),
        ("stream", json!(req.stream)),
        ("parallel_tool_calls", json!(req.parallel_tool_calls)),
    ];
    insert_present(&mut body, fields);
    let chat = chat_from_body(body, "input")?;
    Ok(Translated { chat, history })
}

/// The chat messages after a finished response: its conversation, then its
/// output as one assistant turn (text and calls).
pub fn history_after(mut history: Vec<Value>, response: &ResponseObject) -> Vec<Value> {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for item in &response.output {
        match item {
            OutputItem::Reasoning { content, .. } => {
                content
                    .iter()
                    .for_each(|part| reasoning.push_str(&part.text));
            }
            OutputItem::Message { content, .. } => {
                content.iter().for_each(|part| text.push_str(&part.text));
            }
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => calls.push(function_call(call_id, name, arguments)),
        }
    }
    // Thinking templates show the reasoning of the turns since the last
    // question (a tool-call loop's); they drop the rest themselves.
    if !reasoning.is_empty() {
        reasoning_turn(&mut history, &reasoning);
    }
    assistant_turn(&mut history, text, calls);
    history
}

fn function_call(call_id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// Adds an assistant turn; calls right after an assistant turn join it (the
/// Responses API lists a message and its calls as separate items, chat
/// history as one turn).
fn assistant_turn(history: &mut Vec<Value>, text: String, calls: Vec<Value>) {
    if let Some(last) = history.last_mut() {
        let joins =
            last["role"] == "assistant" && (text.is_empty() || last.get("tool_calls").is_none());
        if joins {
            if let Some(content) = last["content"].as_str() {
                last["content"] = format!("{content}{text}").into();
            }
            if !calls.is_empty() {
                let mut all = last["tool_calls"].as_array().cloned().unwrap_or_default();
                all.extend(calls);
                last["tool_calls"] = all.into();
            }
            return;
        }
    }
    let mut turn = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        turn["tool_calls"] = calls.into();
    }
    history.push(turn);
}

/// Adds reasoning to the assistant turn it belongs to: the one in progress,
/// or a new one that the turn's message and calls join.
fn reasoning_turn(history: &mut Vec<Value>, text: &str) {
    match history.last_mut() {
        Some(last) if last["role"] == "assistant" => {
            let so_far = last["reasoning_content"].as_str().unwrap_or_default();
            last["reasoning_content"] = format!("{so_far}{text}").into();
        }
        _ => history.push(json!({"role": "assistant", "content": "", "reasoning_content": text})),
    }
}

/// One input item as chat messages.
fn input_item(item: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), RequestError> {
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        None | Some("message") => message(item, at, out),
        Some("function_call") => {
            let call = function_call(
                required_str(item, "call_id", at)?,
                required_str(item, "name", at)?,
                required_str(item, "arguments", at)?,
            );
            assistant_turn(out, String::new(), vec![call]);
            Ok(())
        }
        Some("function_call_output") => {
            let output = match item.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(parts @ Value::Array(_)) => text_of_parts(parts, &format!("{at}.output"))?,
                _ => {
                    return Err(RequestError::invalid(
                        &format!("{at}.output"),
                        "output must be a string or a list of input_text parts",
                    ))
                }
            };
            out.push(json!({
                "role": "tool",
                "tool_call_id": required_str(item, "call_id", at)?,
                "content": output,
            }));
            Ok(())
        }
        // An open model's reasoning goes with its turn; other models'
        // summaries and encrypted reasoning carry nothing a local model reads.
        Some("reasoning") => {
            let parts = item.get("content").and_then(Value::as_array);
            let text: String = parts
                .into_iter()
                .flatten()
                .filter(|part| part["type"] == "reasoning_text")
                .filter_map(|part| part["text"].as_str())
                .collect();
            if !text.is_empty() {
                reasoning_turn(out, &text);
            }
            Ok(())
        }
        Some(other) => Err(RequestError::unsupported(
            &format!("{at}.type"),
            format!("input items of type {other:?} are not supported; send messages, function_call and function_call_output items"),
        )),
    }
}

fn message(item: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), RequestError> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant" | "system")) => role,
        Some("developer") => "system",
        _ => {
            return Err(RequestError::invalid(
                &format!("{at}.role"),
                "role must be \"user\", \"assistant\", \"system\" or \"developer\"",
            ))
        }
    };
    let text = match item.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(parts @ Value::Array(_)) => text_of_parts(parts, &format!("{at}.content"))?,
        _ => {
            return Err(RequestError::invalid(
                &format!("{at}.content"),
                "content must be a string or a list of content parts",
            ))
        }
    };
    if role == "assistant" {
        assistant_turn(out, text, Vec::new());
    } else {
        out.push(json!({"role": role, "content": text}));
    }
    Ok(())
}

/// The text of a list of `input_text` / `output_text` parts.
fn text_of_parts(parts: &Value, at: &str) -> Result<String, RequestError> {
    let mut text = String::new();
    for (j, part) in parts.as_array().into_iter().flatten().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                text.push_str(part["text"].as_str().unwrap_or_default())
            }
            Some("refusal") => text.push_str(part["refusal"].as_str().unwrap_or_default()),
            kind => {
                return Err(RequestError::unsupported(
                    &format!("{at}[{j}]"),
                    format!("content parts of type {kind:?} are not supported; send input_text"),
                ))
            }
        }
    }
    Ok(text)
}

/// A flat function tool as a chat tool. Hosted tools (`web_search`,
/// `file_search`, ...) are not run here.
fn tool(tool: &Value, at: &str) -> Result<Value, RequestError> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        kind => {
            return Err(RequestError::unsupported(
                &format!("{at}.type"),
                format!("tools of type {kind:?} are not supported; send function tools"),
            ))
        }
    }
    let mut function = json!({"name": required_str(tool, "name", at)?});
    for key in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
            function[key] = value.clone();
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(choice: &Value) -> Result<Value, RequestError> {
    match choice {
        Value::String(mode) => Ok(mode.as_str().into()),
        _ => match choice.get("type").and_then(Value::as_str) {
            Some("function") => Ok(json!({
                "type": "function",
                "function": {"name": required_str(choice, "name", "tool_choice")?},
            })),
            kind => Err(RequestError::unsupported(
                "tool_choice",
                format!("tool_choice of type {kind:?} is not supported; use \"auto\", \"none\", \"required\" or a function"),
            )),
        },
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, RequestError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "description", "schema", "strict"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.to_owned(), value.clone());
                }
            }
            if !schema.contains_key("schema") {
                return Err(RequestError::invalid(
                    "text.format.schema",
                    "a json_schema format needs a schema",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(RequestError::invalid(
            "text.format.type",
            "text.format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn an_open_models_reasoning_goes_with_its_turn() {
        let req = request(json!({
            "model": "m",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x"}],
                 "content": [{"type": "reasoning_text", "text": "Needs a call."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "opaque"},
            ],
        }));
        let Translated { chat, .. } = chat_request(&req, Vec::new()).unwrap();
        let roles: Vec<_> = chat
            .messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "tool"]);
        assert_eq!(chat.messages[1]["reasoning_content"], "Needs a call.");
        assert_eq!(chat.messages[1]["tool_calls"][0]["id"], "call_1");
    }

    #[test]
    fn a_function_round_trip_becomes_chat_history() {
        let req = request(json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 40,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                 "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            ],
        }));
        let Translated { chat, history } = chat_request(&req, Vec::new()).unwrap();
        let roles: Vec<_> = chat
            .messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(history.len(), 3, "instructions are not history");
        assert_eq!(chat.messages[2]["content"], "Checking.");
        let call = &chat.messages[2]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(chat.messages[3]["tool_call_id"], "call_1");
        assert_eq!(chat.tool_choice.unwrap()["function"]["name"], "get_weather");
        assert_eq!(chat.tools.unwrap()[0]["function"]["strict"], true);
        assert_eq!(
            chat.response_format.unwrap()["json_schema"]["name"],
            json!("w")
        );
        assert_eq!(chat.sampling.max_tokens, Some(40));
    }

    #[test]
    fn a_next_turn_continues_the_stored_history() {
        let previous = vec![
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
        ];
        let req = request(json!({"model": "m", "input": "And now?", "instructions": "New rules."}));
        let Translated { chat, history } = chat_request(&req, previous).unwrap();
        assert_eq!(chat.messages.len(), 4);
        assert_eq!(chat.messages[0]["content"], "New rules.");
        assert_eq!(history.last().unwrap()["content"], "And now?");
    }

    #[test]
    fn bad_items_are_named() {
        let image = request(json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}));
        let error = chat_request(&image, Vec::new()).err().unwrap();
        assert_eq!(error.param(), Some("input[0].content[0]"));
        let hosted =
            request(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}));
        let error = chat_request(&hosted, Vec::new()).err().unwrap();
        assert_eq!(error.param(), Some("tools[0].type"));
        let call =
            request(json!({"model": "m", "input": [{"type": "function_call", "name": "f"}]}));
        let error = chat_request(&call, Vec::new()).err().unwrap();
        assert_eq!(error.param(), Some("input[0].call_id"));
        let empty = request(json!({"model": "m", "input": []}));
        let error = chat_request(&empty, Vec::new()).err().unwrap();
        assert_eq!(error.param(), Some("input"));
        let format =
            request(json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}));
        let error = chat_request(&format, Vec::new()).err().unwrap();
        assert_eq!(error.param(), Some("text.format.type"));
    }
}
