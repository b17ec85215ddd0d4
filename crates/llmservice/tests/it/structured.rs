//! Constrained output and tool calls on the real SmolLM2: GBNF, the Hermes
//! tool syntax through a configured Qwen 2.5 template (streamed and not),
//! built-in functions, and the 400s for what cannot be honoured.

use serde_json::{json, Value};

use crate::common::*;

fn qwen_template() -> String {
    shared_models()
        .join("../templates/qwen25.jinja")
        .display()
        .to_string()
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}])
}

fn chunks_of(body: &Value) -> Vec<Value> {
    let payloads = sse_payloads(body.as_str().expect("an SSE body"));
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

#[tokio::test]
async fn gbnf_grammar_constrains_every_sample() {
    let app = TestApp::new(&[]);
    let grammar = r#"root ::= answer " because " reason
answer ::= "yes" | "no"
reason ::= [a-z]+ (" " [a-z]+){0,4} "."
"#;
    for seed in 0..4 {
        let (status, _, body) = app
            .post(
                "/v1/chat/completions",
                json!({"model": "light", "temperature": 1.0, "seed": seed, "max_tokens": 60, "grammar": grammar,
                    "messages": [{"role": "user", "content": "Is the sky blue?"}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let (answer, reason) = text.split_once(" because ").expect(text);
        assert!(answer == "yes" || answer == "no", "{text}");
        assert!(reason.ends_with('.'), "{text}");
        let words: Vec<&str> = reason.trim_end_matches('.').split(' ').collect();
        assert!((1..=5).contains(&words.len()), "{text}");
        assert!(words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "grammar": "root ::= missing-rule", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "grammar");
    assert_eq!(error_of(&body)["code"], "invalid_grammar");
}

#[tokio::test]
async fn legacy_completions_follow_a_grammar_or_a_schema() {
    let app = TestApp::new(&[]);
    // Every choice of every prompt follows the grammar.
    let (status, _, body) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": ["Is the sky blue?", "Is fire cold?"], "n": 2,
                "temperature": 1.0, "seed": 3, "max_tokens": 8, "grammar": "root ::= \"yes\" | \"no\""}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for choice in choices {
        let text = choice["text"].as_str().unwrap();
        assert!(text == "yes" || text == "no", "{choice}");
        assert_eq!(choice["finish_reason"], "stop", "{choice}");
    }
    // A schema, streamed: the text put together parses and fits it.
    let schema = json!({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": false});
    let (status, _, body) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": "Is the sky blue? Answer in JSON.", "stream": true, "max_tokens": 40,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let chunks = chunks_of(&body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let answer: Value = serde_json::from_str(&text).expect(&text);
    assert!(
        answer["answer"] == "yes" || answer["answer"] == "no",
        "{text}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 1, "{text}");
    // What cannot be honoured is the client's 400, named.
    for (bad, param) in [
        (json!({"grammar": "root ::= missing-rule"}), "grammar"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}),
            "grammar",
        ),
    ] {
        let mut request = json!({"model": "light", "prompt": "Hi", "max_tokens": 4});
        request
            .as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, _, body) = app.post("/v1/completions", request).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(error_of(&body)["param"], param, "{bad}: {body}");
    }
}

#[tokio::test]
async fn hermes_tool_calls_stream_exactly_like_the_whole_answer() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen_template())]);
    let request = |stream: bool| {
        json!({"model": "light", "temperature": 0, "max_tokens": 200, "stream": stream, "logprobs": true,
            "tools": weather_tools(), "tool_choice": "required", "parallel_tool_calls": false,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
    };
    let (status, _, whole) = app.post("/v1/chat/completions", request(false)).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string());
    assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()));

    let (status, _, body) = app.post("/v1/chat/completions", request(true)).await;
    assert_eq!(status, 200);
    let chunks = chunks_of(&body);
    let mut streamed_arguments = String::new();
    let mut starts = 0;
    for chunk in &chunks {
        let delta = &chunk["choices"][0]["delta"];
        if let Some(content) = delta["content"].as_str() {
            assert!(
                !content.contains("<tool_call>"),
                "raw tag leaked: {content}"
            );
        }
        let Some(calls) = delta["tool_calls"].as_array() else {
            continue;
        };
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["index"], 0);
        if calls[0].get("id").is_some() {
            starts += 1;
            assert_eq!(calls[0]["type"], "function");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
        } else {
            // Later fragments carry only the index and argument text.
            assert_eq!(calls[0].as_object().unwrap().len(), 2, "{chunk}");
            assert!(calls[0]["function"].get("name").is_none());
        }
        streamed_arguments.push_str(calls[0]["function"]["arguments"].as_str().unwrap());
    }
    assert_eq!(starts, 1);
    assert_eq!(streamed_arguments, calls[0]["function"]["arguments"]);
    // Every generated token's logprob is sent, the closing tag's included.
    let streamed_logprobs: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    let whole_logprobs = choice["logprobs"]["content"].as_array().unwrap().len();
    assert_eq!(streamed_logprobs, whole_logprobs);
    assert_eq!(
        whole_logprobs as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The call and its result go back into the history and render.
    let call_id = calls[0]["id"].clone();
    let (status, _, next) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "temperature": 0, "max_tokens": 20, "tools": weather_tools(),
                "messages": [
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": calls},
                    {"role": "tool", "tool_call_id": call_id, "content": "{\"temperature\": 21}"}]}),
        )
        .await;
    assert_eq!(status, 200, "{next}");
    assert!(next["usage"]["prompt_tokens"].as_u64().unwrap() > 150);
}

#[tokio::test]
async fn builtin_functions_run_and_the_conversation_continues() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen_template())]);
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "temperature": 0, "max_tokens": 80, "execute_builtin_functions": true,
                "tool_choice": {"type": "function", "function": {"name": "get_current_time"}},
                "messages": [{"role": "user", "content": "What time is it in Tokyo?"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // One round alone is the prompt and one forced call; a second round
    // re-reads the prompt with the call and the function's result appended.
    let (_, _, single) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "temperature": 0, "max_tokens": 80, "parallel_tool_calls": false,
                "tools": crate::structured::builtin_tools(&app).await,
                "tool_choice": {"type": "function", "function": {"name": "get_current_time"}},
                "messages": [{"role": "user", "content": "What time is it in Tokyo?"}]}),
        )
        .await;
    assert_eq!(single["choices"][0]["finish_reason"], "tool_calls");
    let one_round = single["usage"]["prompt_tokens"].as_u64().unwrap();
    let rounds = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(rounds > 2 * one_round, "{rounds} vs {one_round}");

    // Streamed, the rounds run the same and the answer streams as it is made:
    // the same content, finish reason and usage as without streaming.
    let ask = |stream: bool| {
        json!({"model": "light", "temperature": 0, "max_tokens": 60, "execute_builtin_functions": true,
            "stream": stream, "stream_options": {"include_usage": true},
            "tool_choice": {"type": "function", "function": {"name": "days_between"}},
            "messages": [{"role": "user", "content": "How many days are there from 2024-01-01 to 2024-03-01?"}]})
    };
    let (status, _, whole) = app.post("/v1/chat/completions", ask(false)).await;
    assert_eq!(status, 200, "{whole}");
    let (status, _, streamed) = app.post("/v1/chat/completions", ask(true)).await;
    assert_eq!(status, 200, "{streamed}");
    let chunks = chunks_of(&streamed);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let message = &whole["choices"][0]["message"];
    assert_eq!(content, message["content"].as_str().unwrap_or(""));
    assert!(
        chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty()))
            .count()
            > 1,
        "the answer streams in pieces"
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, whole["choices"][0]["finish_reason"]);
    let usage = &chunks.last().unwrap()["usage"];
    for field in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(usage[field], whole["usage"][field], "{field}");
    }
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 2 * one_round);

    let (status, list) = app.get("/v1/functions").await;
    assert_eq!(status, 200);
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "convert_timezone"));
}

/// The built-ins as ordinary tools, in registry order.
pub async fn builtin_tools(app: &TestApp) -> Value {
    let (_, list) = app.get("/v1/functions").await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!({"type": "function", "function": f}))
        .collect()
}

#[tokio::test]
async fn tool_and_legacy_histories_render_through_every_template() {
    let tool_history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "18 and sunny"},
    ]);
    let legacy_history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"role": "function", "name": "get_weather", "content": "18 and sunny"},
    ]);
    let functions: Vec<Value> = weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"].clone())
        .collect();
    for template in [
        "gemma3",
        "llama31",
        "mistral_nemo",
        "mistral_small32",
        "qwen25",
        "qwen3",
    ] {
        let path = shared_models().join(format!("../templates/{template}.jinja"));
        let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", path.to_str().unwrap())]);
        for body in [
            json!({"messages": tool_history, "tools": weather_tools()}),
            json!({"messages": tool_history}),
            json!({"messages": legacy_history, "functions": functions}),
        ] {
            let mut body = body;
            body["model"] = "light".into();
            body["max_tokens"] = 2.into();
            let (status, _, answer) = app.post("/v1/chat/completions", body.clone()).await;
            assert_eq!(status, 200, "{template}: {answer}\n{body}");
        }
        // Built-in rounds feed results back through the same template.
        let (status, _, answer) = app
            .post(
                "/v1/chat/completions",
                json!({"model": "light", "max_tokens": 30, "execute_builtin_functions": true,
                    "tool_choice": {"type": "function", "function": {"name": "days_between"}},
                    "messages": [{"role": "user", "content": "Days from 2024-01-01 to 2024-03-01?"}]}),
            )
            .await;
        assert_eq!(status, 200, "{template}: {answer}");
    }
}

#[tokio::test]
async fn with_tool_choice_auto_a_call_the_model_opens_is_valid() {
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", &qwen_template())]);
    let mut calls = 0;
    // Which seeds call depends on the CPU's kernels (AVX2 and AVX-512 round
    // differently): draw until a few have.
    for seed in 0..40 {
        if calls >= 2 {
            break;
        }
        let (status, _, body) = app
            .post(
                "/v1/chat/completions",
                json!({"model": "light", "temperature": 0.9, "seed": seed, "max_tokens": 150,
                    "tools": weather_tools(),
                    "messages": [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        let content = choice["message"]["content"].as_str().unwrap_or("");
        if choice["finish_reason"] != "length" {
            assert!(
                !content.contains("<tool_call>\n"),
                "an opened call was not made valid: {content}"
            );
        }
        for call in choice["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            calls += 1;
            assert_eq!(call["function"]["name"], "get_weather");
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(arguments["city"].as_str().is_some_and(|c| c.len() <= 30));
            assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()));
        }
    }
    assert!(calls > 0, "no seed made the model call the tool");
}

#[tokio::test]
async fn with_tools_and_a_json_response_format_the_answer_is_that_json_or_calls() {
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
        "sunny": {"type": "boolean"}}, "required": ["city", "sunny"], "additionalProperties": false});
    // The generic JSON form (SmolLM2's own template) and Hermes (Qwen 2.5's).
    for template in [None, Some(qwen_template())] {
        let env: Vec<(&str, &str)> = template
            .as_deref()
            .map(|t| vec![("LIGHT_CHAT_TEMPLATE", t)])
            .unwrap_or_default();
        let app = TestApp::new(&env);
        let (mut answers, mut calls) = (0, 0);
        for seed in 0..6 {
            let (status, _, body) = app
                .post(
                    "/v1/chat/completions",
                    json!({"model": "light", "temperature": 0.9, "seed": seed, "max_tokens": 80,
                        "tools": weather_tools(),
                        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
                        "messages": [{"role": "user", "content": "Is it sunny in Paris?"}]}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            match choice["finish_reason"].as_str() {
                Some("tool_calls") => {
                    for call in choice["message"]["tool_calls"].as_array().unwrap() {
                        assert_eq!(call["function"]["name"], "get_weather");
                        let arguments: Value =
                            serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
                                .unwrap();
                        assert!(arguments["city"].is_string(), "{arguments}");
                    }
                    calls += 1;
                }
                Some("stop") => {
                    let content = choice["message"]["content"].as_str().unwrap();
                    let answer: Value = serde_json::from_str(content).expect(content);
                    assert!(
                        answer["city"].is_string() && answer["sunny"].is_boolean(),
                        "{content}"
                    );
                    assert_eq!(answer.as_object().unwrap().len(), 2, "{content}");
                    answers += 1;
                }
                _ => {}
            }
        }
        assert!(answers + calls > 0, "{template:?}: nothing finished");
    }
}

#[tokio::test]
async fn a_triggered_grammar_governs_only_what_follows_its_trigger() {
    let app = TestApp::new(&[]);
    let entry = app.state.registry.resolve("light").unwrap();
    let engine = app.state.registry.engine(&entry, true).await.unwrap();
    // Free prose until a token ends in "e" (sooner or later one does), then
    // exactly "!!!" and the end.
    let compiled = engine
        .compile_constraint(&engine::Constraint::Triggered {
            trigger: "e".into(),
            then: "start: \"!!!\"\n".into(),
        })
        .unwrap();
    let request = engine::GenerateRequest {
        prompt: engine.tokenize("Once upon a time", true, true),
        max_tokens: 60,
        stop: Vec::new(),
        sampling: engine::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        logprobs: None,
        ignore_eos: false,
        special_text: false,
        constraint: Some(compiled),
        finish_within_budget: false,
        thought: None,
        speculative: true,
        prediction: Vec::new(),
        span: tracing::Span::none(),
    };
    let mut events = engine.submit(request).unwrap();
    let mut text = String::new();
    let finish = loop {
        match events.recv().await.expect("the stream ends with Done") {
            engine::Event::Text { text: t, .. } => text.push_str(&t),
            engine::Event::Done { finish_reason, .. } => break finish_reason,
            engine::Event::Error(e) => panic!("{e}"),
        }
    };
    assert_eq!(finish, engine::FinishReason::Stop, "{text}");
    assert!(text.ends_with("e!!!"), "{text:?}");
    assert!(text.len() > 4, "some free text came first: {text:?}");
}

#[tokio::test]
async fn what_cannot_be_honoured_is_a_400() {
    let app = TestApp::new(&[]);
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, param) in [
        (
            json!({"tools": weather_tools(), "grammar": "root ::= \"a\""}),
            "grammar",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}}}], "tool_choice": "required"}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "result"}]}),
            "messages[0].tool_call_id",
        ),
    ] {
        let mut request = json!({"model": "light", "messages": user, "max_tokens": 5});
        for (k, v) in body.as_object().unwrap() {
            request[k] = v.clone();
        }
        let (status, _, answer) = app.post("/v1/chat/completions", request).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(error_of(&answer)["param"], param, "{answer}");
    }

    // llama.cpp's GBNF parser recurses without a limit: nesting that would
    // overflow its stack (and abort the process) is refused first.
    let deep = format!(
        "root ::= {}\"a\"{}",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    // A grammar that matches nothing at all is the client's too.
    let empty = r"root ::= [^\x00-\U0010FFFF]".to_owned();
    for grammar in [deep, empty] {
        let (status, _, answer) = app
            .post(
                "/v1/chat/completions",
                json!({"model": "light", "messages": user, "max_tokens": 5, "grammar": grammar}),
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(error_of(&answer)["code"], "invalid_grammar", "{answer}");
    }
    let (status, _, _) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "messages": user, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200, "the server is still up");
}

#[tokio::test]
async fn ollamas_think_false_reaches_a_thinking_template() {
    let qwen3 = shared_models()
        .join("../templates/qwen3.jinja")
        .display()
        .to_string();
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", qwen3.as_str())]);
    let prompt_tokens = |think: Option<bool>| {
        let mut body = json!({"model": "light", "stream": false, "options": {"num_predict": 1},
            "messages": [{"role": "user", "content": "Hi"}]});
        if let Some(think) = think {
            body["think"] = think.into();
        }
        let app = &app;
        async move {
            let (status, _, answer) = app.post("/api/chat", body).await;
            assert_eq!(status, 200, "{answer}");
            answer["prompt_eval_count"].as_u64().unwrap()
        }
    };
    // Qwen3's template closes an empty think block when thinking is off.
    let (default, off, on) = (
        prompt_tokens(None).await,
        prompt_tokens(Some(false)).await,
        prompt_tokens(Some(true)).await,
    );
    assert!(off > default, "{off} vs {default}");
    assert_eq!(on, default);
}
