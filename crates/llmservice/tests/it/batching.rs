//! Issue-3 behaviour on the real model: choices sharing a prompt, logprobs,
//! queue timeouts, preemption when the KV cache fills, cancellation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn question(extra: Value) -> Value {
    let mut body = json!({"model": "light", "max_tokens": 16, "repeat_penalty": 1.0,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Tell me about the Moon."}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn n_choices_share_the_prompt_kv() {
    let app = TestApp::new(&[("LIGHT_PARALLEL", "4")]);
    // Greedy choices from a copied KV must equal the leader's text exactly.
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            question(json!({"n": 3, "temperature": 0})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], choices[0]["message"]["content"]);
    }
    let engine = app
        .state
        .registry
        .resolve("light")
        .unwrap()
        .loaded_engine()
        .unwrap();
    assert_eq!(
        engine.stats().forks.load(Ordering::Relaxed),
        2,
        "followers copied the prompt KV"
    );
    let completion: u64 = 3 * body["usage"]["completion_tokens"].as_u64().unwrap() / 3;
    assert_eq!(
        body["usage"]["total_tokens"].as_u64().unwrap(),
        body["usage"]["prompt_tokens"].as_u64().unwrap() + completion
    );

    // Sampled choices with a seed differ from each other but repeat exactly.
    let seeded = question(json!({"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 24}));
    let (_, _, a) = app.post("/v1/chat/completions", seeded.clone()).await;
    let (_, _, b) = app.post("/v1/chat/completions", seeded).await;
    let texts = |v: &Value| {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(&a),
        texts(&b),
        "a seeded request alone is reproducible"
    );
    let t = texts(&a);
    assert!(
        t[0] != t[1] || t[1] != t[2],
        "different seeds per choice: {t:?}"
    );

    let (status, _, body) = app
        .post("/v1/chat/completions", question(json!({"n": 5})))
        .await;
    assert_eq!(status, 400, "more choices than parallel slots");
    assert_eq!(error_of(&body)["param"], "n");
}

#[tokio::test]
async fn chat_logprobs_in_openai_shape_streamed_and_not() {
    let app = TestApp::new(&[]);
    let request = question(json!({"temperature": 0, "logprobs": true, "top_logprobs": 3}));
    let (status, _, body) = app.post("/v1/chat/completions", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut text = String::new();
    for entry in content {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy picks the most likely token.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-4);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        text.push_str(&String::from_utf8(bytes).unwrap());
    }
    assert_eq!(
        text,
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let base = app.spawn().await;
    let sse = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut streamed_entries = Vec::new();
    for payload in sse_payloads(&sse).iter().filter(|p| *p != "[DONE]") {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        if let Some(entries) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            streamed_entries.extend(entries.iter().cloned());
        }
    }
    assert_eq!(
        &streamed_entries, content,
        "streamed logprobs equal the whole response's"
    );
}

#[tokio::test]
async fn completion_logprobs_in_legacy_shape() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post("/v1/completions", json!({"model": "light", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert!(lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_object().unwrap().len() <= 2));
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, body["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn a_request_that_waits_too_long_in_the_queue_gets_503() {
    let app = TestApp::new(&[
        ("LIGHT_PARALLEL", "1"),
        ("LIGHT_MAX_QUEUE", "4"),
        ("LIGHT_QUEUE_TIMEOUT", "0.5"),
    ]);
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    let long = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "light", "prompt": "Count:", "max_tokens": 1000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let started = std::time::Instant::now();
    let waiting = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&question(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.status(), 503);
    assert!(waiting.headers().contains_key("retry-after"));
    assert!(started.elapsed() >= Duration::from_millis(450));
    let body: Value = waiting.json().await.unwrap();
    assert_eq!(error_of(&body)["code"], "queue_timeout");
    drop(long);
}

#[tokio::test]
async fn a_full_kv_cache_preempts_and_every_request_still_completes() {
    // 4 sequences of ~90 tokens each cannot share 192 KV cells: the newest is
    // preempted, requeued and re-prefilled; all four finish with their full length.
    let app = TestApp::new(&[("LIGHT_PARALLEL", "4"), ("LIGHT_N_CTX", "192")]);
    let prompts = [
        "Once upon a time",
        "In a galaxy far away",
        "The recipe calls for",
        "Dear diary, today",
    ];
    let results = futures_util::future::join_all(prompts.iter().map(|p| {
        app.post("/v1/completions", json!({"model": "light", "prompt": p, "max_tokens": 80, "temperature": 0, "ignore_eos": true}))
    }))
    .await;
    for (status, _, body) in results {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 80);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    let engine = app
        .state
        .registry
        .resolve("light")
        .unwrap()
        .loaded_engine()
        .unwrap();
    assert!(
        engine.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the cache never filled"
    );
}

#[tokio::test]
async fn a_non_streaming_client_that_disconnects_frees_its_sequence() {
    let app = TestApp::new(&[]);
    let base = app.spawn().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let result = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"model": "light", "prompt": "Count:", "max_tokens": 1800, "ignore_eos": true}),
        )
        .send()
        .await;
    assert!(result.is_err(), "the client gave up");
    let engine = app
        .state
        .registry
        .resolve("light")
        .unwrap()
        .loaded_engine()
        .unwrap();
    let mut freed = false;
    for _ in 0..300 {
        if engine.stats().cancelled.load(Ordering::Relaxed) == 1
            && engine.stats().active.load(Ordering::Relaxed) == 0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the sequence kept generating for nobody");
}
