//! An upstream's streamed answer as the same per-choice events a local
//! generation gives (`generation::ChoiceEvent`), so every answer shape, the
//! cache and the usage accounting read it unchanged. The upstream is always
//! asked to stream (with usage); each chunk becomes events as it arrives.

use std::collections::HashSet;
use std::sync::Arc;

use engine::chat::StreamDelta;
use engine::{FinishReason, Usage};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

use super::{sse, Upstream, UpstreamError};
use crate::error::RequestError;
use crate::generation::ChoiceEvent;
use crate::telemetry::TokenTimer;

type Events = (u32, Result<ChoiceEvent, RequestError>);

/// A serialized request without the fields it leaves unset (upstreams
/// differ in what they accept as `null`).
pub fn strip_nulls(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
    }
    value
}

/// `body` (a chat request as JSON) sent upstream as a stream; the answer as
/// `n` choices' events.
pub async fn chat_events(
    upstream: &Arc<Upstream>,
    body: Value,
    n: u32,
    timer: TokenTimer,
) -> Result<impl Stream<Item = Events> + Send + 'static, UpstreamError> {
    events(upstream, "/chat/completions", body, n, timer, chat_deltas).await
}

/// The same for a legacy completion (`/completions`, `choices[].text`).
pub async fn completion_events(
    upstream: &Arc<Upstream>,
    body: Value,
    n: u32,
    timer: TokenTimer,
) -> Result<impl Stream<Item = Events> + Send + 'static, UpstreamError> {
    events(upstream, "/completions", body, n, timer, text_deltas).await
}

/// What one choice of a chunk adds.
type Deltas = fn(&Value, &mut HashSet<usize>) -> Vec<StreamDelta>;

async fn events(
    upstream: &Arc<Upstream>,
    path: &str,
    body: Value,
    n: u32,
    mut timer: TokenTimer,
    deltas: Deltas,
) -> Result<impl Stream<Item = Events> + Send + 'static, UpstreamError> {
    let mut body = strip_nulls(body);
    let stops = stop_list(&body);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (response, place) = upstream.post(path, &body).await?;
    let mut payloads = Box::pin(sse::payloads(response));
    Ok(async_stream::stream! {
        // The request's place on its replica lasts as long as the stream.
        let _place = place;
        let mut finish: Vec<Option<FinishReason>> = vec![None; n as usize];
        let mut started: Vec<HashSet<usize>> = vec![HashSet::new(); n as usize];
        let mut usage = Usage::default();
        let mut first = true;
        while let Some(payload) = payloads.next().await {
            let data = match payload {
                Ok(data) => data,
                Err(error) => {
                    yield (0, Err(RequestError::Upstream(UpstreamError::Failed(error))));
                    return;
                }
            };
            if data.trim() == "[DONE]" {
                break;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if let Some(error) = chunk.get("error") {
                let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_owned);
                yield (0, Err(RequestError::Upstream(UpstreamError::Failed(message))));
                return;
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                usage = usage_of(u);
            }
            for choice in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
                let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if index >= n as usize {
                    continue;
                }
                for delta in deltas(choice, &mut started[index]) {
                    if first {
                        timer.text();
                        first = false;
                    }
                    yield (index as u32, Ok(ChoiceEvent::Delta(delta, Vec::new())));
                }
                if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                    finish[index] = Some(finish_reason(reason, choice, &stops));
                }
            }
        }
        if finish.iter().all(Option::is_none) {
            yield (0, Err(RequestError::Upstream(UpstreamError::Failed(
                "the upstream's stream ended before its answer did".to_owned(),
            ))));
            return;
        }
        for (index, reason) in finish.into_iter().enumerate() {
            // The prompt is counted once, completions all together (OpenAI's usage).
            let usage = if index == 0 { usage } else { Usage { completion_tokens: 0, ..usage } };
            yield (index as u32, Ok(ChoiceEvent::Done(reason.unwrap_or(FinishReason::Stop), usage)));
        }
    })
}

/// The request's stop strings (`stop`: one or a list).
fn stop_list(body: &Value) -> Vec<String> {
    match body.get("stop") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A choice's finish. Which stop string ended it is known when the upstream
/// says so as vLLM does (`stop_reason`: the string); Anthropic's Messages API
/// names it.
fn finish_reason(reason: &str, choice: &Value, stops: &[String]) -> FinishReason {
    if reason == "length" {
        return FinishReason::Length;
    }
    choice
        .get("stop_reason")
        .and_then(Value::as_str)
        .and_then(|matched| stops.iter().position(|s| s == matched))
        .map_or(FinishReason::Stop, FinishReason::StopString)
}

fn usage_of(u: &Value) -> Usage {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0) as u32;
    Usage {
        prompt_tokens: n(u.get("prompt_tokens")),
        completion_tokens: n(u.get("completion_tokens")),
        cached_tokens: n(u.pointer("/prompt_tokens_details/cached_tokens")),
        accepted_draft_tokens: n(u.pointer("/completion_tokens_details/accepted_prediction_tokens")),
        draft_tokens: n(u.pointer("/completion_tokens_details/accepted_prediction_tokens"))
            + n(u.pointer("/completion_tokens_details/rejected_prediction_tokens")),
    }
}

/// A chat chunk's choice: reasoning (llama-server's and vLLM's
/// `reasoning_content`, newer vLLM's `reasoning`), content, then call pieces
/// (a call's first piece carries its id and name; the legacy `function_call`
/// is call 0).
fn chat_deltas(choice: &Value, started: &mut HashSet<usize>) -> Vec<StreamDelta> {
    let Some(delta) = choice.get("delta") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|key| {
        delta
            .get(key)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
    });
    if let Some(text) = reasoning {
        out.push(StreamDelta::Reasoning(text.to_owned()));
    }
    if let Some(text) = delta
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        out.push(StreamDelta::Content(text.to_owned()));
    }
    let legacy = delta
        .get("function_call")
        .filter(|f| f.is_object())
        .map(|f| json!([{"index": 0, "function": f}]));
    let calls = delta.get("tool_calls").cloned().or(legacy);
    for call in calls
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        let function = call.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        if started.insert(index) {
            out.push(StreamDelta::ToolCallStart {
                index,
                id: call
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("call_{index}"), str::to_owned),
                name: name.unwrap_or_default().to_owned(),
            });
        }
        if let Some(fragment) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            out.push(StreamDelta::ToolCallArguments {
                index,
                fragment: fragment.to_owned(),
            });
        }
    }
    out
}

/// A legacy completion chunk's choice: its text.
fn text_deltas(choice: &Value, _: &mut HashSet<usize>) -> Vec<StreamDelta> {
    choice
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(|t| vec![StreamDelta::Content(t.to_owned())])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_chunks_become_content_and_call_pieces() {
        let mut started = HashSet::new();
        let first = json!({"delta": {"role": "assistant", "reasoning_content": "Greet.", "content": "Hi",
            "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}});
        let deltas = chat_deltas(&first, &mut started);
        assert!(matches!(&deltas[0], StreamDelta::Reasoning(t) if t == "Greet."));
        assert!(matches!(&deltas[1], StreamDelta::Content(t) if t == "Hi"));
        assert!(
            matches!(&deltas[2], StreamDelta::ToolCallStart { index: 0, id, name } if id == "call_a" && name == "get_weather")
        );
        assert_eq!(deltas.len(), 3);
        let vllm = json!({"delta": {"reasoning_content": "", "reasoning": "Hmm", "content": null}});
        let deltas = chat_deltas(&vllm, &mut HashSet::new());
        assert!(matches!(&deltas[..], [StreamDelta::Reasoning(t)] if t == "Hmm"));
        let more = json!({"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}});
        let deltas = chat_deltas(&more, &mut started);
        assert!(
            matches!(&deltas[..], [StreamDelta::ToolCallArguments { index: 0, fragment }] if fragment == "{\"city\":")
        );
        let legacy = json!({"delta": {"function_call": {"name": "f", "arguments": "{}"}}});
        assert_eq!(chat_deltas(&legacy, &mut HashSet::new()).len(), 2);
    }

    #[test]
    fn a_stop_string_named_by_the_upstream_is_kept() {
        let body = json!({"stop": ["never", "e"]});
        let stops = stop_list(&body);
        let vllm = json!({"finish_reason": "stop", "stop_reason": "e"});
        assert_eq!(
            finish_reason("stop", &vllm, &stops),
            FinishReason::StopString(1)
        );
        let eos = json!({"finish_reason": "stop", "stop_reason": null});
        assert_eq!(finish_reason("stop", &eos, &stops), FinishReason::Stop);
        assert_eq!(finish_reason("length", &vllm, &stops), FinishReason::Length);
        assert_eq!(stop_list(&json!({"stop": "x"})), ["x"]);
    }

    #[test]
    fn usage_reads_cached_tokens() {
        let u = usage_of(&json!({"prompt_tokens": 10, "completion_tokens": 3,
                                 "prompt_tokens_details": {"cached_tokens": 4}}));
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (10, 3, 4)
        );
    }
}
