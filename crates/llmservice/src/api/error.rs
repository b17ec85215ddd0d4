//! The one mapping from every failure to OpenAI's error shape
//! `{"error":{"message","type","param","code"}}` and an HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::EngineError;
use serde_json::json;

use crate::error::RequestError;
use crate::hub::HubError;
use crate::models::ModelError;
use crate::upstream::UpstreamError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// A request field with a bad value (400), naming the field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// A well-formed request for something this server does not do (yet).
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            code: Some("unsupported_parameter"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// Something the request names is not there (404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// A part of the server the request needs is not available (503).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Names `param` as the field at fault for prompt-shaped errors (the engine
    /// says `messages`; legacy completions call it `prompt`).
    pub fn for_prompt_param(mut self, param: &str) -> Self {
        if self.param.as_deref() == Some("messages") {
            self.param = Some(param.to_owned());
        }
        self
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The message, naming the field at fault when it does not already (for
    /// error shapes that have no `param`).
    pub fn message_with_param(&self) -> String {
        match &self.param {
            Some(param) if !self.message.contains(param.as_str()) => {
                format!("{param}: {}", self.message)
            }
            _ => self.message.clone(),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        respond_with(&self, body)
    }
}

/// `error` as a response with `body`, its status and `Retry-After`; server
/// errors are logged.
fn respond_with(error: &ApiError, body: serde_json::Value) -> Response {
    if error.status.is_server_error() {
        tracing::warn!(status = %error.status, message = %error.message, "request failed");
    }
    let mut response = (error.status, axum::Json(body)).into_response();
    if let Some(secs) = error.retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::ModelNotFound(_) | EngineError::LoadFailed { .. } => Self {
                code: Some("model_load_failed"),
                ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            },
            EngineError::EmptyPrompt => Self::invalid("prompt", message),
            EngineError::ContextLengthExceeded { .. } => Self {
                param: Some("messages".to_owned()),
                code: Some("context_length_exceeded"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            EngineError::InvalidToken { .. } => Self::invalid("prompt", message),
            EngineError::QueueFull { .. } => Self {
                code: Some("queue_full"),
                retry_after_secs: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            EngineError::QueueTimeout { .. } => Self {
                code: Some("queue_timeout"),
                retry_after_secs: Some(5),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            EngineError::TooManyChoices { .. } => Self::invalid("n", message),
            EngineError::InputTooLong { .. } => Self {
                param: Some("input".to_owned()),
                code: Some("context_length_exceeded"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            EngineError::EmptyInput { .. } => Self::invalid("input", message),
            EngineError::Unsupported(_) => Self {
                code: Some("unsupported_parameter"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            // The caller names the field (response_format, grammar or tool_choice).
            EngineError::InvalidGrammar(_) => Self {
                code: Some("invalid_grammar"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            EngineError::ShutDown => Self {
                code: Some("shutting_down"),
                retry_after_secs: Some(5),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            EngineError::Inference(_) => Self::internal(message),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::NotFound { name, available } => Self {
                param: Some("model".to_owned()),
                code: Some("model_not_found"),
                ..Self::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "Model not found: {name}. Available models: {}",
                        if available.is_empty() {
                            "none (set LIGHT_MODEL_PATH or put .gguf files in MODELS_DIR)"
                                .to_owned()
                        } else {
                            available.join(", ")
                        }
                    ),
                )
            },
            ModelError::Loading(id) => Self {
                code: Some("model_loading"),
                retry_after_secs: Some(5),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!("model '{id}' is loading; retry shortly"),
                )
            },
            ModelError::InUse(id) => Self {
                code: Some("model_in_use"),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    format!("model '{id}' is serving requests; unload it when they finish"),
                )
            },
            ModelError::Load(e) => e.into(),
            ModelError::Upstream(id) => Self {
                param: Some("model".to_owned()),
                code: Some("upstream_model"),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!(
                        "model '{id}' is served by an upstream server ({{TIER}}_BACKEND=openai) \
                         and this route needs a model loaded here"
                    ),
                )
            },
        }
    }
}

/// An upstream's refusal keeps its status and its own error; its failure is
/// ours to report as a bad gateway; no replica at all is a 503.
/// An error code of OpenAI's API or of ours, as a static name.
fn known_code(code: &str) -> Option<&'static str> {
    const KNOWN: &[&str] = &[
        "context_length_exceeded",
        "invalid_api_key",
        "invalid_value",
        "invalid_grammar",
        "model_not_found",
        "model_loading",
        "model_load_failed",
        "queue_full",
        "queue_timeout",
        "rate_limit_exceeded",
        "insufficient_quota",
        "string_above_max_length",
        "unsupported_parameter",
        "unsupported_value",
    ];
    KNOWN.iter().copied().find(|k| *k == code)
}

impl From<UpstreamError> for ApiError {
    fn from(error: UpstreamError) -> Self {
        match error {
            UpstreamError::Refused {
                status,
                message,
                param,
                code,
                ..
            } => Self {
                param,
                // OpenAI's codes (and ours) keep their meaning for clients that
                // branch on them; any other is named in the message.
                code: code.map(|c| known_code(&c).unwrap_or("upstream_refused")),
                ..Self::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    "invalid_request_error",
                    message,
                )
            },
            UpstreamError::Failed(message) => Self {
                code: Some("upstream_failed"),
                ..Self::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!("the upstream failed: {message}"),
                )
            },
            UpstreamError::Unavailable(message) => Self {
                code: Some("upstream_unavailable"),
                retry_after_secs: Some(5),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!("no upstream replica is reachable ({message})"),
                )
            },
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Invalid {
                param,
                message,
                code,
            } => ApiError::invalid(&param, message).with_code(code),
            RequestError::Unsupported { param, message } => ApiError::unsupported(&param, message),
            RequestError::Engine(error) => error.into(),
            RequestError::Upstream(error) => error.into(),
        }
    }
}

impl From<rag::RagError> for ApiError {
    fn from(error: rag::RagError) -> Self {
        match error {
            rag::RagError::Invalid { param, message } => ApiError::invalid(param, message),
            rag::RagError::NotFound(message) => ApiError::not_found(message),
            rag::RagError::Conflict(message) => Self {
                code: Some("embedding_model_mismatch"),
                param: Some("collection".to_owned()),
                ..Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
            },
            rag::RagError::Model(error) => match error.downcast::<EngineError>() {
                Ok(engine) => (*engine).into(),
                Err(other) => match other.downcast::<UpstreamError>() {
                    Ok(upstream) => (*upstream).into(),
                    Err(other) => Self::internal(other.to_string()),
                },
            },
            rag::RagError::Store(message) => {
                tracing::error!(%message, "document store");
                Self::internal("the document store failed; the server log has the cause")
                    .with_code("store_failed")
            }
            rag::RagError::Unavailable(message) => {
                tracing::error!(%message, "document store");
                Self {
                    code: Some("store_unavailable"),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the document store (a Qdrant server) cannot be reached now; try again \
                         later (the server log has the cause)",
                    )
                }
            }
            rag::RagError::Full(message) => {
                tracing::error!(%message, "document store");
                Self {
                    code: Some("insufficient_storage"),
                    ..Self::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "server_error",
                        "the server's disk is full: what met it was not stored (a document is \
                         stored whole or not at all, and those after it in a request are not tried)",
                    )
                }
            }
        }
    }
}

/// Anthropic's error shape for the same failure:
/// `{"type": "error", "error": {"type", "message"}}`, its type from the status.
pub fn anthropic_body(error: &ApiError) -> serde_json::Value {
    let kind = match error.status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": error.message_with_param()}})
}

/// Ollama's error shape for the same failure: `{"error": "..."}`.
pub fn ollama_body(error: &ApiError) -> serde_json::Value {
    json!({ "error": error.message_with_param() })
}

/// An [`ApiError`] answered in Anthropic's shape (the Messages API's routes).
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl<E: Into<ApiError>> From<E> for AnthropicError {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        respond_with(&self.0, anthropic_body(&self.0))
    }
}

/// An [`ApiError`] answered in Ollama's shape (the `/api/...` routes).
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OllamaError {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        respond_with(&self.0, ollama_body(&self.0))
    }
}

/// A Hub download that cannot be done: the client's reference (400, 404),
/// the Hub's refusal (403), or the Hub out of reach (502).
impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        let message = error.to_string();
        let (status, code) = match &error {
            HubError::InvalidReference { .. } => (StatusCode::BAD_REQUEST, "invalid_value"),
            HubError::Ambiguous { .. } | HubError::NoGguf { .. } => {
                (StatusCode::BAD_REQUEST, "no_single_gguf")
            }
            HubError::RepoNotFound { .. } | HubError::FileNotFound { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            HubError::AccessDenied { .. } => (StatusCode::FORBIDDEN, "hub_access_denied"),
            HubError::Exists { .. } => (StatusCode::CONFLICT, "file_exists"),
            HubError::Http { .. } | HubError::Network { .. } | HubError::Transfer { .. } => {
                (StatusCode::BAD_GATEWAY, "hub_unavailable")
            }
            HubError::Checksum { .. } => (StatusCode::BAD_GATEWAY, "checksum_mismatch"),
            HubError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
            HubError::Cancelled => (StatusCode::CONFLICT, "cancelled"),
        };
        ApiError {
            status,
            code: Some(code),
            param: matches!(error, HubError::InvalidReference { .. }).then(|| "model".to_owned()),
            ..ApiError::bad_request(message)
        }
    }
}
