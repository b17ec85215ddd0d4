//! Errors of the request-handling domain (`chat`, `generation`): a field the
//! client got wrong, something this server does not do, or what the engine
//! refused. `api::error` maps each to an HTTP status and OpenAI's error shape.

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A request field with a bad value, naming the field.
    #[error("{message}")]
    Invalid {
        param: String,
        message: String,
        code: &'static str,
    },
    /// A well-formed request for something this server does not do (yet).
    #[error("{message}")]
    Unsupported { param: String, message: String },
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// What an upstream server said or failed to say.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
}

impl RequestError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: param.to_owned(),
            message: message.into(),
            code: "invalid_value",
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::Unsupported {
            param: param.to_owned(),
            message: message.into(),
        }
    }

    /// The request field at fault, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } | Self::Unsupported { param, .. } => Some(param),
            Self::Engine(_) | Self::Upstream(_) => None,
        }
    }

    /// A more specific code than `invalid_value` for an invalid field.
    pub fn with_code(self, code: &'static str) -> Self {
        match self {
            Self::Invalid { param, message, .. } => Self::Invalid {
                param,
                message,
                code,
            },
            other => other,
        }
    }
}
