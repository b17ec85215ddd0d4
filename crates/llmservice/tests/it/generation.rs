//! Chat and completions on the real model: exact greedy text, usage, stops,
//! concurrency, prefix reuse, queue limits.

use serde_json::{json, Value};

use crate::common::*;

fn hello() -> Value {
    json!({"model": "light", "temperature": 0, "repeat_penalty": 1.0, "max_tokens": 24,
           "messages": [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"}]})
}

#[tokio::test]
async fn greedy_chat_gives_the_known_answer() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app.post("/v1/chat/completions", hello()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "light");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"], GREEDY_FRANCE,
        "greedy output changed"
    );
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    match choice["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(completion, 24),
        "stop" => assert!(completion < 24),
        other => panic!("finish_reason {other}"),
    }
    // Same request again: identical text, and the prompt's KV is reused.
    let (_, _, again) = app.post("/v1/chat/completions", hello()).await;
    assert_eq!(again["choices"][0]["message"]["content"], GREEDY_FRANCE);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        cached,
        prompt - 1,
        "all but the last prompt token come from the cache"
    );
}

#[tokio::test]
async fn a_conversation_whose_slot_was_reused_continues_from_host_memory() {
    // One slot, three conversations: each prompt overwrites the last one's KV.
    let app = TestApp::new(&[("LIGHT_PARALLEL", "1")]);
    let ask = |topic: &str| {
        let text = format!(
            "Here are some notes about {topic}. {} Summarize the notes in one sentence.",
            format!("{topic} is a topic people write long notes about. ").repeat(8)
        );
        json!({"model": "light", "temperature": 0, "repeat_penalty": 1.0, "max_tokens": 6,
               "messages": [{"role": "user", "content": text}]})
    };
    let topics = ["rivers", "volcanoes", "libraries"];
    // Each asked twice: the second answer comes from the slot's own KV, as
    // the answer from restored KV must (a prompt computed whole may round
    // differently on some CPUs' kernels).
    let mut first = Vec::new();
    for topic in topics {
        let (status, _, body) = app.post("/v1/chat/completions", ask(topic)).await;
        assert_eq!(status, 200, "{body}");
        let (_, _, body) = app.post("/v1/chat/completions", ask(topic)).await;
        first.push(body);
    }
    for (topic, before) in topics.iter().zip(&first) {
        let (_, _, again) = app.post("/v1/chat/completions", ask(topic)).await;
        let usage = &again["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        assert!(prompt > 100, "{usage}");
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"].as_u64(),
            Some(prompt - 1),
            "{topic}: the prompt's KV comes back from host memory"
        );
        assert_eq!(
            again["choices"][0]["message"]["content"],
            before["choices"][0]["message"]["content"]
        );
    }
    let metrics = app.router().oneshot_get("/metrics").await;
    let hits = format!("llmservice_prompt_cache_total{{model=\"{LIGHT_ID}\",outcome=\"hits\"}} 3");
    assert!(metrics.contains(&hits), "{metrics}");

    // Turned off, the same conversations are computed again.
    let app = TestApp::new(&[("LIGHT_PARALLEL", "1"), ("LIGHT_PROMPT_CACHE_RAM", "0")]);
    for topic in topics.iter().chain(&topics) {
        let (_, _, body) = app.post("/v1/chat/completions", ask(topic)).await;
        // Only the prompts' shared start (the system prompt) is reused.
        let usage = &body["usage"];
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            cached < usage["prompt_tokens"].as_u64().unwrap() / 2,
            "{topic}: {usage}"
        );
    }
}

/// SmolLM2-135M-Instruct Q4_1, greedy, no penalties, for `hello()`.
const GREEDY_FRANCE: &str = "The capital of France is Paris.";

#[tokio::test]
async fn the_tier_repeat_penalty_applies_unless_the_request_sets_one() {
    let app = TestApp::new(&[]);
    let body = |penalty: Option<f32>| {
        let mut body = json!({"model": "light", "prompt": "1, 2, 1, 2, 1, 2, 1, 2,",
                              "temperature": 0, "max_tokens": 24});
        if let Some(p) = penalty {
            body["repeat_penalty"] = json!(p);
        }
        body
    };
    let text = |body: Value| body["choices"][0]["text"].as_str().unwrap().to_owned();
    let (_, _, default) = app.post("/v1/completions", body(None)).await;
    let (_, _, explicit) = app.post("/v1/completions", body(Some(1.1))).await;
    assert_eq!(text(default.clone()), text(explicit), "the default is 1.1");
    let (_, _, greedy) = app.post("/v1/completions", body(Some(1.0))).await;
    let (_, _, strong) = app.post("/v1/completions", body(Some(1.8))).await;
    assert_ne!(
        text(strong.clone()),
        text(greedy.clone()),
        "a penalty changes a repetitive answer"
    );
    // llama-server's repeat_last_n: the window the penalty looks back over.
    let windowed = |n: i32| {
        let mut b = body(Some(1.8));
        b["repeat_last_n"] = json!(n);
        b
    };
    let (_, _, none) = app.post("/v1/completions", windowed(0)).await;
    assert_eq!(text(none), text(greedy), "an empty window is no penalty");
    let (_, _, sixty_four) = app.post("/v1/completions", windowed(64)).await;
    assert_eq!(text(sixty_four), text(strong.clone()), "the default is 64");
    let (_, _, whole) = app.post("/v1/completions", windowed(-1)).await;
    assert_eq!(text(whole), text(strong), "-1 covers this short answer too");
}

#[tokio::test]
async fn stop_strings_are_never_emitted() {
    let app = TestApp::new(&[]);
    let mut request = hello();
    request["stop"] = json!(["Paris"]);
    let (status, _, body) = app.post("/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is "
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn max_tokens_ends_with_length_and_exact_usage() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post("/v1/completions", json!({"model": "light", "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(
        body["usage"]["prompt_tokens"], 4,
        "'Once upon a time' is 4 tokens in SmolLM2's vocabulary"
    );
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_requests_all_complete_like_alone() {
    let app = TestApp::new(&[("LIGHT_PARALLEL", "4")]);
    let prompts = [
        "Name a color.",
        "Name a fruit.",
        "Name an animal.",
        "Name a country.",
        "Name a planet.",
        "Name a metal.",
    ];
    let request = |p: &str| json!({"model": "light", "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": p}]});
    let alone: Vec<Value> = {
        let mut out = Vec::new();
        for p in prompts {
            out.push(app.post("/v1/chat/completions", request(p)).await.2);
        }
        out
    };
    let together = futures_util::future::join_all(
        prompts
            .iter()
            .map(|p| app.post("/v1/chat/completions", request(p))),
    )
    .await;
    for ((status, _, body), alone) in together.into_iter().zip(alone) {
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.trim().is_empty());
        assert_eq!(
            body["usage"]["prompt_tokens"],
            alone["usage"]["prompt_tokens"]
        );
        let n = body["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&n));
        if body["choices"][0]["finish_reason"] == "length" {
            assert_eq!(n, 12);
        }
    }
}

#[tokio::test]
async fn several_prompts_in_one_completion_request() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post("/v1/completions", json!({"model": "light", "prompt": ["One, two,", "Red, green,"], "max_tokens": 3, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(body["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    let app = TestApp::new(&[("LIGHT_PARALLEL", "1"), ("LIGHT_MAX_QUEUE", "0")]);
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    // Hold the only place with a long stream, then ask again.
    let long = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "light", "prompt": "Count:", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let second = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
    let body: Value = second.json().await.unwrap();
    assert_eq!(error_of(&body)["code"], "queue_full");
    drop(long);
}

#[tokio::test]
async fn a_configured_chat_template_replaces_the_models_own() {
    // A plain-text template, as one would configure for a base model without one.
    let template = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";
    let app = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", template)]);
    let messages = json!([{"role": "user", "content": "Hello there"}]);
    let (status, _, counted) = app
        .post("/tokenize", json!({"model": "light", "messages": messages}))
        .await;
    assert_eq!(status, 200, "{counted}");
    let (_, _, expected) = app
        .post(
            "/tokenize",
            json!({"model": "light", "content": "USER: Hello there\nASSISTANT:"}),
        )
        .await;
    assert_eq!(
        counted["tokens"], expected["tokens"],
        "the configured template rendered the prompt"
    );
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "max_tokens": 3, "messages": messages}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], expected["count"]);

    // A template that does not compile is reported when chatting, not a crash.
    let broken = TestApp::new(&[("LIGHT_CHAT_TEMPLATE", "{% for %}")]);
    let (status, _, body) = broken
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "messages": messages}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["code"], "chat_template_missing");
}

#[tokio::test]
async fn n_predict_and_ollamas_num_predict_are_capped_by_the_context_never_refused() {
    let app = TestApp::new(&[]);
    let ask = |n_predict: i64| {
        json!({"model": "light", "temperature": 0, "n_predict": n_predict,
            "messages": [{"role": "user", "content": "Tell me a long story."}]})
    };
    let (status, _, answer) = app.post("/v1/chat/completions", ask(3)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    // More than the context holds is what it holds, not a 400 (max_tokens
    // keeps OpenAI's 400).
    let (status, _, answer) = app.post("/v1/chat/completions", ask(1_000_000)).await;
    assert_eq!(status, 200, "{answer}");
    let mut too_many = ask(0);
    too_many["max_tokens"] = json!(1_000_000);
    let (status, _, _) = app.post("/v1/chat/completions", too_many).await;
    assert_eq!(status, 400);
    // Ollama's num_predict: the same, and -1 is no limit of its own.
    for num_predict in [1_000_000, -1] {
        let (status, _, answer) = app
            .post(
                "/api/chat",
                json!({"model": "light", "stream": false,
                    "options": {"num_predict": num_predict, "temperature": 0},
                    "messages": [{"role": "user", "content": "Say hi."}]}),
            )
            .await;
        assert_eq!(status, 200, "{num_predict}: {answer}");
        assert_eq!(answer["done"], true, "{answer}");
    }
}
