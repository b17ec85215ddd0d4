//! Model downloads against a local server in the Hugging Face Hub's URL
//! layout (the Hub itself is not reachable from tests): the listing API, the
//! `resolve` redirect with `X-Linked-Etag` / `X-Linked-Size`, a separate
//! storage host answering `Range`, gated repositories, and faults (a
//! connection dropped mid-file, corrupted bytes, a slow transfer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use llmservice::hub::{Hub, HubError, HubSettings, ModelRef, Progress};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const GATED_TOKEN: &str = "hf_test_token";

struct RepoFixture {
    files: Vec<(String, Arc<Vec<u8>>)>,
    gated: bool,
}

#[derive(Default)]
struct Faults {
    /// The next this-many storage GETs stop after `drop_after` bytes.
    drops_left: AtomicUsize,
    drop_after: AtomicUsize,
    /// Storage serves the bytes with one flipped.
    corrupt: AtomicBool,
    /// Storage pauses this many microseconds before each 64 KiB.
    pause_us: AtomicU64,
}

pub struct FakeHub {
    repos: HashMap<String, RepoFixture>,
    blobs: HashMap<String, Arc<Vec<u8>>>,
    faults: Faults,
    /// `Range` headers of storage GETs, in order ("" for none).
    ranges: Mutex<Vec<String>>,
    /// Whether the token ever reached the storage host.
    storage_saw_token: AtomicBool,
    storage: Mutex<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A repository to serve: its name, its files (path, bytes), and whether it is gated.
type RepoSpec<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, bool);

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl FakeHub {
    /// Serves `repos` ("owner/name" → [(path, bytes)], gated); answers the
    /// Hub's base URL.
    async fn start(repos: Vec<RepoSpec<'_>>) -> (Arc<FakeHub>, String) {
        let mut fixtures = HashMap::new();
        let mut blobs = HashMap::new();
        for (name, files, gated) in repos {
            let files: Vec<(String, Arc<Vec<u8>>)> = files
                .into_iter()
                .map(|(p, b)| (p.to_owned(), Arc::new(b)))
                .collect();
            for (_, bytes) in &files {
                blobs.insert(sha256_hex(bytes), bytes.clone());
            }
            fixtures.insert(name.to_owned(), RepoFixture { files, gated });
        }
        let hub = Arc::new(FakeHub {
            repos: fixtures,
            blobs,
            faults: Faults::default(),
            ranges: Mutex::new(Vec::new()),
            storage_saw_token: AtomicBool::new(false),
            storage: Mutex::new(String::new()),
        });
        // The storage host is another origin, as the Hub's CDN is.
        let storage = Router::new()
            .route("/blobs/{sha}", get(blob))
            .with_state(hub.clone());
        let storage_url = serve(storage).await;
        *hub.storage.lock().unwrap() = storage_url;
        let api = Router::new()
            .route("/api/models/{owner}/{name}/revision/{rev}", get(listing))
            .route(
                "/{owner}/{name}/resolve/{rev}/{*file}",
                get(resolve).head(resolve),
            )
            .with_state(hub.clone());
        let url = serve(api).await;
        (hub, url)
    }

    fn ranges(&self) -> Vec<String> {
        self.ranges.lock().unwrap().clone()
    }
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

fn hub_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-error-code", code.to_owned()),
            ("x-error-message", message.to_owned()),
        ],
        Body::from(json!({ "error": message }).to_string()),
    )
        .into_response()
}

async fn listing(
    State(hub): State<Arc<FakeHub>>,
    Path((owner, name, _rev)): Path<(String, String, String)>,
) -> Response {
    let Some(repo) = hub.repos.get(&format!("{owner}/{name}")) else {
        return hub_error(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Repository not found",
        );
    };
    let siblings: Vec<Value> = repo
        .files
        .iter()
        .map(|(path, bytes)| {
            json!({"rfilename": path, "size": bytes.len(), "blobId": "x",
                   "lfs": {"sha256": sha256_hex(bytes), "size": bytes.len(), "pointerSize": 134}})
        })
        .collect();
    axum::Json(json!({"id": format!("{owner}/{name}"), "sha": COMMIT,
                      "gated": if repo.gated { json!("manual") } else { json!(false) },
                      "siblings": siblings}))
    .into_response()
}

async fn resolve(
    State(hub): State<Arc<FakeHub>>,
    Path((owner, name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo_id = format!("{owner}/{name}");
    let Some(repo) = hub.repos.get(&repo_id) else {
        return hub_error(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Repository not found",
        );
    };
    if repo.gated {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {GATED_TOKEN}")) {
            let message = format!("Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.");
            return hub_error(StatusCode::UNAUTHORIZED, "GatedRepo", &message);
        }
    }
    let Some((_, bytes)) = repo.files.iter().find(|(p, _)| *p == file) else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    let sha = sha256_hex(bytes);
    let location = format!("{}/blobs/{sha}", hub.storage.lock().unwrap());
    (
        StatusCode::FOUND,
        [
            ("location", location),
            ("x-linked-etag", format!("\"{sha}\"")),
            ("x-linked-size", bytes.len().to_string()),
            ("x-repo-commit", COMMIT.to_owned()),
            ("etag", "\"gitblob\"".to_owned()),
        ],
    )
        .into_response()
}

async fn blob(
    State(hub): State<Arc<FakeHub>>,
    Path(sha): Path<String>,
    request: Request<Body>,
) -> Response {
    if request.headers().contains_key("authorization") {
        hub.storage_saw_token.store(true, Ordering::SeqCst);
    }
    let Some(bytes) = hub.blobs.get(&sha) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range = request
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    hub.ranges.lock().unwrap().push(range.clone());
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if start >= bytes.len() && start > 0 {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let mut body = bytes[start..].to_vec();
    if hub.faults.corrupt.load(Ordering::SeqCst) && !body.is_empty() {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let len = body.len();
    let drop = hub
        .faults
        .drops_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let drop_after = drop.then(|| hub.faults.drop_after.load(Ordering::SeqCst));
    let pause = Duration::from_micros(hub.faults.pause_us.load(Ordering::SeqCst));
    let chunks: Vec<Vec<u8>> = body.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let stream = async_stream::stream! {
        let mut sent = 0;
        for chunk in chunks {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if let Some(limit) = drop_after {
                if sent + chunk.len() > limit {
                    yield Ok(axum::body::Bytes::from(chunk[..limit - sent].to_vec()));
                    yield Err(std::io::Error::other("connection dropped by the test"));
                    return;
                }
            }
            sent += chunk.len();
            yield Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk));
        }
    };
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert("content-length", len.into());
    headers.insert("accept-ranges", "bytes".parse().unwrap());
    if start > 0 {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let total = bytes.len();
        response.headers_mut().insert(
            "content-range",
            format!("bytes {start}-{}/{total}", total - 1)
                .parse()
                .unwrap(),
        );
    }
    response
}

/// Bytes that look like nothing in particular.
fn noise(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// `n` storage requests: the first from the start, each later one from
/// further on (what the ones before it delivered).
fn assert_resumed(ranges: &[String], n: usize) {
    assert_eq!(ranges.len(), n, "{ranges:?}");
    assert_eq!(ranges[0], "", "{ranges:?}");
    let offsets: Vec<u64> = ranges[1..]
        .iter()
        .map(|r| {
            r.strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a resumption: {ranges:?}"))
        })
        .collect();
    assert!(
        offsets[0] > 0 && offsets.windows(2).all(|w| w[0] < w[1]),
        "{ranges:?}"
    );
}

fn hub_client(url: &str, token: Option<&str>) -> Hub {
    Hub::new(HubSettings {
        endpoint: url.to_owned(),
        token: token.map(str::to_owned),
    })
    .unwrap()
}

async fn pull_into(
    hub: &Hub,
    reference: &str,
    dir: &std::path::Path,
) -> (Result<llmservice::hub::Pulled, HubError>, Vec<Progress>) {
    let reference = ModelRef::parse(reference).unwrap();
    let mut seen = Vec::new();
    let result = match hub.plan(&reference).await {
        Ok((listing, files)) => {
            hub.pull(
                &listing,
                &files,
                dir,
                &mut |p| seen.push(p),
                &CancellationToken::new(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    (result, seen)
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_range_and_the_file_is_verified() {
    let bytes = noise(3 << 20, 7);
    let (hub, url) = FakeHub::start(vec![(
        "acme/tiny-GGUF",
        vec![
            ("tiny-Q4_K_M.gguf", bytes.clone()),
            ("README.md", b"# tiny".to_vec()),
        ],
        false,
    )])
    .await;
    hub.faults.drops_left.store(2, Ordering::SeqCst);
    hub.faults.drop_after.store(1 << 20, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (pulled, progress) = pull_into(&hub_client(&url, None), "acme/tiny-GGUF", dir.path()).await;
    let pulled = pulled.unwrap();
    assert_eq!(pulled.model_name(), "tiny-Q4_K_M");
    assert_eq!(std::fs::read(&pulled.paths[0]).unwrap(), bytes);
    // First request whole, then each resumed where the last one stopped.
    assert_resumed(&hub.ranges(), 3);
    assert!(progress.windows(2).all(|w| w[0].done <= w[1].done));
    assert_eq!(progress.last().unwrap().done, 3 << 20);
    assert_eq!(progress.last().unwrap().total, Some(3 << 20));
    assert_eq!(dir_names(dir.path()), ["tiny-Q4_K_M.gguf"]);
    // Pulling again finds it there and fetches nothing.
    let (again, _) = pull_into(&hub_client(&url, None), "acme/tiny-GGUF", dir.path()).await;
    assert_eq!(again.unwrap().downloaded, 0);
    assert_eq!(hub.ranges().len(), 3);
}

#[tokio::test]
async fn a_corrupted_download_is_removed_with_a_clear_error() {
    let (hub, url) = FakeHub::start(vec![(
        "acme/tiny-GGUF",
        vec![("tiny.gguf", noise(300_000, 1))],
        false,
    )])
    .await;
    hub.faults.corrupt.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (pulled, _) = pull_into(&hub_client(&url, None), "acme/tiny-GGUF", dir.path()).await;
    let error = pulled.unwrap_err();
    assert!(matches!(error, HubError::Checksum { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("SHA-256") && message.contains("removed"),
        "{message}"
    );
    assert!(
        dir_names(dir.path()).is_empty(),
        "{:?}",
        dir_names(dir.path())
    );
}

#[tokio::test]
async fn gated_repositories_need_a_token_that_never_leaves_the_hub() {
    let (hub, url) = FakeHub::start(vec![(
        "meta/gated-GGUF",
        vec![("gated.gguf", noise(200_000, 3))],
        true,
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (pulled, _) = pull_into(&hub_client(&url, None), "meta/gated-GGUF", dir.path()).await;
    let message = pulled.unwrap_err().to_string();
    assert!(
        message.contains("HF_TOKEN") && message.contains("restricted"),
        "{message}"
    );
    let (pulled, _) = pull_into(
        &hub_client(&url, Some("hf_wrong")),
        "meta/gated-GGUF",
        dir.path(),
    )
    .await;
    assert!(
        matches!(pulled, Err(HubError::AccessDenied { .. })),
        "{pulled:?}"
    );
    assert!(dir_names(dir.path()).is_empty());
    let (pulled, _) = pull_into(
        &hub_client(&url, Some(GATED_TOKEN)),
        "meta/gated-GGUF",
        dir.path(),
    )
    .await;
    assert_eq!(pulled.unwrap().paths.len(), 1);
    assert!(
        !hub.storage_saw_token.load(Ordering::SeqCst),
        "the token was sent to the storage host"
    );
    // Unknown repositories and files say which.
    let (pulled, _) = pull_into(&hub_client(&url, None), "meta/nothing", dir.path()).await;
    assert!(
        matches!(pulled, Err(HubError::RepoNotFound { .. })),
        "{pulled:?}"
    );
    let (pulled, _) = pull_into(
        &hub_client(&url, None),
        "meta/gated-GGUF/other.gguf",
        dir.path(),
    )
    .await;
    assert!(
        matches!(pulled, Err(HubError::FileNotFound { .. })),
        "{pulled:?}"
    );
}

#[tokio::test]
async fn an_unreachable_hub_is_a_clear_error() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let (pulled, _) = pull_into(&hub_client(&url, None), "acme/x", dir.path()).await;
    let error = pulled.unwrap_err();
    assert!(matches!(error, HubError::Network { .. }), "{error:?}");
    assert!(error.to_string().contains(&url), "{error}");
}

/// Watches a download's events until it ends; answers every state seen.
async fn follow(base: &str, id: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!("{base}/admin/api/downloads/{id}/events"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut states = Vec::new();
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), body.next())
        .await
        .expect("download events stalled")
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.trim().strip_prefix("data: ") {
                states.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    states
}

#[tokio::test]
async fn the_dashboard_downloads_a_real_model_that_is_servable_at_once() {
    let smol = std::fs::read(smollm()).unwrap();
    let (hub, url) = FakeHub::start(vec![(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        vec![
            ("smollm2-135m-instruct-q4_1.gguf", smol.clone()),
            ("smollm2-135m-instruct-q8_0.gguf", noise(1000, 9)),
            ("README.md", b"# SmolLM2".to_vec()),
        ],
        false,
    )])
    .await;
    hub.faults.pause_us.store(1000, Ordering::SeqCst);
    hub.faults.drops_left.store(1, Ordering::SeqCst);
    hub.faults.drop_after.store(5 << 20, Ordering::SeqCst);
    // No tier: the directory is where downloads land and are served from.
    let app = TestApp::new(&[("HF_ENDPOINT", url.as_str()), ("LIGHT_MODEL_PATH", "")]);
    let repo = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    // Two GGUF models and no Q4_K_M: the answer lists the choices.
    let (status, _, body) = app
        .post("/admin/api/downloads", json!({"model": repo}))
        .await;
    assert_eq!(status, 400, "{body}");
    let message = error_of(&body)["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("q4_1") && message.contains("q8_0"),
        "{message}"
    );
    let base = app.spawn().await;
    let (status, _, started) = app
        .post(
            "/admin/api/downloads",
            json!({"model": repo, "quant": "Q4_1"}),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["files"], json!(["smollm2-135m-instruct-q4_1.gguf"]));
    let id = started["id"].as_str().unwrap();
    let states = follow(&base, id).await;
    let last = states.last().unwrap();
    assert_eq!(last["status"], "done", "{last}");
    assert_eq!(last["model"], "smollm2-135m-instruct-q4_1");
    assert_eq!(last["done_bytes"], smol.len());
    let progress: Vec<u64> = states
        .iter()
        .map(|s| s["done_bytes"].as_u64().unwrap())
        .collect();
    assert!(progress.len() >= 5, "too few progress events: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_resumed(&hub.ranges(), 2);
    // Listed, and servable by its name with no restart.
    let (_, list) = app.get("/admin/api/downloads").await;
    assert_eq!(list["data"][0]["status"], "done");
    let (status, _, answer) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "smollm2-135m-instruct-q4_1", "max_tokens": 4, "temperature": 0,
                   "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // And it is the default model, there being no tier.
    let (status, _, answer) = app
        .post(
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_cancelled_download_stops_and_leaves_nothing_behind() {
    let (hub, url) = FakeHub::start(vec![(
        "acme/big-GGUF",
        vec![("big.gguf", noise(40 << 20, 5))],
        true,
    )])
    .await;
    hub.faults.pause_us.store(20_000, Ordering::SeqCst);
    let app = TestApp::new(&[("HF_ENDPOINT", url.as_str()), ("HF_TOKEN", GATED_TOKEN)]);
    let (status, _, started) = app
        .post("/admin/api/downloads", json!({"model": "acme/big-GGUF"}))
        .await;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    // Starting the same download again answers the running one.
    let (_, _, again) = app
        .post("/admin/api/downloads", json!({"model": "acme/big-GGUF"}))
        .await;
    assert_eq!(again["id"], id.as_str());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, during) = app.get(&format!("/admin/api/downloads/{id}")).await;
    assert!(during["done_bytes"].as_u64().unwrap() > 0, "{during}");
    let (status, cancelled) = app.delete(&format!("/admin/api/downloads/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(cancelled["status"], "cancelled");
    assert!(
        dir_names(&app.models_dir()).is_empty(),
        "{:?}",
        dir_names(&app.models_dir())
    );
    let (status, _, body) = app
        .post("/admin/api/downloads", json!({"model": "../etc/passwd"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "model");
    let (status, _) = app.get("/admin/api/downloads/dl-nothing").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_gated_repository_is_refused_before_the_download_starts() {
    let (hub, url) = FakeHub::start(vec![(
        "meta/gated-GGUF",
        vec![("gated.gguf", noise(1000, 3))],
        true,
    )])
    .await;
    let app = TestApp::new(&[("HF_ENDPOINT", url.as_str())]);
    // The listing is public; the file is not, and the dashboard hears so at once.
    let (status, _, body) = app
        .post("/admin/api/downloads", json!({"model": "meta/gated-GGUF"}))
        .await;
    assert_eq!(status, 403, "{body}");
    let error = error_of(&body);
    assert_eq!(error["code"], "hub_access_denied");
    assert!(
        error["message"].as_str().unwrap().contains("HF_TOKEN"),
        "{body}"
    );
    assert!(hub.ranges().is_empty());
    let (_, list) = app.get("/admin/api/downloads").await;
    assert_eq!(list["data"], json!([]));
}

/// `llmservice pull` as a user runs it: killed mid-download, run again, it
/// resumes from what the first run kept.
#[tokio::test]
async fn the_pull_command_resumes_after_being_killed() {
    let bytes = noise(30 << 20, 11);
    let (hub, url) = FakeHub::start(vec![(
        "acme/slow-GGUF",
        vec![("slow-Q4_K_M.gguf", bytes.clone())],
        false,
    )])
    .await;
    hub.faults.pause_us.store(20_000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let run = || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmservice"));
        command
            .args(["pull", "acme/slow-GGUF", "--models-dir"])
            .arg(&models)
            .env("HF_ENDPOINT", &url)
            .env("HOME", dir.path())
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut first = run().spawn().unwrap();
    let part = models.join(".slow-Q4_K_M.gguf.part");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < (2 << 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().await.unwrap();
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < bytes.len() as u64);
    hub.faults.pause_us.store(0, Ordering::SeqCst);
    let output = run().output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("\"model\": \"slow-Q4_K_M\""), "{stdout}");
    assert_eq!(
        std::fs::read(models.join("slow-Q4_K_M.gguf")).unwrap(),
        bytes
    );
    let ranges = hub.ranges();
    let resumed_at: u64 = ranges[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the second run did not resume: {ranges:?}"));
    assert!(
        resumed_at >= kept.min(2 << 20),
        "resumed at {resumed_at}, kept {kept}"
    );
    assert_eq!(dir_names(&models), ["slow-Q4_K_M.gguf"]);
    // A name that is not a model reference is refused before any request.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmservice"))
        .args(["pull", "../../etc/passwd", "--models-dir"])
        .arg(&models)
        .env("HF_ENDPOINT", &url)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a model reference"));
}

/// Seed 003's `MODEL_REPO_ID` + `MODEL_FILENAME`: the server fetches the
/// model before it listens, serves it as the default, and a second start
/// finds it there.
#[tokio::test]
async fn model_repo_id_is_fetched_before_the_server_listens() {
    let smol = std::fs::read(smollm()).unwrap();
    let (hub, url) = FakeHub::start(vec![(
        "TheBloke/Smol-Chat-GGUF",
        vec![("smol-chat.Q4_K_M.gguf", smol)],
        false,
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmservice"));
        command
            .args(["serve", "--port", "0"])
            .current_dir(dir.path())
            .env_clear()
            .env("HOME", dir.path())
            .env("MODELS_DIR", dir.path().join("models"))
            .env("HF_ENDPOINT", &url)
            .env("MODEL_REPO_ID", "TheBloke/Smol-Chat-GGUF")
            .env("MODEL_FILENAME", "smol-chat.Q4_K_M.gguf")
            .env("API_KEY", OPERATOR_KEY)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        command.spawn().unwrap()
    };
    let port_file = dir.path().join(".port");
    let wait_for_port = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                return port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut first = start();
    let port = wait_for_port().await;
    // It listens only once the file is whole and checked.
    assert_eq!(
        dir_names(&dir.path().join("models")),
        ["smol-chat.Q4_K_M.gguf"]
    );
    let client = reqwest::Client::new();
    let answer: Value = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&json!({"model": "default", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    first.kill().await.unwrap();
    let _ = std::fs::remove_file(&port_file);
    let mut second = start();
    wait_for_port().await;
    second.kill().await.unwrap();
    assert_eq!(hub.ranges().len(), 1, "the second start downloaded again");
}
