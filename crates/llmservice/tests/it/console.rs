//! The operator's console behind the dashboard: its page and assets, the
//! status, the models with per-model settings that persist, analytics that
//! survive a restart, the cache flush, and CORS kept off `/admin`.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use llmservice::api::AppState;
use serde_json::{json, Value};

use crate::common::*;

async fn put(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::put(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {OPERATOR_KEY}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, body) = app.send(request).await;
    (status, body)
}

fn chat(max_tokens: Option<u32>) -> Value {
    let mut body = json!({"model": "light", "temperature": 0,
                          "messages": [{"role": "user", "content": "Name a colour."}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

#[tokio::test]
async fn the_page_is_open_but_its_data_needs_the_operators_key() {
    let app = TestApp::new(&[]);
    for path in [
        "/admin",
        "/admin/",
        "/admin/assets/app.js",
        "/admin/assets/uPlot.iife.min.js",
    ] {
        let response = app
            .send(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(response.0, 200, "{path}");
        let csp = response.1["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
    }
    let (status, _, _) = app
        .send(
            Request::get("/admin/assets/../keys.sqlite")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 404);
    // On loopback too, the data behind the page needs the operator's key.
    let (status, _, body) = app
        .send(
            Request::get("/admin/api/status")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    let (_, _, created) = app.post("/admin/api/keys", json!({"name": "team"})).await;
    let named = created["key"].as_str().unwrap();
    let (status, _, _) = app
        .send(
            Request::get("/admin/api/models")
                .header("authorization", format!("Bearer {named}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn browsers_on_other_origins_reach_the_api_but_not_the_console() {
    let app = TestApp::new(&[]);
    let preflight = |path: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(path)
            .header("origin", "http://elsewhere.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let (_, headers, _) = app.send(preflight("/v1/chat/completions")).await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://elsewhere.example"
    );
    for path in [
        "/admin/api/keys",
        "/admin/api/models/light/load",
        "/internal/cache/stats",
        "/v1/models/light/load",
    ] {
        let (_, headers, _) = app.send(preflight(path)).await;
        assert!(
            !headers.contains_key("access-control-allow-origin"),
            "{path}: {headers:?}"
        );
    }
}

#[tokio::test]
async fn status_shows_loaded_models_their_queues_and_the_cache() {
    let app = TestApp::new(&[("ENABLE_CACHE", "true")]);
    let (status, body) = app.get("/admin/api/status").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["loaded"], json!([]));
    assert_eq!(body["models_available"], 1);
    assert!(body["rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(body["cache_hit_rate"], Value::Null);
    for _ in 0..2 {
        let (status, _, answer) = app.post("/v1/chat/completions", chat(Some(4))).await;
        assert_eq!(status, 200, "{answer}");
    }
    // The answer reaches the client just before its sequence is released, so
    // the queue is read until it drains (it must, and promptly).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let body = loop {
        let (_, body) = app.get("/admin/api/status").await;
        let loaded = &body["loaded"][0];
        let queues = (loaded["active"].as_u64(), loaded["waiting"].as_u64());
        if queues == (Some(0), Some(0)) {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let loaded = &body["loaded"][0];
    assert_eq!(loaded["id"], LIGHT_ID);
    assert_eq!(loaded["state"], "loaded");
    assert_eq!(loaded["n_ctx"], 2048);
    assert!(loaded["size_bytes"].as_u64().unwrap() > 50_000_000);
    assert_eq!(body["cache_hit_rate"], 0.5);
    assert_eq!(body["last_hour"]["requests"], 2);
    // Flushing the cache empties it; the counters describe the run.
    let (status, _, flushed) = app.post("/admin/api/cache/flush", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(flushed["entries"], 0);
    assert_eq!(flushed["hits"], 1);
    let (_, _, answer) = app.post("/v1/chat/completions", chat(Some(4))).await;
    assert!(answer["choices"].is_array());
    let (_, body) = app.get("/internal/cache/stats").await;
    assert_eq!(body["misses"], 2);
}

#[tokio::test]
async fn per_model_settings_persist_and_apply() {
    let app = TestApp::new(&[]);
    let (status, models) = app.get("/admin/api/models").await;
    assert_eq!(status, 200);
    let model = &models[0];
    assert_eq!(model["id"], LIGHT_ID);
    assert_eq!(model["file"], "SmolLM2-135M-Instruct-Q4_1.gguf");
    assert_eq!(model["settings"]["n_ctx"], 2048);
    assert_eq!(model["overrides"], json!({}));
    let settings = format!("/admin/api/models/{LIGHT_ID}/settings");
    // Values out of range and unknown fields are named.
    let (status, body) = put(&app, &settings, json!({"top_p": 3})).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "top_p");
    let (status, body) = put(&app, &settings, json!({"n_cxt": 10})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = put(&app, "/admin/api/models/light/nothing/settings", json!({})).await;
    assert_eq!(status, 404);
    // Load, then change: sampling defaults apply at once, engine settings at the next load.
    let (status, _, loaded) = app
        .post(&format!("/admin/api/models/{LIGHT_ID}/load"), json!({}))
        .await;
    assert_eq!(status, 200, "{loaded}");
    assert_eq!(loaded["state"], "loaded");
    let (status, body) = put(&app, &settings, json!({"max_tokens": 3, "n_ctx": 1024})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["settings"]["max_tokens"], 3);
    assert_eq!(body["settings"]["n_ctx"], 1024);
    assert_eq!(body["reload_needed"], true);
    let (_, _, answer) = app.post("/v1/chat/completions", chat(None)).await;
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let (_, status_body) = app.get("/admin/api/status").await;
    assert_eq!(status_body["loaded"][0]["n_ctx"], 2048);
    let (status, _, unloaded) = app
        .post(&format!("/admin/api/models/{LIGHT_ID}/unload"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(unloaded["state"], "available");
    let (_, _, reloaded) = app
        .post(&format!("/admin/api/models/{LIGHT_ID}/load"), json!({}))
        .await;
    assert_eq!(reloaded["reload_needed"], false);
    let (_, status_body) = app.get("/admin/api/status").await;
    assert_eq!(status_body["loaded"][0]["n_ctx"], 1024);
    // A restart on the same data directory keeps them.
    let restarted = AppState::new(app.state.settings.clone());
    let entry = restarted.registry.resolve("light").unwrap();
    assert_eq!(entry.engine_config().n_ctx, 1024);
    assert_eq!(entry.defaults().max_tokens, 3);
    // Empty overrides go back to the configuration.
    let (_, body) = put(&app, &settings, json!({})).await;
    assert_eq!(body["settings"]["max_tokens"], 1000);
    assert_eq!(body["overrides"], json!({}));
    let (status, _, _) = app
        .post(&format!("/admin/api/models/{LIGHT_ID}/reload"), json!({}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn analytics_count_requests_tokens_and_latency_per_model_and_key() {
    let app = TestApp::new(&[]);
    let (_, _, created) = app
        .post("/admin/api/keys", json!({"name": "notebooks"}))
        .await;
    let (named, named_id) = (
        created["key"].as_str().unwrap(),
        created["id"].as_str().unwrap(),
    );
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    let mut generated = 0;
    for (key, stream) in [(OPERATOR_KEY, false), (named, true), (named, false)] {
        let mut body = chat(Some(6));
        body["stream"] = json!(stream);
        body["stream_options"] = json!({"include_usage": true});
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let usage: Value = if stream {
            let last = sse_payloads(&text).into_iter().rev().nth(1).unwrap();
            serde_json::from_str::<Value>(&last).unwrap()["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        };
        generated += usage["completion_tokens"].as_u64().unwrap();
    }
    // A client mistake counts as an error; the console's own calls do not count.
    let mut bad = chat(Some(6));
    bad["temperature"] = json!(9);
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A request is counted when the server drops its response body, a
    // moment after the client has read it.
    let mut report = Value::Null;
    for _ in 0..50 {
        let (status, body) = app.get("/admin/api/analytics?range=hour").await;
        assert_eq!(status, 200, "{body}");
        report = body;
        if report["totals"]["requests"] == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(report["series"].as_array().unwrap().len(), 60);
    let totals = &report["totals"];
    assert_eq!(totals["requests"], 4, "{report}");
    assert_eq!(totals["errors"], 1);
    assert_eq!(totals["completion_tokens"], generated);
    assert!(totals["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(totals["decode_tokens_per_s"].as_f64().unwrap() > 1.0);
    let by_key: Vec<(String, u64)> = report["by_key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["totals"]["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(by_key.contains(&(named_id.to_owned(), 2)), "{by_key:?}");
    assert!(by_key.contains(&("operator".to_owned(), 1)), "{by_key:?}");
    assert!(by_key.contains(&("anonymous".to_owned(), 1)), "{by_key:?}");
    assert_eq!(report["key_names"][named_id], "notebooks");
    assert_eq!(report["by_model"][0]["name"], LIGHT_ID);
    let (_, one_key) = app
        .get(&format!("/admin/api/analytics?range=day&key={named_id}"))
        .await;
    assert_eq!(one_key["totals"]["requests"], 2);
    assert_eq!(one_key["series"].as_array().unwrap().len(), 96);
    let (status, body) = app.get("/admin/api/analytics?range=year").await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "range");
    // After the flush a shutdown does, a restart shows the same numbers.
    app.state.analytics.flush();
    let restarted = AppState::new(app.state.settings.clone());
    let report = restarted
        .analytics
        .report(&llmservice::analytics::Query {
            now: chrono::Utc::now().timestamp(),
            range: std::time::Duration::from_secs(3600),
            step: std::time::Duration::from_secs(60),
            model: None,
            key: None,
        })
        .unwrap();
    assert_eq!(report.totals.requests, 4);
    assert_eq!(report.totals.completion_tokens, generated);
}
