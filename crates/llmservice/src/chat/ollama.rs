//! Ollama's `/api/chat` and `/api/generate` as chat requests: one translation
//! onto the OpenAI-shaped request the chat pipeline checks and runs.

use std::collections::VecDeque;

use serde_json::{json, Map, Value};

use super::chat_from_body;
use crate::error::RequestError;
use crate::wire::{ChatCompletionRequest, OllamaChatRequest, OllamaGenerateRequest};

/// The chat request an `/api/chat` request stands for.
pub fn chat_request(req: &OllamaChatRequest) -> Result<ChatCompletionRequest, RequestError> {
    let messages = messages(&req.messages)?;
    let mut body = body(
        &req.model,
        messages,
        req.format.as_ref(),
        req.options.as_ref(),
        req.stream,
        req.think.as_ref(),
    )?;
    if let Some(tools) = &req.tools {
        if !tools.is_empty() {
            body.insert("tools".into(), tools.clone().into());
        }
    }
    chat_from_body(body, "options")
}

/// Ollama's `think` as the template variable thinking models' templates read
/// (`enable_thinking`, Qwen3's): `false` turns thinking off, `true` or a
/// level (`"low"`, ...) on. Templates without the variable ignore it.
fn thinking(body: &mut Map<String, Value>, think: Option<&Value>) {
    let enable = match think {
        Some(Value::Bool(on)) => *on,
        Some(Value::String(level)) => !level.is_empty(),
        _ => return,
    };
    body.insert(
        "chat_template_kwargs".into(),
        json!({"enable_thinking": enable}),
    );
}

/// The chat request an `/api/generate` request with a prompt stands for: the
/// prompt as the user's turn, rendered with the model's template.
pub fn generate_request(
    req: &OllamaGenerateRequest,
    prompt: &str,
) -> Result<ChatCompletionRequest, RequestError> {
    if req.raw == Some(true) {
        return Err(RequestError::unsupported(
            "raw",
            "raw prompts are not supported; send the prompt without raw, or use /v1/completions",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(RequestError::unsupported(
            "suffix",
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(RequestError::unsupported(
            "images",
            "images are not supported: no model here reads them",
        ));
    }
    let mut messages = Vec::new();
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    chat_from_body(
        body(
            &req.model,
            messages,
            req.format.as_ref(),
            req.options.as_ref(),
            req.stream,
            req.think.as_ref(),
        )?,
        "options",
    )
}

/// Whether a `keep_alive` asks to unload now: `0`, `"0"` or a zero duration.
pub fn unloads_now(keep_alive: Option<&Value>) -> bool {
    match keep_alive {
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => {
            let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
            digits.parse::<f64>().is_ok_and(|v| v == 0.0)
        }
        _ => false,
    }
}

/// A chat request's body: `model`, `messages`, and what `format`, `options`,
/// `stream` (which defaults to true in Ollama) and `think` ask for.
fn body(
    model: &str,
    messages: Vec<Value>,
    format: Option<&Value>,
    options: Option<&Value>,
    stream: Option<bool>,
    think: Option<&Value>,
) -> Result<Map<String, Value>, RequestError> {
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), messages.into());
    body.insert("stream".into(), stream.unwrap_or(true).into());
    thinking(&mut body, think);
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => {
            body.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(schema @ Value::Object(_)) => {
            body.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
        }
        Some(_) => {
            return Err(RequestError::invalid(
                "format",
                "format must be \"json\" or a JSON schema",
            ))
        }
    }
    let Some(options) = options.filter(|o| !o.is_null()) else {
        return Ok(body);
    };
    let Value::Object(options) = options else {
        return Err(RequestError::invalid(
            "options",
            "options must be an object",
        ));
    };
    // Ollama's option names onto ours; `num_ctx` and runner options are
    // accepted and left to the model's configuration.
    let names = [
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repeat_penalty"),
        ("repeat_last_n", "repeat_last_n"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
        ("seed", "seed"),
        ("stop", "stop"),
    ];
    for (theirs, ours) in names {
        if let Some(value) = options.get(theirs).filter(|v| !v.is_null()) {
            body.insert(ours.into(), value.clone());
        }
    }
    // Ollama caps num_predict at the context rather than refusing it, and
    // -1 (and -2) mean "until the context is full": llama-server's n_predict.
    if let Some(n) = options.get("num_predict").and_then(Value::as_i64) {
        body.insert("n_predict".into(), n.into());
    }
    Ok(body)
}

/// Ollama's messages as chat's: calls get ids, and each `tool` message answers
/// the oldest open call (of its `tool_name`, when it says).
fn messages(messages: &[Value]) -> Result<Vec<Value>, RequestError> {
    let mut out = Vec::with_capacity(messages.len());
    let mut open: VecDeque<(String, String)> = VecDeque::new();
    let mut made = 0usize;
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if message.get("images").is_some_and(|v| !v.is_null()) {
            return Err(RequestError::unsupported(
                &format!("{at}.images"),
                "images are not supported by this server's models",
            ));
        }
        let content = message.get("content").cloned().unwrap_or_else(|| "".into());
        match role {
            "system" | "user" => out.push(json!({"role": role, "content": content})),
            "assistant" => {
                let mut turn = json!({"role": "assistant", "content": content});
                let calls = message.get("tool_calls").and_then(Value::as_array);
                let calls: Vec<Value> = calls
                    .into_iter()
                    .flatten()
                    .map(|call| {
                        made += 1;
                        let id = format!("call{made:05}");
                        let name = call["function"]["name"].as_str().unwrap_or_default();
                        open.push_back((name.to_owned(), id.clone()));
                        let arguments = match &call["function"]["arguments"] {
                            Value::String(text) => text.clone(),
                            other => other.to_string(),
                        };
                        json!({"id": id, "type": "function",
                            "function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
                if !calls.is_empty() {
                    turn["tool_calls"] = calls.into();
                }
                if let Some(thinking) = message.get("thinking").filter(|t| t.is_string()) {
                    turn["reasoning_content"] = thinking.clone();
                }
                out.push(turn);
            }
            "tool" => {
                let name = message.get("tool_name").and_then(Value::as_str);
                let answered = name
                    .and_then(|n| open.iter().position(|(open_name, _)| open_name == n))
                    .or((!open.is_empty()).then_some(0));
                let Some((_, id)) = answered.and_then(|i| open.remove(i)) else {
                    return Err(RequestError::invalid(
                        &at,
                        "a tool message must follow an assistant message with tool_calls",
                    ));
                };
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            _ => {
                return Err(RequestError::invalid(
                    &format!("{at}.role"),
                    "role must be system, user, assistant or tool",
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_format_and_tool_history_translate() {
        let req: OllamaChatRequest = serde_json::from_value(json!({
            "model": "light",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ],
            "format": {"type": "object"},
            "options": {"num_predict": 12, "temperature": 0, "stop": ["\n"], "num_ctx": 4096},
        }))
        .unwrap();
        let chat = chat_request(&req).unwrap();
        assert_eq!(
            chat.sampling.stream,
            Some(true),
            "Ollama streams by default"
        );
        // As llama-server's n_predict: capped at the context, never refused.
        assert_eq!(chat.sampling.n_predict, Some(12));
        assert_eq!(chat.sampling.temperature, Some(0.0));
        assert_eq!(chat.chat_template_kwargs, None, "no think, no variable");
        assert_eq!(chat.response_format.unwrap()["type"], "json_schema");
        let call = &chat.messages[1]["tool_calls"][0];
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(chat.messages[2]["tool_call_id"], call["id"]);
    }

    #[test]
    fn bad_shapes_name_their_field() {
        let req = |body: Value| serde_json::from_value::<OllamaChatRequest>(body).unwrap();
        let orphan = req(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}));
        assert_eq!(
            chat_request(&orphan).unwrap_err().param(),
            Some("messages[0]")
        );
        let format = req(json!({"model": "m", "messages": [], "format": 3}));
        assert_eq!(chat_request(&format).unwrap_err().param(), Some("format"));
        let image = req(
            json!({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
        );
        assert_eq!(
            chat_request(&image).unwrap_err().param(),
            Some("messages[0].images")
        );
        assert!(unloads_now(Some(&json!(0))) && unloads_now(Some(&json!("0s"))));
        assert!(!unloads_now(Some(&json!("5m"))) && !unloads_now(None));
    }

    #[test]
    fn think_sets_the_templates_enable_thinking() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (think, enable) in [
            (json!(false), false),
            (json!(true), true),
            (json!("low"), true),
        ] {
            let req: OllamaChatRequest =
                serde_json::from_value(json!({"model": "m", "messages": user, "think": think}))
                    .unwrap();
            let chat = chat_request(&req).unwrap();
            assert_eq!(
                chat.chat_template_kwargs.unwrap()["enable_thinking"],
                enable,
                "{think}"
            );
        }
    }
}
