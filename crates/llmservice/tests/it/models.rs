//! Model listing, routing by name, and the models directory.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn lists_tiers_and_the_models_directory_with_kinds_and_states() {
    let app = TestApp::new(&[]);
    let dir = app.models_dir();
    std::fs::copy(
        shared_models().join("all-MiniLM-L6-v2-f16.gguf"),
        dir.join("all-MiniLM-L6-v2-f16.gguf"),
    )
    .unwrap();
    std::fs::copy(
        shared_models().join("SYNTHETIC-minilm-l6-reranker-f16.gguf"),
        dir.join("tiny-reranker.gguf"),
    )
    .unwrap();
    std::fs::write(dir.join("broken.gguf"), b"not a gguf").unwrap();

    let (status, body) = app.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let find = |id: &str| {
        data.iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {body}"))
            .clone()
    };
    let light = find(LIGHT_ID);
    assert_eq!(light["owned_by"], "llmservice-light");
    assert_eq!(light["object"], "model");
    assert_eq!(light["kind"], "chat");
    assert_eq!(light["state"], "available");
    assert!(light["created"].as_i64().unwrap() > 0);
    assert_eq!(find("all-MiniLM-L6-v2-f16")["kind"], "embedding");
    assert_eq!(find("tiny-reranker")["kind"], "reranker");
    assert_eq!(data.len(), 3, "the broken file is not offered");

    let (status, chat) = app.get("/v1/models/chat").await;
    assert_eq!(status, 200);
    assert_eq!(chat.as_array().unwrap().len(), 1);
    assert_eq!(chat[0]["name"], LIGHT_ID);
    let (_, embeddings) = app.get("/v1/models/embeddings").await;
    assert_eq!(embeddings[0]["name"], "all-MiniLM-L6-v2-f16");

    // After first use the model shows as loaded, in the list and in /health.
    let (status, _, _) = app
        .post("/v1/chat/completions", json!({"model": LIGHT_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}))
        .await;
    assert_eq!(status, 200);
    let (_, one) = app.get(&format!("/v1/models/{LIGHT_ID}")).await;
    assert_eq!(one["state"], "loaded");
    // Retrieving takes the names a model goes by, not the name patterns
    // that route a request to a tier.
    for name in ["light", "SmolLM2-135M-Instruct-Q4_1", "default"] {
        let (status, one) = app.get(&format!("/v1/models/{name}")).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(one["id"], LIGHT_ID, "{name}");
    }
    let (status, _) = app.get("/v1/models/qwen-0.5b").await;
    assert_eq!(status, 404, "a pattern is not a model");
    let (_, health) = app.get("/health").await;
    assert_eq!(health["status"], "healthy");
    assert!(health["timestamp"].is_string());
    assert_eq!(health["models"][0]["id"], LIGHT_ID);
}

#[tokio::test]
async fn names_resolve_by_id_tier_stem_and_pattern() {
    let app = TestApp::new(&[]);
    for name in [LIGHT_ID, "light", "SmolLM2-135M-Instruct-Q4_1", "qwen-0.5b"] {
        let (status, _, body) = app
            .post(
                "/v1/completions",
                json!({"model": name, "prompt": "Hi", "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["model"], Value::from(name));
    }
    // A size hint for a tier that is not configured is not found.
    let (status, _, _) = app
        .post(
            "/v1/completions",
            json!({"model": "llama-70b", "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn concurrent_first_requests_load_the_model_once() {
    let app = TestApp::new(&[]);
    let entry = app.state.registry.resolve("light").unwrap();
    let loads = futures_util::future::join_all((0..4).map(|_| entry.engine(true))).await;
    let first = loads[0].as_ref().unwrap();
    for engine in &loads {
        assert!(std::sync::Arc::ptr_eq(first, engine.as_ref().unwrap()));
    }
}

#[tokio::test]
async fn tokenize_and_detokenize_agree_with_usage() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post("/tokenize", json!({"content": "Once upon a time"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["tokens"].as_array().unwrap().clone();
    assert_eq!(body["count"], 4);
    assert_eq!(body["max_model_len"], 2048);
    let (_, _, back) = app.post("/detokenize", json!({"tokens": tokens})).await;
    assert_eq!(back["content"], "Once upon a time");

    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let (_, _, counted) = app
        .post("/tokenize", json!({"model": "light", "messages": messages}))
        .await;
    let (_, _, chat) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "max_tokens": 1, "messages": messages}),
        )
        .await;
    assert_eq!(counted["count"], chat["usage"]["prompt_tokens"]);

    let (_, _, pieces) = app
        .post(
            "/tokenize",
            json!({"content": "Hi there", "with_pieces": true}),
        )
        .await;
    assert_eq!(pieces["tokens"][0]["piece"], "Hi");

    let (status, _, body) = app.post("/detokenize", json!({"tokens": [999999]})).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "tokens");
    let (status, _, _) = app.post("/tokenize", json!({})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latency() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "max_tokens": 5, "temperature": 0, "ignore_eos": true,
            "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, _, _) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let expected = [
        "llmservice_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"
            .to_owned(),
        "llmservice_http_requests_total{route=\"/v1/chat/completions\",status=\"404\"} 1"
            .to_owned(),
        format!("llmservice_completion_tokens_total{{model=\"{LIGHT_ID}\"}} 5"),
        format!("llmservice_prompt_tokens_total{{model=\"{LIGHT_ID}\"}} {prompt}"),
        format!("llmservice_time_to_first_token_seconds_count{{model=\"{LIGHT_ID}\"}} 1"),
        format!("llmservice_model_loaded{{kind=\"chat\",model=\"{LIGHT_ID}\"}} 1"),
        format!("llmservice_sequences{{model=\"{LIGHT_ID}\",state=\"active\"}} 0"),
        "llmservice_response_cache{stat=\"hits\"} 0".to_owned(),
    ];
    // The scheduler publishes its counters at the end of the step that answered, so
    // the sequence gauge may trail the response by a moment.
    let mut response = String::new();
    for _ in 0..100 {
        response = app.router().oneshot_get("/metrics").await;
        if expected
            .iter()
            .all(|line| response.lines().any(|l| l == line))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for line in &expected {
        assert!(
            response.lines().any(|l| l == line),
            "missing {line:?} in\n{response}"
        );
    }
    // Five tokens: one first token, then inter-token gaps between the text events.
    assert!(response.contains(&format!(
        "llmservice_inter_token_latency_seconds_count{{model=\"{LIGHT_ID}\"}}"
    )));
}

#[tokio::test]
async fn operators_load_and_unload_and_idle_models_unload_but_busy_ones_stay() {
    let app = TestApp::new(&[("LIGHT_KEEP_ALIVE", "0.3")]);
    let (status, _, body) = app
        .post(&format!("/v1/models/{LIGHT_ID}/load"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "loaded");
    let (status, _, body) = app.post("/v1/models/light/unload", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "available");
    let (status, _, body) = app.post("/v1/models/light/reboot", json!({})).await;
    assert_eq!(status, 400, "{body}");

    // A model serving a stream is neither unloaded on request nor by keep-alive.
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    let stream = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "light", "prompt": "Count:", "max_tokens": 1500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (status, _, body) = app.post("/v1/models/light/unload", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_of(&body)["code"], "model_in_use");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    app.state.registry.unload_idle().await;
    let entry = app.state.registry.resolve("light").unwrap();
    assert_eq!(entry.state().as_str(), "loaded");
    drop(stream);

    // Once idle past its keep-alive, it goes.
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        app.state.registry.unload_idle().await;
        if entry.state().as_str() == "available" {
            return;
        }
    }
    panic!("the idle model stayed loaded");
}

#[tokio::test]
async fn ollama_show_reads_the_file_without_loading_the_model() {
    let app = TestApp::new(&[]);
    let (status, _, shown) = app.post("/api/show", json!({"model": "light"})).await;
    assert_eq!(status, 200, "{shown}");
    let light = app.state.registry.resolve("light").unwrap();
    assert_eq!(light.state().as_str(), "available", "nothing loaded");
    assert_eq!(shown["model_info"]["general.architecture"], "llama");
    // The context it serves with (LIGHT_N_CTX), under Ollama's key.
    assert_eq!(shown["model_info"]["llama.context_length"], 2048);
    assert_eq!(shown["model_info"]["llama.embedding_length"], 576);
    assert_eq!(shown["details"]["family"], "llama");
    assert_eq!(shown["details"]["parameter_size"], "135M");
    assert!(shown["template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(shown["capabilities"], json!(["completion"]));
    // Loaded, it says the same.
    let (status, _, _) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, again) = app.post("/api/show", json!({"model": "light"})).await;
    assert_eq!(again["model_info"]["llama.context_length"], 2048);
    assert_eq!(again["template"], shown["template"]);
    assert_eq!(again["capabilities"], shown["capabilities"]);
}

#[tokio::test]
async fn max_model_memory_evicts_the_least_recently_used_idle_model() {
    // No host prompt cache, so each model's estimate is its file and its KV.
    let app = TestApp::new(&[("MAX_MODEL_MEMORY", "250"), ("PROMPT_CACHE_RAM", "0")]);
    let file = shared_models().join("SmolLM2-135M-Instruct-Q4_1.gguf");
    std::fs::copy(&file, app.models_dir().join("second.gguf")).unwrap();
    let registry = &app.state.registry;
    let file_bytes = std::fs::metadata(&file).unwrap().len();
    let kv_per_token = 30 * 3 * (64 + 64) * 2;
    let light = registry.resolve("light").unwrap();
    assert_eq!(light.memory_estimate(), file_bytes + kv_per_token * 2048);
    let second = registry.resolve("second").unwrap();
    assert_eq!(second.memory_estimate(), file_bytes + kv_per_token * 4096);

    let ask = |model: &str| json!({"model": model, "prompt": "Hi", "max_tokens": 1});
    let (status, _, _) = app.post("/v1/completions", ask("light")).await;
    assert_eq!(status, 200);
    let (status, _, _) = app.post("/v1/completions", ask("second")).await;
    assert_eq!(status, 200);
    // 139 MiB and 184 MiB do not fit in 250 together.
    assert_eq!(second.state().as_str(), "loaded");
    assert_eq!(
        light.state().as_str(),
        "available",
        "the older model made room"
    );
    // The idle sweep keeps the newest model, which fits.
    registry.unload_idle().await;
    assert_eq!(second.state().as_str(), "loaded");
    // A model alone over the budget still loads (with a warning), and the
    // idle sweep does not unload it.
    let tight = TestApp::new(&[("MAX_MODEL_MEMORY", "100"), ("PROMPT_CACHE_RAM", "0")]);
    let (status, _, _) = tight.post("/v1/completions", ask("light")).await;
    assert_eq!(status, 200);
    tight.state.registry.unload_idle().await;
    let light = tight.state.registry.resolve("light").unwrap();
    assert_eq!(light.state().as_str(), "loaded", "the one model left stays");
}

#[tokio::test]
async fn max_loaded_models_evicts_the_least_recently_used_idle_model() {
    let app = TestApp::new(&[("MAX_LOADED_MODELS", "1")]);
    std::fs::copy(
        shared_models().join("SmolLM2-135M-Instruct-Q4_1.gguf"),
        app.models_dir().join("second.gguf"),
    )
    .unwrap();
    let ask = |model: &str| json!({"model": model, "prompt": "Hi", "max_tokens": 1});
    let (status, _, _) = app.post("/v1/completions", ask("light")).await;
    assert_eq!(status, 200);
    let (status, _, _) = app.post("/v1/completions", ask("second")).await;
    assert_eq!(status, 200);
    let state = |id: &str| app.state.registry.resolve(id).unwrap().state().as_str();
    assert_eq!(state("second"), "loaded");
    assert_eq!(
        state("light"),
        "available",
        "the least recently used model made room"
    );
    let (_, health) = app.get("/health").await;
    assert_eq!(health["models"].as_array().unwrap().len(), 1);

    // Two first loads at once take turns, so they cannot both find a free place.
    std::fs::copy(
        shared_models().join("SmolLM2-135M-Instruct-Q4_1.gguf"),
        app.models_dir().join("third.gguf"),
    )
    .unwrap();
    let registry = &app.state.registry;
    let (light, third) = (
        registry.resolve("light").unwrap(),
        registry.resolve("third").unwrap(),
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let loads = async {
        let both = tokio::join!(
            app.post("/v1/models/light/load", json!({})),
            app.post("/v1/models/third/load", json!({})),
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        both
    };
    let watch = async {
        let mut overlap = false;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            overlap |= light.state().as_str() == "loading" && third.state().as_str() == "loading";
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        overlap
    };
    let ((a, b), overlap) = tokio::join!(loads, watch);
    assert_eq!((a.0.as_u16(), b.0.as_u16()), (200, 200), "{} {}", a.2, b.2);
    assert!(
        !overlap,
        "two loads ran at once, each counting the other's place as free"
    );
    // The second may have found the first still held by its own request, and
    // gone over the limit; the idle sweep then brings the count back.
    registry.unload_idle().await;
    let loaded: Vec<_> = registry.loaded().iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        loaded.len(),
        1,
        "MAX_LOADED_MODELS=1 but {loaded:?} are loaded"
    );
}

#[tokio::test]
async fn openapi_document_and_docs_page() {
    let app = TestApp::new(&[]);
    let (status, spec) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models/{id}",
        "/tokenize",
        "/metrics",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} missing");
    }
    let page = app.router().oneshot_get("/docs/").await;
    assert!(page.contains("Swagger UI"));
    // Seed 002's `/redoc`: the same document, in ReDoc.
    let page = app.router().oneshot_get("/redoc").await;
    assert!(
        page.contains("<redoc") || page.contains("Redoc.init"),
        "{page}"
    );
    assert!(
        page.contains("/v1/chat/completions"),
        "the document is in the page"
    );
    // Its script is ReDoc's CDN's: sandboxed away from the dashboard's origin.
    let (status, headers, _) = app
        .send(
            axum::http::Request::get("/redoc")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-security-policy"], "sandbox allow-scripts");
}
