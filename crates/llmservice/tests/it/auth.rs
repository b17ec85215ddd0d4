//! Who may call what: keys beyond loopback and on loopback, operator
//! routes, named keys and their use, each API's 401 shape, CORS preflight,
//! and `"model": "default"`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

/// `method path` with `key` sent as a bearer token (or `x-api-key`).
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = match key.strip_prefix("x:") {
            Some(key) => request.header("x-api-key", key),
            None => request.header("authorization", format!("Bearer {key}")),
        };
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    app.send(request.body(body).unwrap()).await
}

fn chat() -> Value {
    json!({"model": "light", "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "user", "content": "Hi"}]})
}

#[tokio::test]
async fn beyond_loopback_the_api_needs_a_key_in_each_apis_shape() {
    let app = TestApp::new(&[("HOST", "0.0.0.0")]);
    for open in ["/health", "/openapi.json", "/redoc"] {
        let (status, _, _) = call(&app, Method::GET, open, None, None).await;
        assert_eq!(status, 200, "{open}");
    }
    let (status, headers, body) = call(&app, Method::GET, "/v1/models", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"llmservice\"");
    assert_eq!(error_of(&body)["code"], "missing_api_key");
    let (status, _, _) = call(&app, Method::GET, "/internal/cache/stats", None, None).await;
    assert_eq!(status, 401);
    let (status, _, body) = call(&app, Method::GET, "/v1/models", Some("not-needed"), None).await;
    assert_eq!(status, 401);
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    for key in [OPERATOR_KEY.to_owned(), format!("x:{OPERATOR_KEY}")] {
        let (status, _, _) = call(&app, Method::GET, "/v1/models", Some(&key), None).await;
        assert_eq!(status, 200, "{key}");
    }
    // Anthropic's and Ollama's routes answer in their own shapes.
    let (status, _, body) = call(&app, Method::POST, "/v1/messages", None, Some(json!({}))).await;
    assert_eq!(status, 401);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    let (status, _, body) = call(&app, Method::GET, "/api/tags", None, None).await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().is_some(), "{body}");
    // Unknown routes say nothing before the key is checked.
    let (status, _, _) = call(&app, Method::GET, "/v1/nothing", None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn on_loopback_the_api_is_open_but_operator_routes_are_not() {
    let app = TestApp::new(&[]);
    for key in [None, Some("not-needed")] {
        // Seed 001 reads the cache's counters with no key.
        for path in ["/v1/models", "/internal/cache/stats"] {
            let (status, _, _) = call(&app, Method::GET, path, key, None).await;
            assert_eq!(status, 200, "{path} {key:?}");
        }
    }
    for (method, path) in [
        (Method::POST, "/v1/models/light/unload"),
        (Method::GET, "/admin/api/keys"),
    ] {
        let (status, _, body) = call(&app, method.clone(), path, None, Some(json!({}))).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _, body) = call(&app, method, path, Some(OPERATOR_KEY), Some(json!({}))).await;
        assert!(status.is_success(), "{path}: {body}");
    }
    let required = TestApp::new(&[("REQUIRE_API_KEY", "true")]);
    let (status, _, _) = call(&required, Method::GET, "/v1/models", None, None).await;
    assert_eq!(status, 401, "REQUIRE_API_KEY keys loopback too");
}

#[tokio::test]
async fn named_keys_work_count_their_use_and_stop_when_revoked() {
    let app = TestApp::new(&[("HOST", "0.0.0.0")]);
    let (status, _, body) = call(
        &app,
        Method::POST,
        "/admin/api/keys",
        None,
        Some(json!({"name": "ci"})),
    )
    .await;
    assert_eq!(
        status, 401,
        "creating keys needs the operator's key: {body}"
    );
    let (status, _, created) = app.post("/admin/api/keys", json!({"name": "ci"})).await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    let (status, _, _) = app.post("/admin/api/keys", json!({"name": " "})).await;
    assert_eq!(status, 400);

    let (status, _, answer) = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(key),
        Some(chat()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let used = answer["usage"]["total_tokens"].as_u64().unwrap();
    // A named key is not an operator key.
    let (status, _, body) = call(&app, Method::GET, "/admin/api/keys", Some(key), None).await;
    assert_eq!(status, 403);
    assert_eq!(error_of(&body)["code"], "operator_key_required");

    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = app.get("/admin/api/keys").await.1;
        if listed["data"][0]["tokens"].as_u64() == Some(used) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let entry = &listed["data"][0];
    assert_eq!(entry["id"], id);
    assert_eq!(entry["name"], "ci");
    assert_eq!(entry["tokens"], used, "{listed}");
    assert_eq!(
        entry["requests"], 1,
        "refused requests do not count: {listed}"
    );
    assert!(entry.get("key").is_none(), "the secret is never listed");

    let (status, _, _) = call(
        &app,
        Method::DELETE,
        &format!("/admin/api/keys/{id}"),
        Some(OPERATOR_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(key),
        Some(chat()),
    )
    .await;
    assert_eq!(status, 401, "a revoked key stops at once");
    let (status, _, _) = call(
        &app,
        Method::DELETE,
        &format!("/admin/api/keys/{id}"),
        Some(OPERATOR_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn preflight_requests_pass_and_origins_can_be_limited() {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let any = TestApp::new(&[("HOST", "0.0.0.0")]);
    let (status, headers, _) = any.send(preflight("http://app.example")).await;
    assert!(status.is_success(), "{status}");
    // Any origin is allowed by naming it back (the console's routes are not).
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let limited = TestApp::new(&[("CORS_ALLOW_ORIGINS", "http://app.example")]);
    let (_, headers, _) = limited.send(preflight("http://app.example")).await;
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let (_, headers, _) = limited.send(preflight("http://evil.example")).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn model_default_is_the_default_chat_tier() {
    let app = TestApp::new(&[]);
    let mut request = chat();
    request["model"] = json!("default");
    let (status, _, answer) = app.post("/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["model"], "default",
        "answers name the model as asked"
    );
    let (_, loaded) = app.get("/v1/models").await;
    let light = loaded["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == LIGHT_ID);
    assert_eq!(
        light.unwrap()["state"],
        "loaded",
        "default loaded the light tier"
    );
}

/// Every operation in the OpenAPI document, called from beyond loopback:
/// without a key a 401, with a named (non-operator) key a 403 on the
/// operator's routes and never a 401 or 403 elsewhere. New routes are
/// covered as soon as they are documented.
#[tokio::test]
async fn every_documented_route_checks_its_key() {
    let app = TestApp::new(&[("HOST", "0.0.0.0")]);
    let (_, _, created) = app.post("/admin/api/keys", json!({"name": "user"})).await;
    let user_key = created["key"].as_str().unwrap().to_owned();
    let (status, _, doc) = call(&app, Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let mut checked = 0;
    for (template, operations) in doc["paths"].as_object().unwrap() {
        let path: String = template
            .split('/')
            .map(|part| if part.starts_with('{') { "x" } else { part })
            .collect::<Vec<_>>()
            .join("/");
        for method in operations.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = (method != Method::GET).then(|| json!({}));
            let open = ["/health", "/openapi.json"].contains(&path.as_str());
            let operator = path.starts_with("/admin")
                || (path.starts_with("/internal") && path != "/internal/cache/stats")
                || (method == Method::POST && path.starts_with("/v1/models/"));
            let (status, _, answer) = call(&app, method.clone(), &path, None, body.clone()).await;
            if open {
                assert!(status.is_success(), "{method} {path}: {status} {answer}");
                continue;
            }
            assert_eq!(status, 401, "{method} {path} without a key: {answer}");
            let (status, _, answer) =
                call(&app, method.clone(), &path, Some(&user_key), body).await;
            if operator {
                assert_eq!(status, 403, "{method} {path} with a user's key: {answer}");
            } else {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} with a user's key: {status} {answer}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} operations documented");
}
