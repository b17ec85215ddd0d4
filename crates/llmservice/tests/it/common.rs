use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use llmservice::api::{router, AppState};
use llmservice::cli::ServeArgs;
use llmservice::settings::Settings;
use serde_json::Value;
use tower::ServiceExt;

pub fn shared_models() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models"
    ));
    assert!(
        dir.join("SmolLM2-135M-Instruct-Q4_1.gguf").is_file(),
        "the test models are missing: expected {} (shared/ beside the repository)",
        dir.display()
    );
    dir
}

pub fn smollm() -> String {
    shared_models()
        .join("SmolLM2-135M-Instruct-Q4_1.gguf")
        .display()
        .to_string()
}

/// The operator's key every test server has (`API_KEY`); `post` and `get`
/// send it, so operator routes work on them.
pub const OPERATOR_KEY: &str = "test-operator-key";

/// The model id the light tier gets for SmolLM2.
pub const LIGHT_ID: &str = "light/SmolLM2-135M-Instruct-Q4_1";

pub struct TestApp {
    pub state: AppState,
    pub _dir: tempfile::TempDir,
}

impl TestApp {
    /// A server whose light tier is SmolLM2, plus `extra` environment settings.
    pub fn new(extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let models_dir = dir.path().join("models");
        std::fs::create_dir_all(&models_dir).unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("LIGHT_MODEL_PATH".into(), smollm()),
            ("LIGHT_N_CTX".into(), "2048".into()),
            ("LIGHT_N_THREADS".into(), "2".into()),
            ("MODELS_DIR".into(), models_dir.display().to_string()),
            ("HOME".into(), dir.path().display().to_string()),
            // Engine tests must reach the engine; the cache tests turn it on.
            ("ENABLE_CACHE".into(), "false".into()),
            ("API_KEY".into(), OPERATOR_KEY.into()),
        ];
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            // An empty value unsets the default (`LIGHT_MODEL_PATH` for no tier).
            if !v.is_empty() {
                env.push((k.to_string(), v.to_string()));
            }
        }
        let settings = Arc::new(Settings::resolve(&ServeArgs::default(), &env).unwrap());
        Self {
            state: AppState::new(settings),
            _dir: dir,
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        self.state.settings.models_dir.clone()
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    pub async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = self.router().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, value)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, HeaderMap, Value) {
        self.send(
            Request::post(path)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {OPERATOR_KEY}"))
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let request = Request::get(path)
            .header("authorization", format!("Bearer {OPERATOR_KEY}"))
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let request = Request::delete(path)
            .header("authorization", format!("Bearer {OPERATOR_KEY}"))
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    /// Serves on a real loopback socket (port 0) for protocol details like SSE and disconnects.
    pub async fn spawn(&self) -> String {
        self.spawn_killable().await.0
    }

    /// [`TestApp::spawn`], with the server's task: aborting it closes the
    /// listener and every connection at once, as a killed process would.
    pub async fn spawn_killable(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = self.router();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}"), task)
    }
}

/// GET as text, for non-JSON endpoints.
pub trait GetText {
    async fn oneshot_get(self, path: &str) -> String;
}

impl GetText for Router {
    async fn oneshot_get(self, path: &str) -> String {
        let response = self
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}

/// Asserts OpenAI's error shape and returns the error object.
pub fn error_of(body: &Value) -> &serde_json::Map<String, Value> {
    let error = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("not an OpenAI error: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "error lacks {key}: {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

/// Parses an SSE body into its `data:` payloads.
/// An event-stream answer's JSON events, after checking its content type
/// and that it ends with `[DONE]`.
pub fn sse_events(headers: &HeaderMap, body: &Value) -> Vec<Value> {
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let payloads = sse_payloads(body.as_str().unwrap());
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

pub fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.trim()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_owned()
        })
        .collect()
}
