//! Thinking models: the `<think>` block their template teaches goes to the
//! client apart from the answer, on every API. SmolLM2 does not think on its
//! own: a grammar makes it write the block Qwen3's template teaches, or a
//! template opens the block in the prompt, as DeepSeek-R1's does.

use serde_json::{json, Value};

use crate::common::{error_of, shared_models, sse_events, TestApp};

/// The shape of a thinking model's output: a block of words, then words.
const THOUGHT_THEN_ANSWER: &str = r#"root ::= "<think>\n" words "\n</think>\n\n" words
words ::= [a-z]+ (" " [a-z]+){1,5}
"#;

/// A ChatML template whose generation prompt opens the block, and that drops
/// earlier turns' thoughts as DeepSeek-R1's does.
const OPENS_THE_BLOCK: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n\
{% if '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}\
<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}";

fn qwen3() -> String {
    shared_models()
        .join("../templates/qwen3.jinja")
        .display()
        .to_string()
}

fn words(text: &str) -> bool {
    !text.is_empty()
        && text
            .split(' ')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The text a stream's chat chunks carry under `key` of their delta.
fn joined(events: &[Value], key: &str) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"][key].as_str())
        .collect()
}

#[tokio::test]
async fn chat_gives_the_reasoning_apart_from_the_answer() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen3())]);
    let body = json!({"model": "light", "temperature": 0, "max_tokens": 80,
        "grammar": THOUGHT_THEN_ANSWER,
        "messages": [{"role": "user", "content": "Is the sky blue?"}]});
    let (status, _, whole) = app.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let message = &whole["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap();
    let content = message["content"].as_str().unwrap();
    assert!(words(reasoning), "{whole}");
    assert!(words(content), "{whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");

    // Streamed, the same pieces arrive under the same names.
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let (status, headers, sse) = app.post("/v1/chat/completions", streamed).await;
    assert_eq!(status, 200, "{sse}");
    let events = sse_events(&headers, &sse);
    assert_eq!(joined(&events, "reasoning_content"), reasoning);
    assert_eq!(joined(&events, "content"), content);
    let first_reasoning = events
        .iter()
        .position(|e| e["choices"][0]["delta"]["reasoning_content"].is_string());
    let first_content = events.iter().position(|e| {
        e["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    });
    assert!(first_reasoning < first_content, "thoughts come first");

    // `reasoning_format: "none"` keeps the model's own text, block and all.
    let mut raw = body.clone();
    raw["reasoning_format"] = "none".into();
    let (status, _, kept) = app.post("/v1/chat/completions", raw).await;
    assert_eq!(status, 200, "{kept}");
    let message = &kept["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{kept}");
    assert_eq!(
        message["content"],
        format!("<think>\n{reasoning}\n</think>\n\n{content}")
    );

    let mut bad = body.clone();
    bad["reasoning_format"] = "hidden".into();
    let (status, _, refused) = app.post("/v1/chat/completions", bad).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&refused)["param"], "reasoning_format");

    // A client sends the thoughts back with the turn: the template drops
    // them from history as Qwen3's does, so the prompt is the same length.
    let turn = |reasoning: Option<&str>| {
        let mut assistant = json!({"role": "assistant", "content": content});
        if let Some(r) = reasoning {
            assistant["reasoning_content"] = r.into();
        }
        json!({"model": "light", "max_tokens": 1, "messages": [
            {"role": "user", "content": "Is the sky blue?"}, assistant,
            {"role": "user", "content": "Why?"}]})
    };
    let (_, _, plain) = app.post("/v1/chat/completions", turn(None)).await;
    let (status, _, with) = app
        .post("/v1/chat/completions", turn(Some(reasoning)))
        .await;
    assert_eq!(status, 200, "{with}");
    assert_eq!(
        with["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
}

#[tokio::test]
async fn a_cached_answer_keeps_its_reasoning() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen3()), ("ENABLE_CACHE", "true")]);
    let body = json!({"model": "light", "temperature": 0, "max_tokens": 80,
        "grammar": THOUGHT_THEN_ANSWER,
        "messages": [{"role": "user", "content": "Is water wet?"}]});
    let (_, _, fresh) = app.post("/v1/chat/completions", body.clone()).await;
    let (status, headers, again) = app.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(
        again["choices"][0]["message"],
        fresh["choices"][0]["message"]
    );
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let (_, headers, sse) = app.post("/v1/chat/completions", streamed).await;
    let events = sse_events(&headers, &sse);
    assert_eq!(
        joined(&events, "reasoning_content"),
        fresh["choices"][0]["message"]["reasoning_content"]
            .as_str()
            .unwrap()
    );
    // Keeping the block in the content is another answer, not this one.
    let mut raw = body;
    raw["reasoning_format"] = "none".into();
    let (_, headers, kept) = app.post("/v1/chat/completions", raw).await;
    assert_eq!(headers["x-llmservice-cache"], "miss");
    assert!(kept["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("<think>"));
}

/// Each `data:` payload of a stream with named events, as JSON.
fn named_events(body: &Value) -> Vec<Value> {
    body.as_str()
        .unwrap()
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect()
}

#[tokio::test]
async fn a_block_the_prompt_opens_is_reasoning_on_every_api() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", OPENS_THE_BLOCK)]);
    let question = "Name a colour.";

    // The model never closes the block: all it says within the budget is
    // thought, and the answer is empty.
    let (status, _, chat) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": question}]}),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    let message = &chat["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap().to_owned();
    assert!(!reasoning.is_empty() && !reasoning.contains("<think>"));
    assert_eq!(message["content"], "");
    assert_eq!(chat["choices"][0]["finish_reason"], "length");

    // Ollama: `thinking` in the message, line by line when streamed.
    let ollama = json!({"model": "light", "options": {"temperature": 0, "num_predict": 12},
        "messages": [{"role": "user", "content": question}]});
    let (status, _, lines) = app.post("/api/chat", ollama.clone()).await;
    assert_eq!(status, 200, "{lines}");
    let lines: Vec<Value> = lines
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let thinking: String = lines
        .iter()
        .filter_map(|l| l["message"]["thinking"].as_str())
        .collect();
    assert_eq!(thinking, reasoning);
    let mut whole = ollama;
    whole["stream"] = false.into();
    let (_, _, whole) = app.post("/api/chat", whole).await;
    assert_eq!(whole["message"]["thinking"], reasoning.as_str());
    assert_eq!(whole["message"]["content"], "");
    let (_, _, generated) = app
        .post(
            "/api/generate",
            json!({"model": "light", "prompt": question, "stream": false,
                "options": {"temperature": 0, "num_predict": 12}}),
        )
        .await;
    assert_eq!(generated["thinking"], reasoning.as_str(), "{generated}");
    assert_eq!(generated["response"], "");

    // Responses: a reasoning item, and no message.
    let responses = json!({"model": "light", "input": question, "temperature": 0,
        "max_output_tokens": 12});
    let (status, _, response) = app.post("/v1/responses", responses.clone()).await;
    assert_eq!(status, 200, "{response}");
    let output = response["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{response}");
    assert_eq!(output[0]["type"], "reasoning");
    assert_eq!(output[0]["content"][0]["type"], "reasoning_text");
    assert_eq!(output[0]["content"][0]["text"], reasoning.as_str());
    let mut streamed = responses;
    streamed["stream"] = true.into();
    let (_, _, sse) = app.post("/v1/responses", streamed).await;
    let events = named_events(&sse);
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.reasoning_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(deltas, reasoning);
    assert!(events
        .iter()
        .any(|e| e["type"] == "response.reasoning_text.done" && e["text"] == reasoning.as_str()));

    // Messages: a thinking block, streamed as thinking deltas.
    let messages = json!({"model": "light", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": question}]});
    let (status, _, answer) = app.post("/v1/messages", messages.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["content"][0]["type"], "thinking", "{answer}");
    assert_eq!(answer["content"][0]["thinking"], reasoning.as_str());
    assert_eq!(answer["content"][0]["signature"], "");
    assert_eq!(answer["content"].as_array().unwrap().len(), 1);
    let mut streamed = messages;
    streamed["stream"] = true.into();
    let (_, _, sse) = app.post("/v1/messages", streamed).await;
    let events = named_events(&sse);
    assert!(events
        .iter()
        .any(|e| e["type"] == "content_block_start" && e["content_block"]["type"] == "thinking"));
    let deltas: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "thinking_delta")
        .filter_map(|e| e["delta"]["thinking"].as_str())
        .collect();
    assert_eq!(deltas, reasoning);

    // The thoughts an Anthropic client sends back are read, not refused.
    let (status, _, _) = app
        .post(
            "/v1/messages",
            json!({"model": "light", "max_tokens": 1, "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer["content"]},
                {"role": "user", "content": "Another."}]}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_upstreams_reasoning_passes_through() {
    let upstream = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", OPENS_THE_BLOCK)]);
    let url = format!("{}/v1", upstream.spawn().await);
    let front = TestApp::new(&[
        ("MEDIUM_BACKEND", "openai"),
        ("MEDIUM_BASE_URL", &url),
        ("MEDIUM_UPSTREAM_MODEL", "light"),
        ("MEDIUM_API_KEY", crate::common::OPERATOR_KEY),
    ]);
    let ask = |model: &str| {
        json!({"model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "Name a colour."}]})
    };
    let (_, _, direct) = upstream.post("/v1/chat/completions", ask("light")).await;
    let reasoning = direct["choices"][0]["message"]["reasoning_content"].clone();
    assert!(
        reasoning.as_str().is_some_and(|r| !r.is_empty()),
        "{direct}"
    );
    let (status, _, proxied) = front.post("/v1/chat/completions", ask("medium")).await;
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(
        proxied["choices"][0]["message"]["reasoning_content"],
        reasoning
    );
    assert_eq!(proxied["choices"][0]["message"]["content"], "");
    // Translated APIs in front read it too.
    let (status, _, ollama) = front
        .post(
            "/api/chat",
            json!({"model": "medium", "stream": false,
                "options": {"temperature": 0, "num_predict": 12},
                "messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .await;
    assert_eq!(status, 200, "{ollama}");
    assert_eq!(ollama["message"]["thinking"], reasoning);
}

#[tokio::test]
async fn a_constrained_answer_comes_after_the_thought_the_prompt_opened() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", OPENS_THE_BLOCK)]);
    let schema = json!({"type": "object", "required": ["name", "population"],
        "properties": {"name": {"type": "string"}, "population": {"type": "integer"}}});
    let ask = |extra: Value| {
        let mut body = json!({"model": "light", "temperature": 0, "max_tokens": 60,
            "messages": [{"role": "user", "content": "Give a city."}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "city", "schema": schema}}});
    // SmolLM2 does not close a block of its own: the answer never comes, and
    // what it wrote is thought, not a JSON answer filed as thought.
    let (status, _, thinking) = app.post("/v1/chat/completions", ask(format.clone())).await;
    assert_eq!(status, 200, "{thinking}");
    let message = &thinking["choices"][0]["message"];
    assert_eq!(message["content"], "", "{thinking}");
    let thought = message["reasoning_content"].as_str().unwrap();
    assert!(!thought.trim_start().starts_with('{'), "{thinking}");
    assert_eq!(thinking["choices"][0]["finish_reason"], "length");

    // Made likely to close its block (a bias towards "</"), it closes it and
    // then answers as the schema says.
    let (_, _, tokens) = app
        .post(
            "/tokenize",
            json!({"model": "light", "content": "</think>", "add_special": false}),
        )
        .await;
    let close = tokens["tokens"][0].as_u64().unwrap().to_string();
    let bias = json!({"logit_bias": {close.as_str(): 6}});
    let mut biased = ask(format);
    biased["logit_bias"] = bias["logit_bias"].clone();
    let (status, _, answer) = app.post("/v1/chat/completions", biased).await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let city: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert!(
        city["name"].is_string() && city["population"].is_i64(),
        "{answer}"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    // A forced call, the same way.
    let mut forced = ask(
        json!({"tool_choice": "required", "tools": [{"type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}),
    );
    forced["logit_bias"] = bias["logit_bias"].clone();
    let (status, _, called) = app.post("/v1/chat/completions", forced).await;
    assert_eq!(status, 200, "{called}");
    let call = &called["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "lookup", "{called}");
    assert_eq!(called["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn messages_turn_thinking_on_and_off() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen3())]);
    let count = |thinking: Option<Value>| {
        let mut body = json!({"model": "light",
            "messages": [{"role": "user", "content": "Hi"}]});
        if let Some(thinking) = thinking {
            body["thinking"] = thinking;
        }
        let app = &app;
        async move {
            let (status, _, counted) = app.post("/v1/messages/count_tokens", body).await;
            assert_eq!(status, 200, "{counted}");
            counted["input_tokens"].as_u64().unwrap()
        }
    };
    // Qwen3's template closes an empty block when thinking is off, and
    // thinks unless told otherwise.
    let unasked = count(None).await;
    let disabled = count(Some(json!({"type": "disabled"}))).await;
    let enabled = count(Some(json!({"type": "enabled", "budget_tokens": 1024}))).await;
    assert_eq!(unasked, enabled);
    assert!(enabled < disabled, "{enabled} vs {disabled}");
    let (status, _, refused) = app
        .post(
            "/v1/messages",
            json!({"model": "light", "max_tokens": 4, "thinking": {"type": "sometimes"},
                "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
}

#[tokio::test]
async fn ollama_clients_see_a_thinking_model_as_one() {
    for (app, thinks) in [
        (TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen3())]), true),
        (TestApp::new(&[]), false),
    ] {
        let (status, _, shown) = app.post("/api/show", json!({"model": "light"})).await;
        assert_eq!(status, 200, "{shown}");
        let capabilities = shown["capabilities"].as_array().unwrap();
        assert_eq!(capabilities.contains(&json!("thinking")), thinks, "{shown}");
    }
}

#[tokio::test]
async fn a_block_the_prompt_closed_is_not_opened_again() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen3())]);
    let (_, _, tokens) = app
        .post(
            "/tokenize",
            json!({"model": "light", "content": "<think>", "add_special": false}),
        )
        .await;
    // A strong pull towards writing "<think>", token by token.
    let bias: serde_json::Map<String, Value> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t.as_u64().unwrap().to_string(), json!(15)))
        .collect();
    let ask = |enable_thinking: bool| {
        json!({"model": "light", "temperature": 0, "max_tokens": 40, "logit_bias": bias,
            "chat_template_kwargs": {"enable_thinking": enable_thinking},
            "response_format": {"type": "json_schema", "json_schema": {"name": "f",
                "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                           "required": ["ok"]}}},
            "messages": [{"role": "user", "content": "Is the sky blue?"}]})
    };
    // Thinking on: the model may think before the answer, and does.
    let (status, _, thinking) = app.post("/v1/chat/completions", ask(true)).await;
    assert_eq!(status, 200, "{thinking}");
    assert!(
        thinking["choices"][0]["message"]["reasoning_content"].is_string(),
        "{thinking}"
    );
    // Thinking off (Qwen3's prompt closes an empty block): the answer is
    // the JSON, whatever the pull.
    let (status, _, answer) = app.post("/v1/chat/completions", ask(false)).await;
    assert_eq!(status, 200, "{answer}");
    let message = &answer["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{answer}");
    let value: Value = serde_json::from_str(message["content"].as_str().unwrap()).unwrap();
    assert!(value["ok"].is_boolean(), "{answer}");
}
