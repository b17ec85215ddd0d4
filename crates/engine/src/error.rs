use std::path::PathBuf;

/// Everything the engine can refuse or fail at. Callers map these onto their own
/// protocol (the HTTP layer maps every variant explicitly).
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    // The messages leave the paths out: they reach clients, and the server's
    // file layout is the operator's business (the load failure is logged with it).
    #[error("the model's file does not exist on the server")]
    ModelNotFound(PathBuf),
    #[error("the model failed to load: {reason}")]
    LoadFailed { path: PathBuf, reason: String },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error(
        "this model's maximum context length is {n_ctx} tokens, but the request needs \
         {requested} tokens ({prompt} in the prompt, {completion} for the completion)"
    )]
    ContextLengthExceeded {
        n_ctx: u32,
        requested: u32,
        prompt: u32,
        completion: u32,
    },
    #[error("token id {token} is outside the vocabulary (size {n_vocab})")]
    InvalidToken { token: TokenIdRepr, n_vocab: u32 },
    #[error("the model's queue is full ({capacity} requests waiting or running)")]
    QueueFull { capacity: usize },
    #[error("waited {waited_secs} s for a free sequence slot; the server is busy, retry later")]
    QueueTimeout { waited_secs: u64 },
    #[error("{requested} choices requested but this model decodes at most {parallel} sequences together")]
    TooManyChoices { requested: u32, parallel: u32 },
    #[error("input {index} has {tokens} tokens, more than this model's limit of {limit}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        limit: u32,
    },
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
    #[error("{0}")]
    Unsupported(String),
    /// A schema or grammar that cannot constrain this model's output.
    #[error("{0}")]
    InvalidGrammar(String),
    #[error("the engine has shut down")]
    ShutDown,
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Token ids appear in errors as plain integers.
pub type TokenIdRepr = i64;
