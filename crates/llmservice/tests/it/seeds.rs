//! The seeds' configurations on a real model: seed 002's single `MODEL_PATH`
//! with its unprefixed settings, seed 003's model name without its
//! quantization, seed 000's `{TIER}_EMBEDDING_MODE` and `{TIER}_BACKEND=mlx`.

use serde_json::{json, Value};

use crate::common::*;

fn chat(model: &str) -> Value {
    json!({"model": model, "max_tokens": 3, "temperature": 0,
           "messages": [{"role": "user", "content": "Hello"}]})
}

#[tokio::test]
async fn seed_002_model_path_is_the_default_tier_with_its_settings() {
    let app = TestApp::new(&[
        ("LIGHT_MODEL_PATH", ""),
        ("LIGHT_N_CTX", ""),
        ("MODEL_PATH", &smollm()),
        ("N_CTX", "1024"),
        ("MAX_TOKENS", "2"),
        ("N_GPU_LAYERS", "0"),
    ]);
    for model in ["SmolLM2-135M-Instruct-Q4_1", "default", LIGHT_ID] {
        let mut body = chat(model);
        body.as_object_mut().unwrap().remove("max_tokens");
        let (status, _, answer) = app.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{model}: {answer}");
        // MAX_TOKENS is the default budget.
        assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
    }
    let (_, status) = app.get("/admin/api/status").await;
    assert_eq!(status["loaded"][0]["n_ctx"], 1024);
}

#[tokio::test]
async fn seed_003_names_its_model_without_the_quantization() {
    let app = TestApp::new(&[("LIGHT_MODEL_PATH", "")]);
    std::os::unix::fs::symlink(
        smollm(),
        app.models_dir().join("llama-2-7b-chat.Q4_K_M.gguf"),
    )
    .unwrap();
    let (status, _, answer) = app
        .post("/v1/chat/completions", chat("llama-2-7b-chat"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, answer) = app
        .post("/v1/chat/completions", chat("llama-2-13b-chat"))
        .await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test]
async fn embedding_mode_serves_a_generative_model_for_embeddings() {
    let app = TestApp::new(&[
        ("EMBEDDING_MODEL_PATH", &smollm()),
        ("EMBEDDING_EMBEDDING_MODE", "true"),
        ("EMBEDDING_N_THREADS", "2"),
    ]);
    let (_, models) = app.get("/v1/models").await;
    let embedding = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_str().unwrap().starts_with("embedding/"))
        .unwrap();
    assert_eq!(embedding["kind"], "embedding");
    let (status, _, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": ["The cat sat on the mat.", "A dog barked."]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), 2);
    assert_eq!(vectors[0].len(), 576, "SmolLM2-135M's hidden size");
    for v in &vectors {
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    assert_ne!(vectors[0], vectors[1]);
    // The same model as a chat tier still chats.
    let (status, _, _) = app.post("/v1/chat/completions", chat("light")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_mlx_tier_starts_and_says_why_it_cannot_load_here() {
    let app = TestApp::new(&[
        (
            "HEAVY_MODEL_PATH",
            "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
        ),
        ("HEAVY_BACKEND", "mlx"),
    ]);
    let (status, _, answer) = app.post("/v1/chat/completions", chat("light")).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, answer) = app.post("/v1/chat/completions", chat("heavy")).await;
    assert!(status.is_server_error(), "{status} {answer}");
    let message = error_of(&answer)["message"].as_str().unwrap();
    assert!(
        message.contains("Apple Silicon") && message.contains("llamacpp"),
        "{message}"
    );
    let (_, models) = app.get("/v1/models").await;
    let heavy = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_str().unwrap().starts_with("heavy/"))
        .unwrap()
        .clone();
    assert_eq!(heavy["state"], "failed", "{heavy}");
}
