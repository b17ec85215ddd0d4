//! Tiers served upstream (`{TIER}_BACKEND=openai`): a second llmservice on
//! the real model is the upstream, on loopback. Answers pass through
//! unchanged (streamed chunk by chunk), replicas share the load and a dead
//! one is skipped, a client that leaves cancels the upstream's work, the
//! upstream's refusals keep their status and message, and the cache, keys
//! and translated APIs stay in front.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

/// A proxy whose `medium` tier is the upstream(s) at `urls`.
fn proxy(urls: &[&str], extra: &[(&str, &str)]) -> TestApp {
    let base_urls = urls
        .iter()
        .map(|u| format!("{u}/v1"))
        .collect::<Vec<_>>()
        .join(",");
    let mut env: Vec<(&str, &str)> = vec![
        ("MEDIUM_BACKEND", "openai"),
        ("MEDIUM_BASE_URL", &base_urls),
        ("MEDIUM_UPSTREAM_MODEL", "light"),
        ("MEDIUM_API_KEY", OPERATOR_KEY),
        ("MEDIUM_TIMEOUT", "60"),
    ];
    env.extend_from_slice(extra);
    // `base_urls` outlives `env`'s use inside `new`.
    TestApp::new(&env)
}

fn chat(model: &str) -> Value {
    json!({"model": model, "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0,
           "messages": [{"role": "user", "content": "Name three colours."}]})
}

fn upstream_engine_stats(app: &TestApp) -> (usize, u64) {
    let entry = app.state.registry.resolve("light").unwrap();
    let Some(engine) = entry.loaded_engine() else {
        return (0, 0);
    };
    let stats = engine.stats();
    (
        stats.active.load(std::sync::atomic::Ordering::Relaxed),
        stats.cancelled.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[tokio::test]
async fn answers_pass_through_unchanged_whole_and_streamed() {
    let upstream = TestApp::new(&[]);
    let url = upstream.spawn().await;
    let front = proxy(&[&url], &[]);
    let (status, _, direct) = upstream.post("/v1/chat/completions", chat("light")).await;
    assert_eq!(status, 200);
    let (status, _, proxied) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(
        proxied["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    assert_eq!(proxied["model"], "medium");
    assert_eq!(
        proxied["usage"]["completion_tokens"],
        direct["usage"]["completion_tokens"]
    );
    assert_eq!(
        proxied["usage"]["prompt_tokens"],
        direct["usage"]["prompt_tokens"]
    );
    // Streamed: the same text, chunk by chunk, usage at the end.
    let base = front.spawn().await;
    let mut body = chat("medium");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        direct["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(chunks.len() > 3, "not streamed: {} chunks", chunks.len());
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        direct["usage"]["completion_tokens"]
    );
    // Forced tool calls come back as calls.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let mut body = chat("medium");
    body["tools"] = tools;
    body["tool_choice"] = json!("required");
    // One call: a second one the model might open could be cut by the budget.
    body["parallel_tool_calls"] = json!(false);
    body["max_tokens"] = json!(60);
    let (status, _, answer) = front.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    let call = &answer["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    // The translated APIs run through it too.
    let (status, _, message) = front
        .post(
            "/v1/messages",
            json!({"model": "medium", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["content"][0]["type"], "text");
    // And legacy completions.
    let (status, _, completion) = front
        .post("/v1/completions", json!({"model": "medium", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}))
        .await;
    assert_eq!(status, 200, "{completion}");
    assert!(!completion["choices"][0]["text"]
        .as_str()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn the_tiers_sampling_settings_fill_what_a_request_leaves_out() {
    let upstream = TestApp::new(&[]);
    let url = upstream.spawn().await;
    let front = proxy(&[&url], &[("MEDIUM_MAX_TOKENS", "3")]);
    let tokens = |answer: &Value| answer["usage"]["completion_tokens"].as_u64();
    let ask = json!({"model": "medium", "temperature": 0, "repeat_penalty": 1.0,
        "messages": [{"role": "user", "content": "Tell me a long story."}]});
    let (status, _, answer) = front.post("/v1/chat/completions", ask.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(tokens(&answer), Some(3), "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    // What the request says wins, under either name.
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut ask = ask.clone();
        ask[field] = json!(5);
        let (_, _, answer) = front.post("/v1/chat/completions", ask).await;
        assert_eq!(tokens(&answer), Some(5), "{field}: {answer}");
    }
    let (status, _, completion) = front
        .post(
            "/v1/completions",
            json!({"model": "medium", "prompt": "Once upon a time", "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(tokens(&completion), Some(3), "{completion}");
}

#[tokio::test]
async fn embeddings_pass_through_and_the_cache_stays_in_front() {
    let models = shared_models();
    let encoder = models
        .join("all-MiniLM-L6-v2-f16.gguf")
        .display()
        .to_string();
    let upstream = TestApp::new(&[
        ("EMBEDDING_MODEL_PATH", &encoder),
        ("EMBEDDING_N_THREADS", "2"),
    ]);
    let url = upstream.spawn().await;
    let base_url = format!("{url}/v1");
    let front = TestApp::new(&[
        ("EMBEDDING_BACKEND", "openai"),
        ("EMBEDDING_BASE_URL", &base_url),
        ("EMBEDDING_UPSTREAM_MODEL", "embedding"),
        ("ENABLE_CACHE", "true"),
        ("MEDIUM_BASE_URL", &base_url),
        ("MEDIUM_UPSTREAM_MODEL", "light"),
    ]);
    let input = json!({"model": "embedding", "input": ["a cat", "a dog"]});
    let (_, _, direct) = upstream.post("/v1/embeddings", input.clone()).await;
    let (status, _, proxied) = front.post("/v1/embeddings", input).await;
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(proxied["data"], direct["data"]);
    assert_eq!(proxied["usage"], direct["usage"]);
    // A deterministic chat answer is cached in front: the upstream sees it once.
    let generated_upstream = || {
        upstream
            .state
            .metrics
            .render(&upstream.state.registry, &upstream.state.cache, &[])
            .lines()
            .find(|l| l.starts_with("llmservice_completion_tokens_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    let (_, headers, first) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(headers["x-llmservice-cache"], "miss", "{first}");
    let after_first = generated_upstream();
    let (_, headers, second) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(first["choices"], second["choices"]);
    assert_eq!(generated_upstream(), after_first);
}

#[tokio::test]
async fn replicas_share_the_load_and_a_dead_one_is_skipped() {
    let a = TestApp::new(&[]);
    let b = TestApp::new(&[]);
    let (url_a, task_a) = a.spawn_killable().await;
    let (url_b, _task_b) = b.spawn_killable().await;
    let front = proxy(&[&url_a, &url_b], &[]);
    for _ in 0..4 {
        let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
        assert_eq!(status, 200, "{answer}");
    }
    let served = |app: &TestApp| {
        app.state
            .metrics
            .render(&app.state.registry, &app.state.cache, &[])
            .lines()
            .filter(|l| {
                l.starts_with("llmservice_http_requests_total{route=\"/v1/chat/completions\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    assert_eq!((served(&a), served(&b)), (2, 2), "equal load goes round");
    task_a.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every request after the kill is answered: by the replica that is left.
    for _ in 0..4 {
        let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(served(&b), 6);
    let (_, models) = front.get("/v1/models").await;
    let medium = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_str().unwrap().starts_with("medium/"))
        .unwrap()
        .clone();
    assert_eq!(
        medium["state"], "loaded",
        "one replica still answers: {medium}"
    );
    let (_, health) = front.get("/health").await;
    let upstream = &health["upstreams"][0];
    assert_eq!(upstream["state"], "loaded", "{health}");
    assert_eq!(upstream["replicas"], 2);
    assert_eq!(upstream["healthy_replicas"], 1);
    assert!(upstream["error"].as_str().is_some(), "{health}");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstreams_work() {
    let upstream = TestApp::new(&[]);
    let url = upstream.spawn().await;
    let front = proxy(&[&url], &[]);
    let base = front.spawn().await;
    let mut body = chat("medium");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(1500);
    body["ignore_eos"] = json!(true);
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(
        upstream_engine_stats(&upstream).0,
        1,
        "the upstream generates"
    );
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while upstream_engine_stats(&upstream).0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream kept generating"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        upstream_engine_stats(&upstream).1,
        1,
        "cancelled, not finished"
    );
}

#[tokio::test]
async fn upstream_refusals_and_outages_are_said_plainly() {
    let upstream = TestApp::new(&[]);
    let url = upstream.spawn().await;
    let wrong_model = proxy(&[&url], &[("MEDIUM_UPSTREAM_MODEL", "no-such-model")]);
    let (status, _, answer) = wrong_model
        .post("/v1/chat/completions", chat("medium"))
        .await;
    assert_eq!(status, 404, "{answer}");
    let message = error_of(&answer)["message"].as_str().unwrap();
    assert!(
        message.starts_with("upstream:") && message.contains("no-such-model"),
        "{message}"
    );
    // Nothing listening: a 503 with Retry-After, not a hang.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let nowhere = proxy(&[&dead], &[]);
    let (status, headers, answer) = nowhere.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(error_of(&answer)["code"], "upstream_unavailable");
    assert!(headers.contains_key("retry-after"));
    // Routes that need a model loaded here say so.
    let (status, _, answer) = nowhere
        .post("/tokenize", json!({"model": "medium", "content": "hi"}))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(error_of(&answer)["code"], "upstream_model");
}

/// A tier whose server we run (`{TIER}_COMMAND`; `vllm` and `mlx` are the
/// same with their own commands): here the child is a second llmservice on
/// the real model. It starts on first use, is started again when killed,
/// and stops when the tier is unloaded.
#[tokio::test]
async fn a_managed_child_starts_on_use_restarts_when_killed_and_stops_on_unload() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().display().to_string();
    std::fs::create_dir_all(format!("{home}/models")).unwrap();
    let command = format!(
        "env -i -C {home} HOME={home} MODELS_DIR={home}/models LIGHT_MODEL_PATH={} \
         LIGHT_N_CTX=2048 LIGHT_N_THREADS=2 ENABLE_CACHE=false {} serve --port {{port}}",
        smollm(),
        env!("CARGO_BIN_EXE_llmservice")
    );
    let front = TestApp::new(&[
        ("MEDIUM_COMMAND", &command),
        ("MEDIUM_UPSTREAM_MODEL", "light"),
        ("MEDIUM_START_TIMEOUT", "300"),
    ]);
    let entry = front.state.registry.resolve("medium").unwrap();
    let model = |id: &str| format!("/admin/api/models/{id}");
    let (status, listed) = front.get(&model(&entry.id)).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["state"], "available");
    assert_eq!(listed["upstream"]["child_pid"], Value::Null);

    // The first request starts the child and waits for it.
    let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    let (_, listed) = front.get(&model(&entry.id)).await;
    assert_eq!(listed["state"], "loaded", "{listed}");
    let pid = listed["upstream"]["child_pid"]
        .as_u64()
        .expect("a running child");
    let (_, health) = front.get("/health").await;
    assert_eq!(health["upstreams"][0]["managed"], true, "{health}");
    assert_eq!(health["upstreams"][0]["state"], "loaded", "{health}");
    let alive = |pid: u64| {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    };

    // Killed from outside, it is started again and serves again.
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // Generous: the child loads its model on a CPU the other tests share.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let restarted = loop {
        let (_, listed) = front.get(&model(&entry.id)).await;
        if let Some(new) = listed["upstream"]["child_pid"]
            .as_u64()
            .filter(|&p| p != pid)
        {
            break new;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(status, 200, "{answer}");

    // Unloading stops it; the next request starts it again.
    let (status, _, listed) = front
        .post(&format!("{}/unload", model(&entry.id)), json!({}))
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["state"], "available", "{listed}");
    assert!(!alive(restarted), "the child outlived its unload");
    let (status, _, listed) = front
        .post(&format!("{}/load", model(&entry.id)), json!({}))
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["state"], "loaded", "{listed}");
    let last = listed["upstream"]["child_pid"].as_u64().unwrap();
    entry.unload().await.unwrap();
    assert!(!alive(last));
}

/// A child that cannot start says why, as a failed load, and keeps the
/// server answering.
#[tokio::test]
async fn a_managed_child_that_cannot_start_is_a_failed_load() {
    let front = TestApp::new(&[
        ("MEDIUM_COMMAND", "sh -c 'echo no such model >&2; exit 3'"),
        ("MEDIUM_START_TIMEOUT", "20"),
    ]);
    // Each request tries again (nothing retries it in the background).
    for _ in 0..2 {
        let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
        assert_eq!(status, 500, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("exited while starting"), "{message}");
    }
    let id = front.state.registry.resolve("medium").unwrap().id.clone();
    let (_, listed) = front.get(&format!("/v1/models/{id}")).await;
    assert_eq!(listed["state"], "failed", "{listed}");
    let (status, _, answer) = front.post("/v1/chat/completions", chat("light")).await;
    assert_eq!(status, 200, "{answer}");
    // vLLM named but not installed: the reason, and how to fix it.
    let front = TestApp::new(&[
        ("MEDIUM_BACKEND", "vllm"),
        ("MEDIUM_MODEL_PATH", "Qwen/Qwen2.5-0.5B"),
    ]);
    let (status, _, answer) = front.post("/v1/chat/completions", chat("medium")).await;
    assert_eq!(status, 500, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("pip install vllm"), "{message}");
}
