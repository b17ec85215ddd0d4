//! Every client mistake gets OpenAI's error shape and the right status; the
//! server stays up after a model fails to load.

use axum::body::Body;
use axum::http::Request;
use serde_json::json;

use crate::common::*;

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body =
        json!({"model": "light", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_field() {
    let app = TestApp::new(&[]);
    let cases = [
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"n": 4294967295u64}), "n"),
        (json!({"repeat_penalty": 0}), "repeat_penalty"),
        (json!({"repeat_last_n": -2}), "repeat_last_n"),
        (json!({"logit_bias": {"99999999": 5}}), "logit_bias"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content",
        ),
        (json!({"temperature": "hot"}), "temperature"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}),
            "tools[0].function.name",
        ),
    ];
    for (extra, param) in cases {
        let (status, _, body) = app.post("/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(status, 400, "{extra} -> {body}");
        let error = error_of(&body);
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], param, "{extra} -> {body}");
    }
}

#[tokio::test]
async fn malformed_json_and_wrong_content_type_are_400() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .send(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from("{\"model\": \"light\", \"messages\": ["))
                .unwrap(),
        )
        .await;
    assert_eq!(status, 400);
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("JSON"));

    let (status, _, body) = app
        .send(
            Request::post("/v1/completions")
                .header("content-type", "text/plain")
                .body(Body::from("hi"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, 400);
    error_of(&body);

    let (status, _, body) = app
        .post("/v1/chat/completions", json!({"messages": []}))
        .await;
    assert_eq!(status, 400, "missing model");
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("model"));
}

#[tokio::test]
async fn unknown_model_is_404_listing_what_exists() {
    let app = TestApp::new(&[]);
    let (status, _, body) = app
        .post("/v1/chat/completions", chat(json!({"model": "gpt-4o"})))
        .await;
    assert_eq!(status, 404);
    let error = error_of(&body);
    assert_eq!(error["code"], "model_not_found");
    assert!(error["message"].as_str().unwrap().contains(LIGHT_ID));
    let (status, body) = app.get("/v1/models/nope").await;
    assert_eq!(status, 404);
    error_of(&body);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let app = TestApp::new(&[("MAX_BODY_BYTES", "1000")]);
    let big = "x".repeat(5000);
    let (status, headers, body) = app
        .post(
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": big}]})),
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(error_of(&body)["code"], "request_too_large");
    // Read whole, it needs no more from the connection.
    assert!(headers.get("connection").is_none(), "{headers:?}");
    // Sent in pieces, as over a network, the rest of the body is never read,
    // so the connection cannot carry another request: the client is told so
    // instead of finding it closed.
    let pieces = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 500]));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {OPERATOR_KEY}"))
        .body(Body::from_stream(futures_util::stream::iter(pieces)))
        .unwrap();
    let (status, headers, _) = app.send(request).await;
    assert_eq!(status, 413);
    assert_eq!(headers["connection"], "close");
    // A refusal that read the whole body keeps the connection.
    let (status, headers, _) = app
        .post("/v1/chat/completions", chat(json!({"temperature": "hot"})))
        .await;
    assert_eq!(status, 400);
    assert!(headers.get("connection").is_none(), "{headers:?}");
}

#[tokio::test]
async fn context_overflow_is_400_with_the_numbers() {
    let app = TestApp::new(&[("LIGHT_N_CTX", "256")]);
    let long = "word ".repeat(400);
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": long}]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let error = error_of(&body);
    assert_eq!(error["code"], "context_length_exceeded");
    assert!(error["message"].as_str().unwrap().contains("256"));

    // A prompt that fits, with an explicit max_tokens that does not.
    let (status, _, body) = app
        .post("/v1/chat/completions", chat(json!({"max_tokens": 1000})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
}

#[tokio::test]
async fn loading_model_answers_503_when_the_client_will_not_wait() {
    let app = TestApp::new(&[]);
    let (status, headers, body) = app
        .send(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("x-wait-for-model", "false")
                .body(Body::from(chat(json!({})).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(error_of(&body)["code"], "model_loading");
    // The load it started completes; a waiting client is then served.
    let (status, _, body) = app.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_model_that_fails_to_load_leaves_the_server_up() {
    let app = TestApp::new(&[("MEDIUM_MODEL_PATH", "/nonexistent/model-7b.gguf")]);
    let (status, _, body) = app
        .post("/v1/chat/completions", chat(json!({"model": "medium"})))
        .await;
    assert_eq!(status, 500);
    assert_eq!(error_of(&body)["code"], "model_load_failed");
    // Clients learn that it failed, not where the server keeps its files.
    assert!(!body.to_string().contains("/nonexistent"), "{body}");
    let (status, models) = app.get("/v1/models").await;
    assert_eq!(status, 200);
    let medium = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "medium/model-7b")
        .unwrap()
        .clone();
    assert_eq!(medium["state"], "failed");
    let error = medium["error"].as_str().unwrap();
    assert!(
        error.contains("does not exist") && !error.contains("/nonexistent"),
        "{error}"
    );
    let (status, _, body) = app.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_model_without_chat_template_is_a_clear_400() {
    let app = TestApp::new(&[]);
    // The embedding model has no chat template and is not a chat model.
    std::fs::copy(
        shared_models().join("all-MiniLM-L6-v2-f16.gguf"),
        app.models_dir().join("minilm.gguf"),
    )
    .unwrap();
    let (status, _, body) = app
        .post("/v1/chat/completions", chat(json!({"model": "minilm"})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "model");
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_shape() {
    let app = TestApp::new(&[]);
    let (status, body) = app.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    error_of(&body);
    let (status, body) = app.get("/v1/chat/completions").await;
    assert_eq!(status, 405);
    error_of(&body);
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let args = llmservice::cli::ServeArgs {
        host: Some("127.0.0.1".into()),
        port: Some(port),
        ..Default::default()
    };
    let settings =
        llmservice::settings::Settings::resolve(&args, &[("HOME", "/nonexistent")]).unwrap();
    let error = llmservice::server::serve(settings).await.unwrap_err();
    assert!(
        error.contains(&format!("port {port}")) && error.contains("already in use"),
        "{error}"
    );
    assert!(
        error.contains("--port 0"),
        "the message says how to get a free port: {error}"
    );
}

#[tokio::test]
async fn regression_completions_errors_name_the_prompt_and_huge_batches_are_400() {
    let app = TestApp::new(&[
        ("LIGHT_N_CTX", "256"),
        ("LIGHT_PARALLEL", "2"),
        ("LIGHT_MAX_QUEUE", "2"),
    ]);
    let (status, _, body) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": "word ".repeat(400)}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "prompt");
    // More sequences than the model can ever queue: a client mistake, not "retry later".
    let prompts: Vec<String> = (0..5).map(|i| format!("Prompt {i}")).collect();
    let (status, _, body) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": prompts, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "prompt");
    // n far beyond anything is refused before anything is allocated for it.
    let (status, _, body) = app
        .post(
            "/v1/completions",
            json!({"model": "light", "prompt": "x", "n": 4294967295u64}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn connections_that_trickle_their_headers_are_closed_and_others_are_served() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmservice"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("HEADER_READ_TIMEOUT", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let health = || async {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.ok()?;
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.ok()?;
        answer.starts_with("HTTP/1.1 200").then_some(())
    };
    let started = std::time::Instant::now();
    while health().await.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 64 clients: half send a request line and then a header byte every 200 ms
    // without ever ending the headers; half connect and send nothing.
    let mut slow = Vec::new();
    for i in 0..64 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        slow.push(tokio::spawn(async move {
            let opened = std::time::Instant::now();
            if i % 2 == 0 {
                let _ = tcp
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ")
                    .await;
            }
            let mut byte = [0u8; 1];
            loop {
                if i % 2 == 0 && tcp.write_all(b"a").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut byte)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(_)) => {}
                    Err(_) if opened.elapsed() > Duration::from_secs(20) => break,
                    Err(_) => {}
                }
            }
            opened.elapsed()
        }));
    }
    // The server answers others meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered = std::time::Instant::now();
    assert!(health().await.is_some());
    assert!(answered.elapsed() < Duration::from_secs(1));
    for client in slow {
        let held = client.await.unwrap();
        assert!(
            held >= Duration::from_millis(1500) && held < Duration::from_secs(5),
            "a slow connection was held {held:?} (header timeout 2 s)"
        );
    }
}
