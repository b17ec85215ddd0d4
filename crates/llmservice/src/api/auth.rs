//! Who may call which route. Three families: open routes (`/health`, the
//! OpenAPI document and its two UIs), the API (`/v1`, Ollama's `/api`, the
//! tokenizer, embeddings, rerank, metrics, the cache's counters), which
//! needs a key when the server listens beyond loopback or
//! `REQUIRE_API_KEY=true`, and the operator's routes (`/admin`, the rest of
//! `/internal`, model load / unload), which always do, and only the
//! operator's keys open them (a named key gets 403). A key comes as
//! `Authorization: Bearer <key>` or `x-api-key`. Where no key is needed,
//! whatever a client sends is ignored (the seeds' clients send
//! `api_key="not-needed"`), except that a named key still counts its use.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{AnthropicError, ApiError, OllamaError};
use crate::keys::Caller;
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    Api,
    Operator,
}

fn access(method: &Method, path: &str) -> Access {
    match path {
        "/health" | "/openapi.json" | "/redoc" => Access::Open,
        _ if path == "/docs" || path.starts_with("/docs/") => Access::Open,
        // The dashboard's page and scripts hold no data; what they show
        // comes from `/admin/api`, with the key the operator types in.
        "/admin" | "/admin/" => Access::Open,
        _ if path.starts_with("/admin/assets/") => Access::Open,
        // Seed 001 reads the cache's counters as a client would, with no key
        // on loopback: they are numbers, as `/metrics` is.
        "/internal/cache/stats" if method == Method::GET => Access::Api,
        _ if path.starts_with("/admin") || path.starts_with("/internal/") => Access::Operator,
        // `POST /v1/models/{id}/load` and `/unload`.
        _ if path.starts_with("/v1/models/") && method == Method::POST => Access::Operator,
        _ => Access::Api,
    }
}

/// Whether a request is for one of the operator's routes (which browsers
/// may not call from other origins). A preflight asks on behalf of a POST
/// (the only method that makes `/v1/models/{id}/...` an operator route).
pub fn is_operator_route(method: &Method, path: &str) -> bool {
    let method = if method == Method::OPTIONS {
        &Method::POST
    } else {
        method
    };
    access(method, path) == Access::Operator
}

/// Whether browsers on other origins are refused: the operator's routes, and
/// the cache's counters (open to local clients, but they name the cache's
/// file and Redis host, which no web page should read).
pub fn same_origin_only(method: &Method, path: &str) -> bool {
    is_operator_route(method, path) || path.starts_with("/internal/")
}

/// Whether a request on `path` counts in the dashboard's analytics: the API
/// routes clients call, not the operator's, the open ones, or scrapes.
pub fn counts_in_analytics(method: &Method, path: &str) -> bool {
    access(method, path) == Access::Api && path != "/metrics" && !path.starts_with("/internal/")
}

/// The key a request carries, if any.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .filter(|key| !key.is_empty())
}

/// Lets a request through when its route's family allows its key (or lack
/// of one), recording who made it for the handlers ([`Caller`]).
pub async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let access = access(request.method(), path);
    let needs_key = match access {
        Access::Open => false,
        Access::Api => state.keys.api_needs_key(),
        Access::Operator => true,
    };
    let presented = presented_key(request.headers());
    let caller = presented.and_then(|key| state.keys.check(key));
    let caller = match (caller, needs_key) {
        (Some(Caller::Named(_)), _) if access == Access::Operator => return forbidden(),
        (Some(caller), _) => caller,
        (None, false) => Caller::Anonymous,
        (None, true) => return unauthorized(path, presented.is_some()),
    };
    if let Caller::Named(_) = caller {
        record(&state, caller.clone(), 1, 0);
    }
    if let Some(ledger) = crate::analytics::Ledger::current() {
        ledger.note_key(match &caller {
            Caller::Anonymous => "anonymous",
            Caller::Operator => "operator",
            Caller::Named(id) => id,
        });
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Counts a named key's request or tokens, off the async threads.
pub fn record(state: &AppState, caller: Caller, requests: u64, tokens: u64) {
    if !matches!(caller, Caller::Named(_)) {
        return;
    }
    let keys = state.keys.clone();
    tokio::task::spawn_blocking(move || {
        keys.record(&caller, requests, tokens, chrono::Utc::now().timestamp())
    });
}

/// 401 in the error shape of the API the route belongs to, with
/// `WWW-Authenticate`.
fn unauthorized(path: &str, wrong: bool) -> Response {
    let error = ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: Some(if wrong {
            "invalid_api_key"
        } else {
            "missing_api_key"
        }),
        ..ApiError::bad_request(if wrong {
            "Incorrect API key provided."
        } else {
            "This route needs an API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`."
        })
    };
    let mut response = if path.starts_with("/v1/messages") {
        AnthropicError(error).into_response()
    } else if path.starts_with("/api/") {
        OllamaError(error).into_response()
    } else {
        error.into_response()
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"llmservice\""),
    );
    response
}

/// 403: a named key on an operator route (operator routes are `/admin` and
/// `/internal`, whose errors are OpenAI-shaped, and model load / unload).
fn forbidden() -> Response {
    ApiError {
        status: StatusCode::FORBIDDEN,
        code: Some("operator_key_required"),
        ..ApiError::bad_request("this route needs the operator's key (API_KEY), not a named key")
    }
    .into_response()
}

/// Who made the request, as [`authorize`] found it.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_fall_into_families() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(access(&get, "/health"), Access::Open);
        assert_eq!(access(&get, "/docs/index.html"), Access::Open);
        assert_eq!(access(&get, "/docsx"), Access::Api);
        assert_eq!(access(&get, "/v1/models/light"), Access::Api);
        assert_eq!(access(&post, "/v1/models/light/load"), Access::Operator);
        assert_eq!(access(&get, "/internal/cache/stats"), Access::Api);
        assert_eq!(access(&get, "/internal/other"), Access::Operator);
        assert_eq!(access(&get, "/admin/api/keys"), Access::Operator);
        assert_eq!(access(&get, "/admin"), Access::Open);
        assert_eq!(access(&get, "/admin/assets/app.js"), Access::Open);
        assert_eq!(access(&get, "/admin/api/assets/x"), Access::Operator);
        assert_eq!(access(&get, "/adminx"), Access::Operator);
        assert_eq!(access(&post, "/api/chat"), Access::Api);
    }

    #[test]
    fn keys_come_as_bearer_or_x_api_key() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_key(&headers), None);
        headers.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&headers), Some("k2"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  k1 "),
        );
        assert_eq!(presented_key(&headers), Some("k1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&headers), Some("k2"));
    }
}
