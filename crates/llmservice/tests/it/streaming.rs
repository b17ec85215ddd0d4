//! SSE exactly as OpenAI streams it, and what a disconnect does.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn chat_stream_follows_openai_chunk_rules() {
    let app = TestApp::new(&[]);
    let base = app.spawn().await;
    let request = json!({"model": "light", "temperature": 0, "max_tokens": 24, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = response.text().await.unwrap();
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let (id, created) = (chunks[0]["id"].clone(), chunks[0]["created"].clone());
    let mut text = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["created"], created);
        let is_usage_chunk = i == chunks.len() - 1;
        if is_usage_chunk {
            assert_eq!(chunk["choices"], json!([]));
            continue;
        }
        assert!(chunk["usage"].is_null(), "usage only on the last chunk");
        let delta = &chunk["choices"][0]["delta"];
        assert_eq!(
            delta.get("role").is_some(),
            i == 0,
            "role in the first delta only"
        );
        text.push_str(delta["content"].as_str().unwrap_or(""));
        let finish = &chunk["choices"][0]["finish_reason"];
        if i == chunks.len() - 2 {
            assert!(
                finish.is_string(),
                "the last choice chunk has finish_reason"
            );
            assert_eq!(delta, &json!({}), "and an empty delta");
        } else {
            assert!(finish.is_null());
        }
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);

    let mut plain = request.clone();
    plain["stream"] = json!(false);
    let (_, _, whole) = app.post("/v1/chat/completions", plain).await;
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str().unwrap(),
        text
    );
    assert_eq!(
        whole["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
}

#[tokio::test]
async fn completion_stream_without_usage_has_no_usage_field() {
    let app = TestApp::new(&[]);
    let base = app.spawn().await;
    let body = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "light", "prompt": "Hello", "max_tokens": 5, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    for p in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(p).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        assert!(chunk.get("usage").is_none());
    }
}

#[tokio::test]
async fn a_disconnected_stream_frees_its_sequence() {
    let app = TestApp::new(&[("LIGHT_PARALLEL", "1"), ("LIGHT_MAX_QUEUE", "0")]);
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "light", "prompt": "Count:", "max_tokens": 1500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let engine = app
        .state
        .registry
        .resolve("light")
        .unwrap()
        .loaded_engine()
        .unwrap();
    let stats = engine.stats();
    let mut freed = false;
    for _ in 0..200 {
        if stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) == 1
            && stats.active.load(std::sync::atomic::Ordering::Relaxed) == 0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the sequence kept generating for nobody");
    // The only place is free again: the next request is served, not refused.
    let (status, _, body) = app
        .post("/v1/chat/completions", json!({"model": "light", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
}
