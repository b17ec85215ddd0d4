//! Embeddings and reranking on the real MiniLM encoder (and the synthetic heads
//! and reranker built on it), checked against PyTorch/FlagEmbedding goldens.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::{error_of, shared_models, TestApp};

fn golden(name: &str) -> Value {
    let path = shared_models().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn minilm() -> String {
    shared_models()
        .join("all-MiniLM-L6-v2-f16.gguf")
        .display()
        .to_string()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b) / (norm(a) * norm(b))
}

fn embedding_app(extra: &[(&str, &str)]) -> TestApp {
    let model = minilm();
    let mut env = vec![
        ("EMBEDDING_MODEL_PATH", model.as_str()),
        ("EMBEDDING_N_THREADS", "2"),
    ];
    env.extend_from_slice(extra);
    TestApp::new(&env)
}

#[tokio::test]
async fn minilm_embeddings_match_pytorch() {
    let app = embedding_app(&[]);
    let golden = golden("all-MiniLM-L6-v2.golden.json");
    let items = golden["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let (status, headers, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": texts}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-llmservice-cache"], "miss");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "embedding");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), items.len());
    let expected_tokens: usize = items
        .iter()
        .map(|i| i["token_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], expected_tokens);
    assert_eq!(body["usage"]["total_tokens"], expected_tokens);
    for (i, (item, gold)) in data.iter().zip(items).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let ours = floats(&item["embedding"]);
        let theirs = floats(&gold["mean_l2norm"]);
        assert_eq!(ours.len(), 384);
        let cos = cosine(&ours, &theirs);
        assert!(cos >= 0.9999, "sentence {i}: cosine {cos}");
        assert!((norm(&ours) - 1.0).abs() < 1e-4);
    }

    // Token-id input gives the same vectors as the text.
    let ids: Vec<Value> = items.iter().map(|i| i["token_ids"].clone()).collect();
    let (status, _, by_ids) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": ids}),
        )
        .await;
    assert_eq!(status, 200, "{by_ids}");
    for (a, b) in by_ids["data"].as_array().unwrap().iter().zip(data) {
        let cos = cosine(&floats(&a["embedding"]), &floats(&b["embedding"]));
        assert!(cos > 0.99999, "{cos}");
    }
}

#[tokio::test]
async fn base64_and_dimensions_are_honoured() {
    let app = embedding_app(&[]);
    let input = "The quick brown fox jumps over the lazy dog.";
    let (_, _, float) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": input}),
        )
        .await;
    let full = floats(&float["data"][0]["embedding"]);

    let (status, _, b64) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": input, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{b64}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, full, "base64 must carry the same floats");

    let (status, _, small) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": input, "dimensions": 64}),
        )
        .await;
    assert_eq!(status, 200, "{small}");
    let small = floats(&small["data"][0]["embedding"]);
    assert_eq!(small.len(), 64);
    assert!((norm(&small) - 1.0).abs() < 1e-5);
    let head_norm = norm(&full[..64]);
    for (s, f) in small.iter().zip(&full[..64]) {
        assert!((s - f / head_norm).abs() < 1e-6);
    }

    let (status, _, err) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": input, "dimensions": 385}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&err)["param"], "dimensions");
}

#[tokio::test]
async fn tier_embedding_dimension_is_the_default() {
    let app = embedding_app(&[("EMBEDDING_EMBEDDING_DIMENSION", "128")]);
    let (status, _, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": "hello"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 128);
}

#[tokio::test]
async fn embedding_mistakes_are_clear_400s() {
    let app = embedding_app(&[]);
    let long = "word ".repeat(600);
    let cases = [
        (
            json!({"model": "embedding", "input": long}),
            "input",
            Some("context_length_exceeded"),
        ),
        (json!({"model": "embedding", "input": []}), "input", None),
        (json!({"model": "embedding", "input": ""}), "input", None),
        (
            json!({"model": "embedding", "input": ["ok", ""]}),
            "input",
            None,
        ),
        (
            json!({"model": "embedding", "input": [[1, 2, 99999999]]}),
            "input",
            None,
        ),
        (
            json!({"model": "embedding", "input": "x", "encoding_format": "hex"}),
            "encoding_format",
            None,
        ),
        (
            json!({"model": "embedding", "input": "x", "embedding_type": "sparse"}),
            "embedding_type",
            Some("unsupported_parameter"),
        ),
        (
            json!({"model": "embedding", "input": "x", "embedding_type": "colbert"}),
            "embedding_type",
            Some("unsupported_parameter"),
        ),
        (
            json!({"model": "embedding", "input": "x", "return_sparse": true}),
            "return_sparse",
            Some("unsupported_parameter"),
        ),
        (
            json!({"model": "embedding", "input": "x", "embedding_type": "fancy"}),
            "embedding_type",
            None,
        ),
        (
            json!({"model": "embedding", "input": "x", "dimensions": 0}),
            "dimensions",
            None,
        ),
        (json!({"model": "light", "input": "x"}), "model", None),
        (json!({"model": "embedding", "input": 42}), "input", None),
    ];
    for (request, param, code) in cases {
        let (status, _, body) = app.post("/v1/embeddings", request.clone()).await;
        assert_eq!(status, 400, "{request} -> {body}");
        let error = error_of(&body);
        assert_eq!(error["param"], param, "{request} -> {body}");
        if let Some(code) = code {
            assert_eq!(error["code"], code, "{request} -> {body}");
        }
    }
    // Asked for, a long input is cut to the model's 512 tokens instead.
    let (status, _, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": long, "truncate": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 512);
}

#[tokio::test]
async fn a_large_batch_budget_does_not_raise_the_input_limit() {
    // 2048-token decodes, but MiniLM has 512 positions: inputs stay limited to 512.
    let app = embedding_app(&[("EMBEDDING_N_BATCH", "2048")]);
    let long = "word ".repeat(600);
    let (status, _, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": long}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body)["message"].as_str().unwrap().contains("512"));
    let (status, _, body) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": [long.clone(), long, "short"], "truncate": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 512 + 512 + 3);
}

#[tokio::test]
async fn concurrent_requests_share_decodes() {
    let app = embedding_app(&[]);
    let base = app.spawn().await;
    let client = reqwest::Client::new();
    let texts: Vec<String> = (0..16)
        .map(|i| format!("sentence number {i} about the weather in city {}", i * 7))
        .collect();
    let alone = |text: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let body: Value = client
                .post(format!("{base}/v1/embeddings"))
                .json(&json!({"model": "embedding", "input": text}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            floats(&body["data"][0]["embedding"])
        }
    };
    let mut solo = Vec::new();
    for t in &texts[..4] {
        solo.push(alone(t.clone()).await);
    }
    let entry = app.state.registry.resolve("embedding").unwrap();
    let engine = entry.loaded_engine().unwrap();
    let steps_before = engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed);
    // 8 clients x 16 inputs at once.
    let requests = (0..8).map(|_| {
        let client = client.clone();
        let base = base.clone();
        let texts = texts.clone();
        async move {
            let response = client
                .post(format!("{base}/v1/embeddings"))
                .json(&json!({"model": "embedding", "input": texts}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    });
    let bodies = futures_util::future::join_all(requests).await;
    let steps = engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed)
        - steps_before;
    // 128 inputs of ~15 tokens fit a 512-token batch ~30 at a time; however the
    // requests' arrivals interleave, decodes carry many inputs each.
    assert!(steps < 32, "128 inputs took {steps} decodes");
    for body in &bodies {
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 16);
        for (i, s) in solo.iter().enumerate() {
            let cos = cosine(&floats(&data[i]["embedding"]), s);
            assert!(cos > 0.9999, "input {i}: batched vs alone cosine {cos}");
        }
    }
}

/// A folder holding the MiniLM GGUF with BGE-M3-style heads beside it, one in
/// each file format and naming scheme.
pub(crate) fn m3_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let heads = shared_models().join("m3-heads");
    std::os::unix::fs::symlink(minilm(), dir.path().join("m3-minilm.gguf")).unwrap();
    std::fs::copy(
        heads.join("sparse_linear.pt"),
        dir.path().join("m3-minilm.sparse_linear.pt"),
    )
    .unwrap();
    std::fs::copy(
        heads.join("colbert_linear.safetensors"),
        dir.path().join("colbert_linear.safetensors"),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn m3_dense_sparse_and_colbert_match_flagembedding() {
    let dir = m3_model_dir();
    let model = dir.path().join("m3-minilm.gguf").display().to_string();
    let app = TestApp::new(&[
        ("EMBEDDING_MODEL_PATH", model.as_str()),
        ("EMBEDDING_N_THREADS", "2"),
    ]);
    let golden = golden("synthetic-m3-heads.golden.json");
    let items = golden["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();

    // Each text alone, as the goldens were computed (a batch's shape moves
    // llama.cpp's numerics a little: see the batched check below).
    let mut hybrid = Vec::new();
    let mut colbert = Vec::new();
    for text in &texts {
        let (status, _, body) = app
            .post(
                "/v1/embeddings",
                json!({"model": "embedding", "input": text, "embedding_type": "dense", "return_sparse": true}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        hybrid.push(body["data"][0].clone());
        let (status, _, body) = app
            .post(
                "/v1/embeddings",
                json!({"model": "embedding", "input": [text], "embedding_type": "colbert", "encoding_format": "float"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        colbert.push(body["data"][0].clone());
    }
    let (status, _, batched) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": texts, "embedding_type": "sparse"}),
        )
        .await;
    assert_eq!(status, 200, "{batched}");
    let expected_tokens: usize = items
        .iter()
        .map(|i| i["input_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(batched["usage"]["prompt_tokens"], expected_tokens);
    for (i, item) in batched["data"].as_array().unwrap().iter().enumerate() {
        assert!(item.get("embedding").is_none(), "sparse only");
        let alone = hybrid[i]["sparse_embedding"].as_object().unwrap();
        for (id, w) in item["sparse_embedding"].as_object().unwrap() {
            let a = alone.get(id).and_then(Value::as_f64).unwrap_or(0.0);
            assert!((w.as_f64().unwrap() - a).abs() < 2e-3, "text {i} id {id}");
        }
    }

    const TOL: f64 = 1e-3;
    for (i, gold) in items.iter().enumerate() {
        let item = &hybrid[i];
        // Dense: the normalized CLS row, not the mean the GGUF declares.
        let cos = cosine(&floats(&item["embedding"]), &floats(&gold["dense"]));
        assert!(cos >= 0.9999, "text {i}: dense cosine {cos}");

        // Sparse: BOS/CLS, EOS/SEP, PAD and UNK carry no weight (see ARCHITECTURE.md).
        let ours = item["sparse_embedding"].as_object().unwrap();
        let theirs = gold["lexical_weights_sep_excluded"].as_object().unwrap();
        for (id, w) in theirs {
            let w = w.as_f64().unwrap();
            match ours.get(id) {
                Some(v) => assert!((v.as_f64().unwrap() - w).abs() < TOL, "text {i} id {id}"),
                None => assert!(w < TOL, "text {i}: id {id} ({w}) missing"),
            }
        }
        for (id, v) in ours {
            let w = theirs.get(id).and_then(Value::as_f64).unwrap_or(0.0);
            assert!(
                (v.as_f64().unwrap() - w).abs() < TOL,
                "text {i}: extra id {id}"
            );
            assert!(!["101", "102", "0", "100"].contains(&id.as_str()));
        }

        // ColBERT: one normalized vector per token after CLS.
        let ours = colbert[i]["colbert_embedding"].as_array().unwrap();
        let theirs = gold["colbert_vecs"].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "text {i}");
        for (a, b) in ours.iter().zip(theirs) {
            let (a, b) = (floats(a), floats(b));
            let max = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(f64::from(max) < TOL, "text {i}: colbert diff {max}");
        }
    }
}

#[tokio::test]
async fn reranker_scores_match_pytorch_in_both_shapes() {
    let model = shared_models()
        .join("SYNTHETIC-minilm-l6-reranker-f16.gguf")
        .display()
        .to_string();
    let app = TestApp::new(&[
        ("RERANKER_MODEL_PATH", model.as_str()),
        ("RERANKER_N_THREADS", "2"),
    ]);
    let golden = golden("synthetic-minilm-reranker.golden.json");
    let items = golden["items"].as_array().unwrap();
    let documents: Vec<&str> = items
        .iter()
        .map(|i| i["document"].as_str().unwrap())
        .collect();
    let expected: Vec<f64> = items
        .iter()
        .map(|i| i["score_token_type_zero"].as_f64().unwrap())
        .collect();
    let pair_tokens: usize = items
        .iter()
        .map(|i| i["token_ids"].as_array().unwrap().len())
        .sum();
    let mut order: Vec<usize> = (0..expected.len()).collect();
    order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));

    // Seed 000's shape: `top_k`, raw scores.
    let (status, _, seed) = app
        .post(
            "/v1/rerank",
            json!({"model": "reranker", "query": golden["query"], "documents": documents, "top_k": 3, "return_documents": true}),
        )
        .await;
    assert_eq!(status, 200, "{seed}");
    assert_eq!(seed["object"], "list");
    assert!(seed.get("results").is_none());
    assert_eq!(seed["usage"]["prompt_tokens"], pair_tokens);
    let data = seed["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (rank, item) in data.iter().enumerate() {
        let index = item["index"].as_u64().unwrap() as usize;
        assert_eq!(index, order[rank]);
        let score = item["score"].as_f64().unwrap();
        assert!(
            (score - expected[index]).abs() < 0.01,
            "doc {index}: {score} vs {}",
            expected[index]
        );
        assert_eq!(item["document"], documents[index]);
    }

    // Cohere/Jina's shape: `top_n`, relevance_score = sigmoid(score), documents as objects.
    let objects: Vec<Value> = documents.iter().map(|d| json!({"text": d})).collect();
    let (status, _, cohere) = app
        .post(
            "/rerank",
            json!({"model": "reranker", "query": golden["query"], "documents": objects, "top_n": 2}),
        )
        .await;
    assert_eq!(status, 200, "{cohere}");
    assert!(cohere.get("data").is_none());
    let results = cohere["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (rank, item) in results.iter().enumerate() {
        let index = item["index"].as_u64().unwrap() as usize;
        assert_eq!(index, order[rank]);
        let sigmoid = 1.0 / (1.0 + (-expected[index]).exp());
        let got = item["relevance_score"].as_f64().unwrap();
        assert!(
            (got - sigmoid).abs() < 0.002,
            "doc {index}: {got} vs {sigmoid}"
        );
        assert_eq!(item["document"]["text"], documents[index]);
    }

    // Neither selector: both shapes, every document; no documents when not asked.
    let (status, _, both) = app
        .post(
            "/v1/rerank",
            json!({"query": golden["query"], "documents": documents, "return_documents": false}),
        )
        .await;
    assert_eq!(status, 200, "{both}");
    assert_eq!(both["data"].as_array().unwrap().len(), 4);
    assert_eq!(both["results"].as_array().unwrap().len(), 4);
    assert!(both["data"][0].get("document").is_none());

    // Mistakes.
    for (request, param) in [
        (json!({"query": "q", "documents": []}), "documents"),
        (json!({"query": "", "documents": ["a"]}), "query"),
        (
            json!({"query": "q", "documents": ["a"], "top_n": 0}),
            "top_n",
        ),
        (
            json!({"query": "q", "documents": ["word ".repeat(600)]}),
            "documents",
        ),
        (
            json!({"model": "light", "query": "q", "documents": ["a"]}),
            "model",
        ),
    ] {
        let (status, _, body) = app.post("/v1/rerank", request.clone()).await;
        assert_eq!(status, 400, "{request} -> {body}");
        assert_eq!(error_of(&body)["param"], param, "{request} -> {body}");
    }
    // The reranker is not an embedding model.
    let (status, _, body) = app
        .post("/v1/embeddings", json!({"model": "reranker", "input": "x"}))
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn embeddings_and_rerank_answer_from_the_cache() {
    let rerank_model = shared_models()
        .join("SYNTHETIC-minilm-l6-reranker-f16.gguf")
        .display()
        .to_string();
    let app = embedding_app(&[
        ("ENABLE_CACHE", "true"),
        ("CACHE_PERSIST_TO_DISK", "false"),
        ("RERANKER_MODEL_PATH", rerank_model.as_str()),
    ]);
    let request = json!({"model": "embedding", "input": ["cache me", "and me"], "dimensions": 32});
    let (_, first_headers, first) = app.post("/v1/embeddings", request.clone()).await;
    crate::cache::wait_for_entries(&app, 1).await;
    let (_, headers, second) = app.post("/v1/embeddings", request).await;
    assert_eq!(first_headers["x-llmservice-cache"], "miss");
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(first, second);
    // Anything that changes the answer is a different entry.
    let (_, headers, other) = app
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": ["cache me", "and me"], "dimensions": 16}),
        )
        .await;
    assert_eq!(headers["x-llmservice-cache"], "miss");
    assert_eq!(other["data"][0]["embedding"].as_array().unwrap().len(), 16);

    let rerank = json!({"query": "q", "documents": ["a", "b"], "top_n": 1});
    let (_, _, first) = app.post("/v1/rerank", rerank.clone()).await;
    crate::cache::wait_for_entries(&app, 3).await;
    let (_, headers, second) = app.post("/v1/rerank", rerank).await;
    assert_eq!(headers["x-llmservice-cache"], "hit");
    assert_eq!(first["results"], second["results"]);
}
