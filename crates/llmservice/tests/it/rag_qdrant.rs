//! Retrieval with collections on a Qdrant server (`QDRANT_URL`): the same
//! scenarios as the embedded store's tests, plus what only a server brings
//! (an API key, another application's collections, a server that is down).
//!
//! No Qdrant server runs here, so the server is `tests/compat/qdrant_standin.py`:
//! Qdrant's REST routes, each body checked by qdrant-client's models of
//! Qdrant's schema and carried out by qdrant-client's local mode. It runs on
//! the compatibility suite's Python (`.venv`, which `scripts/test.sh` makes).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{error_of, TestApp};
use crate::rag::{
    ids_and_filters, m3_heads, rag_app, restarts_and_models, seed_requests_as_sent,
    two_first_ingests,
};

const API_KEY: &str = "qdrant-test-key";

/// The stand-in Qdrant server, stopped when dropped.
struct Qdrant {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    /// The data directories of the servers started on it.
    data: std::sync::Mutex<Vec<tempfile::TempDir>>,
}

impl Qdrant {
    fn start() -> Self {
        Self::announcing(None)
    }

    /// A stand-in that answers `GET /` with `version` instead of its own.
    fn announcing(version: Option<&str>) -> Self {
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let python = root.join(".venv/bin/python");
        assert!(
            python.is_file(),
            "the Qdrant tests run tests/compat/qdrant_standin.py on {}: make it with \
             `python3 -m venv .venv && .venv/bin/pip install -r tests/compat/requirements.txt` \
             (scripts/test.sh does)",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut child = Command::new(python)
            .arg(root.join("tests/compat/qdrant_standin.py"))
            .arg("--path")
            .arg(dir.path().join("data"))
            .arg("--port-file")
            .arg(&port_file)
            .args(["--api-key", API_KEY])
            .args(version.map(|v| ["--version", v]).into_iter().flatten())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                if let Ok(port) = text.trim().parse::<u16>() {
                    break port;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the Qdrant stand-in exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the Qdrant stand-in did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            data: std::sync::Mutex::default(),
        }
    }

    /// A server whose collections are on this Qdrant, with `extra` settings.
    fn app(&self, extra: &[(&str, &str)]) -> TestApp {
        let data = tempfile::tempdir().unwrap();
        let mut env = vec![
            ("QDRANT_URL", self.url.as_str()),
            ("QDRANT_API_KEY", API_KEY),
        ];
        env.extend_from_slice(extra);
        let app = rag_app(data.path(), &env);
        self.data.lock().unwrap().push(data);
        app
    }

    /// A raw call to the Qdrant server, as another application would make it.
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .header("api-key", API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Qdrant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn seed_requests_on_a_qdrant_server() {
    let qdrant = Qdrant::start();
    seed_requests_as_sent(&qdrant.app(&[])).await;
}

#[tokio::test]
async fn ids_and_filters_on_a_qdrant_server() {
    let qdrant = Qdrant::start();
    ids_and_filters(&qdrant.app(&[]), false).await;
}

#[tokio::test]
async fn restarts_and_models_on_a_qdrant_server() {
    let qdrant = Qdrant::start();
    restarts_and_models(&|extra| qdrant.app(extra)).await;
    two_first_ingests(&|| qdrant.app(&[])).await;
}

#[tokio::test]
async fn bge_m3_heads_on_a_qdrant_server() {
    let heads = crate::embeddings::m3_model_dir();
    let model = heads.path().join("m3-minilm.gguf").display().to_string();
    let qdrant = Qdrant::start();
    m3_heads(&qdrant.app(&[("EMBEDDING_MODEL_PATH", model.as_str())])).await;
}

#[tokio::test]
async fn a_qdrant_server_shared_with_others_down_or_refusing_the_key() {
    let qdrant = Qdrant::start();
    // Another application's collection on the same server: not listed, not
    // written into, not deleted.
    let (status, body) = qdrant
        .call(
            reqwest::Method::PUT,
            "/collections/theirs",
            json!({"vectors": {"size": 4, "distance": "Dot"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let app = qdrant.app(&[]);
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Owls hunt at night."], "collection": "theirs"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        error_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("not made by llmservice"),
        "{body}"
    );
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Owls hunt at night."], "ids": ["owls"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, collections) = app.get("/v1/rag/collections").await;
    assert_eq!(
        collections["data"].as_array().unwrap().len(),
        1,
        "{collections}"
    );
    assert_eq!(collections["data"][0]["name"], "default");
    assert_eq!(collections["data"][0]["bytes"], Value::Null);
    let (status, body) = app.delete("/v1/rag/collections/theirs").await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = qdrant
        .call(reqwest::Method::GET, "/collections/theirs", Value::Null)
        .await;
    assert_eq!(status, 200, "still there: {body}");

    // A server too old to keep collection metadata, or one that is not
    // Qdrant: refused before anything is written.
    let old = Qdrant::announcing(Some("1.15.4"));
    let (status, _, body) = old
        .app(&[])
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Owls hunt at night."]}),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    let (status, body) = old
        .call(reqwest::Method::GET, "/collections", Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["collections"], json!([]), "nothing was made");
    let data = tempfile::tempdir().unwrap();
    let not_qdrant = rag_app(data.path(), &[("QDRANT_URL", "http://127.0.0.1:9/")]);
    let (status, _, body) = not_qdrant
        .post("/v1/rag/search", json!({"query": "owls"}))
        .await;
    assert_eq!(status, 503, "nothing listens on port 9: {body}");

    // A wrong key: the request fails as the server's fault, and says why in the log.
    let data = tempfile::tempdir().unwrap();
    let wrong = rag_app(
        data.path(),
        &[
            ("QDRANT_URL", qdrant.url.as_str()),
            ("QDRANT_API_KEY", "wrong"),
        ],
    );
    let (status, _, body) = wrong.post("/v1/rag/search", json!({"query": "owls"})).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(error_of(&body)["code"], "store_failed");

    // The server gone: 503 for retrieval, while chat goes on and the
    // metrics still render.
    let url = qdrant.url.clone();
    drop(qdrant);
    let (status, _, body) = app.post("/v1/rag/search", json!({"query": "owls"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body)["code"], "store_unavailable");
    assert!(
        !error_of(&body)["message"].as_str().unwrap().contains(&url),
        "the message keeps the server's address to the log: {body}"
    );
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let metrics = crate::common::GetText::oneshot_get(app.router(), "/metrics").await;
    assert!(metrics.contains("llmservice_"), "{metrics}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn long_documents_and_two_writers_of_one_id_on_a_qdrant_server() {
    let qdrant = Qdrant::start();
    let app = qdrant.app(&[("RAG_CHUNK_TOKENS", "16"), ("RAG_CHUNK_OVERLAP", "0")]);
    let chunks_of = |body: &Value| body["documents"][0]["chunks"].as_u64().unwrap();
    // More chunks than one upsert takes: written in several, read back whole.
    let long: String = (0..320)
        .map(|i| format!("Entry {i} of the harbour log lists ships and tides. "))
        .collect();
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": [long], "ids": ["log"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let total = chunks_of(&body);
    assert!(total > 256, "{body}");
    let (_, document) = app.get("/v1/rag/documents/log").await;
    let numbers: Vec<u64> = document["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["chunk"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..total).collect::<Vec<_>>());

    // Written again, shorter: only the new version is left.
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["Ships sail at dawn."], "ids": ["log"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"][0]["replaced"], true);
    let (_, collections) = app.get("/v1/rag/collections").await;
    assert_eq!(collections["data"][0]["chunks"], 1, "{collections}");

    // Two writers of one id at once: one whole version stays, listed once.
    let texts = [
        "Owls hunt at night. They fly without a sound. Mice hide from them.",
        "Larks sing at dawn.",
    ];
    let write = |text: &str| {
        app.post(
            "/v1/rag/documents",
            json!({"texts": [text], "ids": ["bird"]}),
        )
    };
    let ((s1, _, b1), (s2, _, b2)) = tokio::join!(write(texts[0]), write(texts[1]));
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{b1} {b2}");
    let (_, list) = app.get("/v1/rag/documents").await;
    let birds: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["id"] == "bird")
        .collect();
    assert_eq!(birds.len(), 1, "{list}");
    let (_, bird) = app.get("/v1/rag/documents/bird").await;
    let chunks: Vec<&str> = bird["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert!(
        texts.iter().any(|t| chunks.iter().all(|c| t.contains(c))),
        "one writer's chunks only: {bird}"
    );
    assert_eq!(birds[0]["chunks"], bird["chunks"].as_array().unwrap().len());
    let (_, collections) = app.get("/v1/rag/collections").await;
    assert_eq!(
        collections["data"][0]["chunks"],
        1 + birds[0]["chunks"].as_u64().unwrap(),
        "{collections}"
    );
}
