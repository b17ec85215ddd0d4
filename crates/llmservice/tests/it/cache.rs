//! The response cache on the real model: hits, replays as JSON and SSE,
//! what is never cached, persistence across restarts, a corrupted disk file.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn greedy() -> Value {
    json!({"model": "light", "temperature": 0, "max_tokens": 12, "repeat_penalty": 1.0,
           "messages": [{"role": "user", "content": "Name three colors."}]})
}

pub async fn wait_for_entries(app: &TestApp, n: u64) {
    for _ in 0..200 {
        if app.state.cache.stats().entries >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the cache never held {n} entries: {:?}",
        app.state.cache.stats()
    );
}

fn streamed_text(sse: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for payload in sse_payloads(sse).iter().filter(|p| *p != "[DONE]") {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
        chunks.push(chunk);
    }
    (text, chunks)
}

#[tokio::test]
async fn a_deterministic_answer_is_served_again_as_json_and_as_a_stream() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let (status, headers, first) = app.post("/v1/chat/completions", greedy()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    wait_for_entries(&app, 1).await;

    let (_, headers, again) = app.post("/v1/chat/completions", greedy()).await;
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(again["choices"], first["choices"]);
    assert_eq!(again["usage"], first["usage"]);
    assert_ne!(again["id"], first["id"], "every response has its own id");

    // The same answer as a stream, with OpenAI's chunk rules.
    let base = app.spawn().await;
    let mut streaming = greedy();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-llmservice-cache"], "hit");
    let body = response.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"));
    let (text, chunks) = streamed_text(&body);
    assert_eq!(
        text,
        first["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], first["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        first["choices"][0]["finish_reason"]
    );

    let stats = app.state.cache.stats();
    assert_eq!((stats.hits, stats.misses), (2, 1));
    let (_, served) = app.get("/internal/cache/stats").await;
    assert_eq!(served["hits"], 2);
    assert_eq!(served["entries"], 1);
    assert_eq!(served["size"], 1, "seed 001's name for the entries");
}

#[tokio::test]
async fn a_streamed_answer_is_cached_for_later_requests() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let base = app.spawn().await;
    let body = json!({"model": "light", "prompt": "The sky is", "max_tokens": 8, "temperature": 0, "stream": true});
    let streamed = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let text: String = sse_payloads(&streamed)
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    wait_for_entries(&app, 1).await;
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (_, headers, cached) = app.post("/v1/completions", plain).await;
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(cached["choices"][0]["text"].as_str().unwrap(), text);
    assert_eq!(cached["object"], "text_completion");
}

#[tokio::test]
async fn the_translated_apis_share_the_chat_answer() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let question = "Name three colors.";
    let chat = json!({"model": "light", "temperature": 0, "max_tokens": 12,
                      "messages": [{"role": "user", "content": question}]});
    let (status, headers, first) = app.post("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    let text = first["choices"][0]["message"]["content"].as_str().unwrap();
    wait_for_entries(&app, 1).await;

    // The same question through each translated API is the same chat request.
    let messages = json!({"model": "light", "temperature": 0, "max_tokens": 12,
                          "messages": [{"role": "user", "content": question}]});
    let (_, headers, message) = app.post("/v1/messages", messages).await;
    assert_eq!(headers["x-llmservice-cache"], "hit", "{message}");
    assert_eq!(message["content"][0]["text"], text);
    assert_eq!(
        message["usage"]["output_tokens"],
        first["usage"]["completion_tokens"]
    );

    let ollama = json!({"model": "light", "stream": false,
                        "options": {"temperature": 0, "num_predict": 12},
                        "messages": [{"role": "user", "content": question}]});
    let (_, headers, reply) = app.post("/api/chat", ollama.clone()).await;
    assert_eq!(headers["x-llmservice-cache"], "hit", "{reply}");
    assert_eq!(reply["message"]["content"], text);
    // Another num_predict is another answer.
    let mut shorter = ollama;
    shorter["options"]["num_predict"] = json!(3);
    let (_, headers, reply) = app.post("/api/chat", shorter).await;
    assert_eq!(headers["x-llmservice-cache"], "miss", "{reply}");
    assert_eq!(reply["eval_count"], 3, "{reply}");

    let responses =
        json!({"model": "light", "temperature": 0, "max_output_tokens": 12, "input": question});
    let (_, headers, response) = app.post("/v1/responses", responses).await;
    assert_eq!(headers["x-llmservice-cache"], "hit", "{response}");
    assert_eq!(response["output"][0]["content"][0]["text"], text);
    // A replayed response is stored like a generated one.
    let id = response["id"].as_str().unwrap();
    let (status, stored) = app.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(stored["output"], response["output"]);

    // A Messages answer that names its stop sequence is never taken from the cache.
    let stopped = json!({"model": "light", "temperature": 0, "max_tokens": 12, "stop_sequences": ["zzz"],
                         "messages": [{"role": "user", "content": question}]});
    let (_, headers, _) = app.post("/v1/messages", stopped).await;
    assert_eq!(headers["x-llmservice-cache"], "miss");
    let stats = app.state.cache.stats();
    // The first chat and the shorter num_predict missed.
    assert_eq!((stats.hits, stats.misses), (3, 2));
}

#[tokio::test]
async fn schemas_that_differ_only_in_property_order_are_different_answers() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let ask = |first: &str, second: &str| {
        let mut properties = serde_json::Map::new();
        for name in [first, second] {
            properties.insert(
                name.into(),
                json!({"type": "integer", "minimum": 0, "maximum": 9}),
            );
        }
        let mut body = greedy();
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "pair",
            "schema": {"type": "object", "properties": properties, "required": ["a", "b"],
                "additionalProperties": false}}});
        body
    };
    let (status, headers, ab) = app.post("/v1/chat/completions", ask("a", "b")).await;
    assert_eq!(status, 200, "{ab}");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    wait_for_entries(&app, 1).await;
    let (status, headers, ba) = app.post("/v1/chat/completions", ask("b", "a")).await;
    assert_eq!(status, 200, "{ba}");
    assert_eq!(
        headers["x-llmservice-cache"], "miss",
        "the order is what the model writes"
    );
    // The JSON without its (bounded) whitespace.
    let text = |v: &Value| -> String {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect()
    };
    assert!(text(&ab).starts_with("{\"a\""), "{}", text(&ab));
    assert!(text(&ba).starts_with("{\"b\""), "{}", text(&ba));
}

#[tokio::test]
async fn sampled_requests_are_never_cached() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let mut sampled = greedy();
    sampled["temperature"] = json!(0.9);
    for _ in 0..2 {
        let (status, headers, _) = app.post("/v1/chat/completions", sampled.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-llmservice-cache"], "miss");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.state.cache.stats().entries, 0);
    // A different sampling field is a different answer.
    let (_, _, _) = app.post("/v1/chat/completions", greedy()).await;
    wait_for_entries(&app, 1).await;
    let mut longer = greedy();
    longer["max_tokens"] = json!(13);
    let (_, headers, _) = app.post("/v1/chat/completions", longer).await;
    assert_eq!(headers["x-llmservice-cache"], "miss");
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart_and_a_corrupt_file_is_bypassed() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let env = [
        ("ENABLE_CACHE", "true"),
        ("CACHE_PERSIST_TO_DISK", "true"),
        ("CACHE_DIR", cache_dir.to_str().unwrap()),
    ];
    let first = {
        let app = TestApp::new(&env);
        let (_, _, body) = app.post("/v1/chat/completions", greedy()).await;
        wait_for_entries(&app, 1).await;
        for _ in 0..200 {
            if app.state.cache.stats().disk.entries >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        app.state.cache.flush();
        body
    };
    let app = TestApp::new(&env);
    let (_, headers, body) = app.post("/v1/chat/completions", greedy()).await;
    assert_eq!(
        headers["x-llmservice-cache"], "hit",
        "served from disk after a restart"
    );
    assert_eq!(body["choices"], first["choices"]);
    drop(app);

    std::fs::write(cache_dir.join("cache.sqlite"), b"this is not a database").unwrap();
    let app = TestApp::new(&env);
    let (_, stats) = app.get("/internal/cache/stats").await;
    assert_eq!(stats["disk"]["enabled"], false);
    assert!(stats["disk"]["error"].is_string());
    let (status, headers, _) = app.post("/v1/chat/completions", greedy()).await;
    assert_eq!(status, 200, "a broken disk cache never breaks serving");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    wait_for_entries(&app, 1).await;
    let (_, headers, _) = app.post("/v1/chat/completions", greedy()).await;
    assert_eq!(
        headers["x-llmservice-cache"], "hit",
        "the memory tier still works"
    );
}

/// A `redis-server` of the test's own on a free loopback port (Debian's
/// package; `.ci/run` installs it), without persistence.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start(port: Option<u16>) -> Self {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect(
                "redis-server is needed for the shared cache's tests (apt install redis-server)",
            );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Seed 003's scaling note: replicas behind a load balancer share answers
/// through Redis (`CACHE_URL`), each with its memory tier in front; Redis
/// going away costs speed, never a request.
#[tokio::test]
async fn replicas_share_answers_through_redis_and_an_outage_costs_only_speed() {
    let mut redis = Redis::start(None);
    let url = redis.url();
    let replica = || TestApp::new(&[("ENABLE_CACHE", "true"), ("CACHE_URL", &url)]);
    let (a, b) = (replica(), replica());
    let (status, headers, first) = a.post("/v1/chat/completions", greedy()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    wait_for_entries(&a, 1).await;
    // The other replica answers from Redis without generating.
    let (status, headers, shared) = b.post("/v1/chat/completions", greedy()).await;
    assert_eq!(status, 200, "{shared}");
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(shared["choices"], first["choices"]);
    assert!(
        b.state
            .registry
            .resolve("light")
            .unwrap()
            .loaded_engine()
            .is_none(),
        "b never loaded the model"
    );
    let (_, stats) = b.get("/internal/cache/stats").await;
    assert_eq!(stats["redis"]["hits"], 1, "{stats}");
    assert_eq!(stats["redis"]["url"], url);

    // Redis goes away: b answers from its memory tier, a new question is
    // generated and cached locally, and no request fails.
    redis.stop();
    let (_, headers, _) = b.post("/v1/chat/completions", greedy()).await;
    assert_eq!(headers["x-llmservice-cache"], "hit");
    let mut other = greedy();
    other["messages"][0]["content"] = json!("Name three animals.");
    for expected in ["miss", "hit"] {
        let (status, headers, answer) = a.post("/v1/chat/completions", other.clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(headers["x-llmservice-cache"], expected);
    }
    let (_, stats) = a.get("/internal/cache/stats").await;
    assert!(stats["redis"]["error"].is_string(), "{stats}");

    // Back again (after the tier's pause), it is shared again.
    let _redis = Redis::start(Some(redis.port));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut third = greedy();
    third["messages"][0]["content"] = json!("Name three fruits.");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut asked = 2;
    loop {
        let (status, _, answer) = a.post("/v1/chat/completions", third.clone()).await;
        asked += 1;
        assert_eq!(status, 200, "{answer}");
        let (_, stats) = a.get("/internal/cache/stats").await;
        if stats["redis"]["error"].is_null() {
            break;
        }
        // Still paused: a fresh question finds out whether Redis is back.
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never came back: {stats}"
        );
        third["messages"][0]["content"] = json!(format!(
            "{} Again.",
            third["messages"][0]["content"].as_str().unwrap()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Stored after the answer went out: in Redis once a's memory has it.
    wait_for_entries(&a, asked).await;
    let (_, headers, _) = b.post("/v1/chat/completions", third).await;
    let (_, stats_b) = b.get("/internal/cache/stats").await;
    let (_, stats_a) = a.get("/internal/cache/stats").await;
    assert_eq!(
        headers["x-llmservice-cache"], "hit",
        "shared again after the outage: {stats_a} {stats_b} {asked}"
    );
}
