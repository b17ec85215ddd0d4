//! Conversation history around tools: checking calls and results, rewriting
//! legacy `function_call` turns as tool calls, and telling tools to templates
//! that cannot show them.

use serde_json::{json, Value};

use super::ToolPlan;
use crate::error::RequestError;

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
    // One object per call, one call per line: after a complete call the model
    // can simply stop, where a `{"tool_calls": [..]}` list invites it to open
    // another call it does not need.
    text.push_str(
        "To call a tool, reply with only this JSON object and nothing else: \
         {\"name\": \"<tool name>\", \"arguments\": {<arguments>}}\n",
    );
    if plan.parallel {
        text.push_str("To call several tools at once, write one such object per line.\n");
    }
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
        // The calls as the model is asked to write them: one object per line.
        let lines: Vec<String> = calls
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                if let Some(id) = c["id"].as_str() {
                    names.insert(id.to_owned(), c["function"]["name"].clone());
                }
                json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                    .to_string()
            })
            .collect();
        let text = lines.join("\n");
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
pub fn check_history(messages: &[Value]) -> Result<(), RequestError> {
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
            let param = format!("messages[{i}].tool_calls");
            if role != "assistant" {
                return Err(RequestError::invalid(
                    &param,
                    "only assistant messages carry tool_calls",
                ));
            }
            let calls = calls
                .as_array()
                .ok_or_else(|| RequestError::invalid(&param, "tool_calls must be an array"))?;
            for (j, call) in calls.iter().enumerate() {
                let param = format!("{param}[{j}]");
                check_call(call.get("function"), &format!("{param}.function"))?;
                if let Some(id) = call.get("id") {
                    if !id.is_string() {
                        return Err(RequestError::invalid(
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
                    return Err(RequestError::invalid(
                        &format!("messages[{i}].tool_call_id"),
                        "a tool message needs the tool_call_id it answers",
                    ))
                }
            }
        }
        if role == "function" && !message.get("name").is_some_and(Value::is_string) {
            return Err(RequestError::invalid(
                &format!("messages[{i}].name"),
                "a function message needs the function's name",
            ));
        }
    }
    Ok(())
}

fn check_call(function: Option<&Value>, param: &str) -> Result<(), RequestError> {
    let function = function
        .and_then(Value::as_object)
        .ok_or_else(|| RequestError::invalid(param, "a call needs a function object"))?;
    if !function.get("name").is_some_and(Value::is_string) {
        return Err(RequestError::invalid(
            &format!("{param}.name"),
            "a call needs a name",
        ));
    }
    match function.get("arguments") {
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(_)) => Ok(()),
            _ => Err(RequestError::invalid(
                &format!("{param}.arguments"),
                "arguments must be a JSON object encoded as a string",
            )),
        },
        Some(Value::Object(_)) => Ok(()),
        _ => Err(RequestError::invalid(
            &format!("{param}.arguments"),
            "a call needs its arguments",
        )),
    }
}
