use std::error::Error as StdError;

/// Why a retrieval operation failed. The server maps each variant to a status.
#[derive(Debug, thiserror::Error)]
pub enum RagError {
    /// A request field with a bad value (400).
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    /// No such collection or document (404).
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the collection: another embedding model or
    /// width than the one its vectors came from (409).
    #[error("{0}")]
    Conflict(String),
    /// The encoder or reranker failed; the server's own error, kept whole so
    /// it keeps its status.
    #[error("{0}")]
    Model(Box<dyn StdError + Send + Sync>),
    /// The store failed (500): the message is logged, not sent.
    #[error("vector store: {0}")]
    Store(String),
    /// The store cannot be reached (503): a Qdrant server that is down.
    #[error("vector store: {0}")]
    Unavailable(String),
    /// The store's disk is full (507); the write was rolled back whole.
    #[error("vector store: {0}")]
    Full(String),
}

impl RagError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param,
            message: message.into(),
        }
    }

    pub(crate) fn store(error: impl std::fmt::Display) -> Self {
        Self::Store(error.to_string())
    }
}
