//! Retrieval on the real MiniLM encoder (embedded Qdrant on disk) and SmolLM2
//! for answers: seed 003's requests as they are, replacement by id, filters,
//! restarts, the model a collection remembers, and every client mistake.

use serde_json::{json, Value};

use crate::common::{error_of, shared_models, sse_events, sse_payloads, TestApp};

fn minilm() -> String {
    shared_models()
        .join("all-MiniLM-L6-v2-f16.gguf")
        .display()
        .to_string()
}

/// A server with MiniLM as its embedding tier, its data under `data_dir`.
pub(crate) fn rag_app(data_dir: &std::path::Path, extra: &[(&str, &str)]) -> TestApp {
    let minilm = minilm();
    let data = data_dir.display().to_string();
    let mut env = vec![
        ("EMBEDDING_MODEL_PATH", minilm.as_str()),
        ("EMBEDDING_N_THREADS", "2"),
        ("DATA_DIR", data.as_str()),
    ];
    env.extend_from_slice(extra);
    TestApp::new(&env)
}

const SEED_DOCUMENTS: [&str; 3] = [
    "Docker is a containerization platform that packages applications.",
    "Kubernetes orchestrates containerized applications at scale.",
    "FastAPI is a modern Python web framework for building APIs.",
];

async fn ingest_seed(app: &TestApp) -> Value {
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({
                "texts": SEED_DOCUMENTS,
                "metadata": [
                    {"source": "docker-docs", "type": "definition"},
                    {"source": "k8s-docs", "type": "definition"},
                    {"source": "fastapi-docs", "type": "definition"}
                ]
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn texts(results: &Value) -> Vec<String> {
    results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn seed_requests_work_and_answers_are_given_their_sources() {
    let data = tempfile::tempdir().unwrap();
    seed_requests_as_sent(&rag_app(data.path(), &[])).await;
}

/// Seed 003's requests, searches in every mode, and cited answers, whole
/// and streamed.
pub(crate) async fn seed_requests_as_sent(app: &TestApp) {
    let body = ingest_seed(app).await;
    assert_eq!(body["collection"], "default");
    assert_eq!(body["chunks"], 3);
    assert!(body["embedded_tokens"].as_u64().unwrap() > 20, "{body}");
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Test document content"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"][0]["chunks"], 1);

    // Every mode ranks the two container documents above the web framework.
    for mode in ["hybrid", "dense", "sparse"] {
        let (status, _, body) = app
            .post(
                "/v1/rag/search",
                json!({"query": "How do Docker and Kubernetes work together?", "top_k": 2,
                       "mode": mode, "score_threshold": 0.0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["mode"], mode);
        let found = texts(&body["results"]);
        assert_eq!(found.len(), 2, "{mode}: {body}");
        assert!(
            found
                .iter()
                .all(|t| t.contains("Docker") || t.contains("Kubernetes")),
            "{mode}: {found:?}"
        );
        if mode != "sparse" {
            let similarity = body["results"][0]["similarity"].as_f64().unwrap();
            assert!((0.2..=1.0).contains(&similarity), "{body}");
        }
    }

    // Seed 003's chat request, verbatim.
    let (status, _, answer) = app
        .post(
            "/v1/rag/chat",
            json!({"query": "How do Docker and Kubernetes work together?",
                   "max_tokens": 256, "num_context_docs": 3}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer["answer"].as_str().unwrap().trim().is_empty(),
        "{answer}"
    );
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(answer["sources"].as_array().unwrap().len() <= 3);

    // Greedy, streamed: the sources first, then the text, then the finish;
    // the same answer as the whole one.
    let request = json!({"query": "What is Docker?", "max_tokens": 40, "num_context_docs": 2,
                         "temperature": 0, "score_threshold": 0.0});
    let (status, _, whole) = app.post("/v1/rag/chat", request.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let sources = whole["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{whole}");
    assert!(
        sources[0]["text"].as_str().unwrap().contains("Docker"),
        "{whole}"
    );
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let (status, headers, body) = app.post("/v1/rag/chat", streamed).await;
    assert_eq!(status, 200);
    let events = sse_events(&headers, &body);
    assert_eq!(events[0]["type"], "sources");
    assert_eq!(events[0]["sources"], whole["sources"]);
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["finish_reason"], whole["finish_reason"]);
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, whole["answer"].as_str().unwrap());
}

#[tokio::test]
async fn nothing_relevant_means_no_sources_and_the_model_is_told() {
    let data = tempfile::tempdir().unwrap();
    let app = rag_app(data.path(), &[]);
    // Before any ingest: the default collection is empty, not an error.
    let (status, _, body) = app
        .post("/v1/rag/search", json!({"query": "anything"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"], json!([]));
    let (status, list) = app.get("/v1/rag/documents").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"], json!([]));
    let (status, list) = app.get("/v1/rag/documents?collection=other").await;
    assert_eq!(
        status, 404,
        "only the default collection is empty before use: {list}"
    );
    ingest_seed(&app).await;
    let (status, _, body) = app
        .post(
            "/v1/rag/chat",
            json!({"query": "What is the boiling point of water at sea level?",
                   "max_tokens": 8, "score_threshold": 0.95}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sources"], json!([]));
}

#[tokio::test]
async fn ids_replace_documents_and_filters_select_by_metadata() {
    let data = tempfile::tempdir().unwrap();
    ids_and_filters(&rag_app(data.path(), &[]), true).await;
}

/// Replacement by id, metadata filters, paging, deletes and the counts;
/// `on_disk`: the store knows its bytes.
pub(crate) async fn ids_and_filters(app: &TestApp, on_disk: bool) {
    let long: String = (0..120)
        .map(|i| format!("Sentence number {i} talks about ships and harbours. "))
        .collect();
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": [long, "Bread needs flour, water, salt and yeast."],
                   "ids": ["ships", "bread"],
                   "metadata": [{"source": "sea"}, {"source": "kitchen", "lang": "en"}],
                   "collection": "notes"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let chunks = body["documents"][0]["chunks"].as_u64().unwrap();
    assert!(chunks > 1, "a long text is several chunks: {body}");
    assert_eq!(body["documents"][0]["replaced"], false);

    let (status, doc) = app.get("/v1/rag/documents/ships?collection=notes").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["chunks"].as_array().unwrap().len() as u64, chunks);
    assert_eq!(doc["metadata"]["source"], "sea");

    // Ingesting the id again replaces every chunk of the old document.
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Ships sail between harbours."], "ids": ["ships"],
                   "metadata": [{"source": "sea", "revised": true}], "collection": "notes"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"][0]["replaced"], true);
    let (_, doc) = app.get("/v1/rag/documents/ships?collection=notes").await;
    assert_eq!(texts(&doc["chunks"]), ["Ships sail between harbours."]);
    assert_eq!(doc["metadata"]["revised"], true);
    let (status, list) = app.get("/v1/rag/documents?collection=notes").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");

    // Filters: only documents whose metadata matches.
    let (status, _, body) = app
        .post(
            "/v1/rag/search",
            json!({"query": "ships", "collection": "notes", "filter": {"source": "kitchen"},
                   "score_threshold": 0.0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        texts(&body["results"]),
        ["Bread needs flour, water, salt and yeast."]
    );
    let filter = urlencode(r#"{"source": ["sea", "lake"]}"#);
    let (_, list) = app
        .get(&format!(
            "/v1/rag/documents?collection=notes&filter={filter}"
        ))
        .await;
    assert_eq!(list["data"][0]["id"], "ships", "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // Paging: one document per page, then the next.
    let (_, first) = app.get("/v1/rag/documents?collection=notes&limit=1").await;
    let next = first["next_offset"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, second) = app
        .get(&format!(
            "/v1/rag/documents?collection=notes&limit=1&offset={next}"
        ))
        .await;
    assert_ne!(first["data"][0]["id"], second["data"][0]["id"]);

    // Deleting a document removes its chunks; deleting it again is a 404.
    let bread = "/v1/rag/documents/bread?collection=notes";
    let (status, body) = app.delete(bread).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.delete(bread).await;
    assert_eq!(status, 404, "{body}");
    error_of(&body);
    let (_, collections) = app.get("/v1/rag/collections").await;
    let notes = &collections["data"][0];
    assert_eq!(notes["name"], "notes");
    assert_eq!(notes["documents"], 1);
    assert_eq!(notes["chunks"], 1);
    assert_eq!(
        notes["bytes"].as_u64().is_some_and(|b| b > 0),
        on_disk,
        "{notes}"
    );
    assert_eq!(notes["dimension"], 384);
    let metrics = crate::common::GetText::oneshot_get(app.router(), "/metrics").await;
    assert!(
        metrics.contains(r#"llmservice_rag_collection{collection="notes",stat="documents"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"llmservice_rag_collection{collection="notes",stat="chunks"} 1"#));
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn collections_survive_restarts_and_remember_their_model() {
    let data = tempfile::tempdir().unwrap();
    restarts_and_models(&|extra| rag_app(data.path(), extra)).await;
    assert!(!data.path().join("rag/narrow.sqlite").exists());
    assert!(data.path().join("rag/default.sqlite").exists());
}

/// Starts a server on a test's store, with extra settings.
pub(crate) type OpenWith<'a> = dyn Fn(&[(&str, &str)]) -> TestApp + 'a;

/// A new server over the same store finds the same chunks; a collection
/// refuses another model's vectors; deleting one removes it. `open` starts
/// a server on the store with extra settings.
pub(crate) async fn restarts_and_models(open: &OpenWith<'_>) {
    let query = json!({"query": "container orchestration", "top_k": 3, "score_threshold": 0.0});
    let before = {
        let app = open(&[]);
        ingest_seed(&app).await;
        let (status, _, body) = app.post("/v1/rag/search", query.clone()).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    // A new server over the same data directory finds the same chunks.
    let app = open(&[]);
    let (status, _, after) = app.post("/v1/rag/search", query.clone()).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(texts(&after["results"]), texts(&before["results"]));

    // Narrower vectors are another model's as far as the collection goes.
    let narrow = open(&[("EMBEDDING_DIMENSION", "128")]);
    let (status, _, body) = narrow.post("/v1/rag/search", query.clone()).await;
    assert_eq!(status, 409, "{body}");
    let error = error_of(&body);
    assert_eq!(error["code"], "embedding_model_mismatch");
    assert!(error["message"].as_str().unwrap().contains("384"), "{body}");
    let (status, _, body) = narrow
        .post("/v1/rag/documents", json!({"texts": ["more"]}))
        .await;
    assert_eq!(status, 409, "{body}");
    // Another collection takes the narrower vectors.
    let (status, _, body) = narrow
        .post(
            "/v1/rag/documents",
            json!({"texts": ["more"], "collection": "narrow"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Deleting a collection removes it and its files.
    let (status, body) = narrow.delete("/v1/rag/collections/narrow").await;
    assert_eq!(status, 200, "{body}");
    let (_, collections) = narrow.get("/v1/rag/collections").await;
    let names: Vec<&str> = collections["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "{collections}");
}

#[tokio::test]
async fn retrieval_mistakes_are_clear_errors() {
    let data = tempfile::tempdir().unwrap();
    let app = rag_app(data.path(), &[]);
    ingest_seed(&app).await;
    let cases = [
        ("/v1/rag/documents", json!({"texts": []}), 400, "texts"),
        (
            "/v1/rag/documents",
            json!({"texts": ["a", " "]}),
            400,
            "texts",
        ),
        (
            "/v1/rag/documents",
            json!({"texts": ["a", "b"], "metadata": [{}]}),
            400,
            "metadata",
        ),
        (
            "/v1/rag/documents",
            json!({"texts": ["a", "b"], "ids": ["x", "x"]}),
            400,
            "ids",
        ),
        (
            "/v1/rag/documents",
            json!({"texts": ["a"], "ids": [""]}),
            400,
            "ids",
        ),
        (
            "/v1/rag/documents",
            json!({"texts": ["a"], "collection": "../etc"}),
            400,
            "collection",
        ),
        ("/v1/rag/documents", json!({"texts": "a"}), 400, "texts"),
        ("/v1/rag/search", json!({"query": ""}), 400, "query"),
        (
            "/v1/rag/search",
            json!({"query": "x", "mode": "fuzzy"}),
            400,
            "mode",
        ),
        (
            "/v1/rag/search",
            json!({"query": "x", "top_k": 0}),
            400,
            "top_k",
        ),
        (
            "/v1/rag/search",
            json!({"query": "x", "filter": {"a": {"b": 1}}}),
            400,
            "filter",
        ),
        (
            "/v1/rag/search",
            json!({"query": "x", "rerank": true}),
            400,
            "rerank",
        ),
        (
            "/v1/rag/search",
            json!({"query": "x", "collection": "nope"}),
            404,
            "collection",
        ),
        (
            "/v1/rag/chat",
            json!({"query": "x", "num_context_docs": 1000}),
            400,
            "num_context_docs",
        ),
        (
            "/v1/rag/chat",
            json!({"query": "x", "messages": [{"role": "system", "content": "y"}]}),
            400,
            "messages",
        ),
        (
            "/v1/rag/chat",
            json!({"query": "x", "model": "nope"}),
            404,
            "model",
        ),
    ];
    for (path, body, status, param) in cases {
        let (got, _, answer) = app.post(path, body.clone()).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {answer}");
        let error = error_of(&answer);
        if status == 400 {
            assert_eq!(error["param"], param, "{path} {body}: {answer}");
        }
    }
    for path in [
        "/v1/rag/documents?limit=0",
        "/v1/rag/documents?filter=notjson",
        "/v1/rag/documents?offset=garbage",
        "/v1/rag/documents?limit=-1",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        error_of(&body);
    }
    for path in [
        "/v1/rag/documents/missing",
        "/v1/rag/documents?collection=nope",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
}

#[tokio::test]
async fn a_reranker_rescores_the_candidates() {
    // The synthetic reranker's scores are deterministic but not relevance:
    // this checks the plumbing (scores as 0..1 relevance, best first).
    let data = tempfile::tempdir().unwrap();
    let reranker = shared_models()
        .join("SYNTHETIC-minilm-l6-reranker-f16.gguf")
        .display()
        .to_string();
    let app = rag_app(data.path(), &[("RERANKER_MODEL_PATH", reranker.as_str())]);
    ingest_seed(&app).await;
    let (status, _, body) = app
        .post(
            "/v1/rag/search",
            json!({"query": "containers", "top_k": 3, "score_threshold": 0.0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reranked"], true);
    let scores: Vec<f64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 3);
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    let (_, _, body) = app
        .post(
            "/v1/rag/search",
            json!({"query": "containers", "rerank": false, "score_threshold": 0.0}),
        )
        .await;
    assert_eq!(body["reranked"], false);

    // The reranker tier on another server (this one): the same order and
    // relevance, through its `/rerank`.
    let (_, _, here) = app
        .post(
            "/v1/rag/search",
            json!({"query": "containers", "top_k": 3, "score_threshold": 0.0}),
        )
        .await;
    let url = format!("{}/v1", app.spawn().await);
    let data = tempfile::tempdir().unwrap();
    let front = rag_app(
        data.path(),
        &[
            ("RERANKER_BACKEND", "openai"),
            ("RERANKER_BASE_URL", url.as_str()),
            // Asked for by this name, as `vllm serve` would know it.
            ("RERANKER_MODEL_PATH", "reranker"),
            ("RERANKER_API_KEY", crate::common::OPERATOR_KEY),
        ],
    );
    ingest_seed(&front).await;
    let (status, _, there) = front
        .post(
            "/v1/rag/search",
            json!({"query": "containers", "top_k": 3, "score_threshold": 0.0}),
        )
        .await;
    assert_eq!(status, 200, "{there}");
    assert_eq!(there["reranked"], true);
    let ranked = |body: &Value| -> Vec<(String, f64)> {
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["text"].as_str().unwrap().to_owned(),
                    r["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (here, there) = (ranked(&here), ranked(&there));
    assert_eq!(here.len(), there.len());
    for ((text, score), (their_text, their_score)) in here.iter().zip(&there) {
        assert_eq!(text, their_text, "{here:?} {there:?}");
        assert!((score - their_score).abs() < 1e-3, "{here:?} {there:?}");
    }
    // `/v1/rerank` on that tier answers in this API's shapes.
    let ask = json!({"model": "reranker", "query": "containers", "documents": SEED_DOCUMENTS});
    let (_, _, direct) = app.post("/v1/rerank", ask.clone()).await;
    let (status, _, proxied) = front.post("/v1/rerank", ask).await;
    assert_eq!(status, 200, "{proxied}");
    for (shape, field) in [("data", "score"), ("results", "relevance_score")] {
        let pairs = |body: &Value| -> Vec<(u64, f64)> {
            body[shape]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["index"].as_u64().unwrap(), r[field].as_f64().unwrap()))
                .collect()
        };
        let (direct, proxied) = (pairs(&direct), pairs(&proxied));
        assert_eq!(direct.len(), 3);
        assert_eq!(
            direct.iter().map(|p| p.0).collect::<Vec<_>>(),
            proxied.iter().map(|p| p.0).collect::<Vec<_>>()
        );
        for (d, p) in direct.iter().zip(&proxied) {
            assert!((d.1 - p.1).abs() < 1e-3, "{shape}: {direct:?} {proxied:?}");
        }
    }
}

#[tokio::test]
async fn chat_completions_answer_from_a_collection_with_rag() {
    let data = tempfile::tempdir().unwrap();
    let app = rag_app(data.path(), &[]);
    ingest_seed(&app).await;
    let request = json!({
        "model": "light", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is Docker?"}],
        "rag": {"top_k": 2, "score_threshold": 0.0},
    });
    let (status, _, whole) = app.post("/v1/chat/completions", request.clone()).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let sources = whole["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{whole}");
    assert!(sources[0]["text"].as_str().unwrap().contains("Docker"));
    // The prompt grew by the sources: more prompt tokens than without `rag`.
    let mut plain = request.clone();
    plain.as_object_mut().unwrap().remove("rag");
    let (_, _, without) = app.post("/v1/chat/completions", plain).await;
    assert!(without.get("sources").is_none());
    assert!(
        whole["usage"]["prompt_tokens"].as_u64() > without["usage"]["prompt_tokens"].as_u64(),
        "{whole} vs {without}"
    );
    // Streamed: the first chunk carries the sources, the text is the same.
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let (status, _, body) = app.post("/v1/chat/completions", streamed).await;
    assert_eq!(status, 200);
    let payloads = sse_payloads(body.as_str().unwrap());
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["sources"], whole["sources"]);
    assert!(chunks[1..].iter().all(|c| c.get("sources").is_none()));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Nothing to retrieve for: a clear 400.
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "messages": [{"role": "system", "content": "x"}], "rag": {}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "rag");
}

#[tokio::test]
async fn two_first_ingests_into_a_new_collection_both_keep_their_documents() {
    let data = tempfile::tempdir().unwrap();
    two_first_ingests(&|| rag_app(data.path(), &[])).await;
}

/// Two ingests that both create a collection; `open` starts a server on
/// the store.
pub(crate) async fn two_first_ingests(open: &dyn Fn() -> TestApp) {
    {
        let app = open();
        let first = app.post(
            "/v1/rag/documents",
            json!({"texts": ["Owls hunt at night."], "ids": ["owls"], "collection": "race"}),
        );
        let second = app.post(
            "/v1/rag/documents",
            json!({"texts": ["Larks sing at dawn."], "ids": ["larks"], "collection": "race"}),
        );
        let ((s1, _, b1), (s2, _, b2)) = tokio::join!(first, second);
        assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{b1} {b2}");
        let (_, list) = app.get("/v1/rag/documents?collection=race").await;
        assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    }
    // Both are stored: a new server finds them.
    let app = open();
    let (_, list) = app.get("/v1/rag/documents?collection=race").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    for path in [
        "/v1/rag/documents/owls?collection=../x",
        "/v1/rag/documents?collection=a.b",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_of(&body)["param"], "collection");
    }
}

#[tokio::test]
async fn bge_m3_heads_give_learned_sparse_weights_and_colbert_rescoring() {
    // The synthetic BGE-M3 heads on MiniLM: the sparse leg uses the model's
    // lexical weights instead of BM25, and hybrid results are rescored by
    // ColBERT MaxSim (plumbing: the heads are untrained).
    let heads = crate::embeddings::m3_model_dir();
    let model = heads.path().join("m3-minilm.gguf").display().to_string();
    let data = tempfile::tempdir().unwrap();
    m3_heads(&rag_app(
        data.path(),
        &[("EMBEDDING_MODEL_PATH", model.as_str())],
    ))
    .await;
}

/// Searches on a collection of the BGE-M3 heads' vectors.
pub(crate) async fn m3_heads(app: &TestApp) {
    ingest_seed(app).await;
    let (_, collections) = app.get("/v1/rag/collections").await;
    assert_eq!(collections["data"][0]["sparse"], "model", "{collections}");
    assert_eq!(collections["data"][0]["colbert"], true);
    for mode in ["sparse", "hybrid", "dense"] {
        let (status, _, body) = app
            .post(
                "/v1/rag/search",
                json!({"query": "Kubernetes orchestrates containers", "mode": mode,
                       "top_k": 3, "score_threshold": -1.0}),
            )
            .await;
        assert_eq!(status, 200, "{mode}: {body}");
        let results = body["results"].as_array().unwrap();
        assert!(!results.is_empty(), "{mode}: {body}");
        let scores: Vec<f64> = results
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "{mode}: {scores:?}"
        );
    }
    // The Kubernetes sentence shares the query's words: the learned weights find it.
    let (_, _, body) = app
        .post(
            "/v1/rag/search",
            json!({"query": "Kubernetes orchestrates containerized applications", "mode": "sparse", "top_k": 1}),
        )
        .await;
    assert!(
        body["results"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Kubernetes"),
        "{body}"
    );
}

#[tokio::test]
async fn an_embedding_tier_on_another_server_serves_retrieval() {
    let (upstream_data, front_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let upstream = rag_app(upstream_data.path(), &[]);
    let base_url = format!("{}/v1", upstream.spawn().await);
    let data = front_data.path().display().to_string();
    let front = TestApp::new(&[
        ("EMBEDDING_BACKEND", "openai"),
        ("EMBEDDING_BASE_URL", &base_url),
        ("EMBEDDING_UPSTREAM_MODEL", "embedding"),
        ("DATA_DIR", &data),
    ]);
    // Seed 003's requests as they are, every search mode (BM25 on words:
    // no tokenizer of the model is here), cited answers.
    seed_requests_as_sent(&front).await;

    // The dense side is the upstream's own vectors: the same similarity as
    // retrieval run on that server.
    ingest_seed(&upstream).await;
    let query = json!({"query": "What orchestrates containers?", "top_k": 1, "mode": "dense",
        "score_threshold": 0.0});
    let (_, _, here) = front.post("/v1/rag/search", query.clone()).await;
    let (_, _, there) = upstream.post("/v1/rag/search", query).await;
    assert_eq!(texts(&here["results"]), texts(&there["results"]));
    let similarity = |v: &Value| v["results"][0]["similarity"].as_f64().unwrap();
    assert!(
        (similarity(&here) - similarity(&there)).abs() < 1e-4,
        "{here} vs {there}"
    );
    let (_, collections) = front.get("/v1/rag/collections").await;
    let collection = &collections["data"][0];
    assert_eq!(collection["dimension"], 384, "{collections}");
    // Its vectors and terms are not those of the model run here: a
    // collection never mixes the two.
    assert!(
        collection["embedding_model"]
            .as_str()
            .is_some_and(|m| m.ends_with(" (upstream)")),
        "{collection}"
    );
}
