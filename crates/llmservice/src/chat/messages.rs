//! A chat request's messages, checked and shaped for chat templates.

use engine::chat::normalize_messages;
use serde_json::Value;

use super::tools;
use crate::error::RequestError;

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Checks the history's shape and turns it into what chat templates expect:
/// text-only content, `developer` as `system`, tool-call arguments as objects.
pub fn prepare_messages(messages: &[Value]) -> Result<Vec<Value>, RequestError> {
    if messages.is_empty() {
        return Err(RequestError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let Some(object) = message.as_object() else {
            return Err(RequestError::invalid(
                &format!("messages[{i}]"),
                "each message must be an object",
            ));
        };
        let role = object
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !ROLES.contains(&role) {
            return Err(RequestError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "unknown role {role:?}; expected one of {}",
                    ROLES.join(", ")
                ),
            ));
        }
        let mut object = object.clone();
        if role == "developer" {
            object.insert("role".into(), "system".into());
        }
        let param = || format!("messages[{i}].content");
        let content = match object.get("content") {
            None | Some(Value::Null) => {
                let has_calls = object.get("tool_calls").is_some_and(|c| !c.is_null())
                    || object.get("function_call").is_some_and(|c| !c.is_null());
                if role == "assistant" && has_calls {
                    Value::Null
                } else {
                    return Err(RequestError::invalid(
                        &param(),
                        "content is required for this message",
                    ));
                }
            }
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                Value::String(text_of_parts(parts).map_err(|m| RequestError::invalid(&param(), m))?)
            }
            Some(_) => {
                return Err(RequestError::invalid(
                    &param(),
                    "content must be a string or an array of content parts",
                ))
            }
        };
        object.insert("content".into(), content);
        out.push(Value::Object(object));
    }
    tools::check_history(&out)?;
    tools::legacy_history_as_tools(&mut out);
    normalize_messages(&mut out);
    Ok(out)
}

fn text_of_parts(parts: &[Value]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t),
                None => return Err("a text content part needs a string `text`".to_owned()),
            },
            Some(other) => {
                return Err(format!(
                "content parts of type {other:?} are not supported: this server takes text only"
            ))
            }
            None => return Err("each content part needs a `type`".to_owned()),
        }
    }
    Ok(texts.join("\n"))
}
