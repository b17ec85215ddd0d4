//! What retrieval needs from models, implemented by the server over its
//! engines: embeddings (dense, and sparse / ColBERT when the model has BGE-M3's
//! heads), token counts for chunk sizing, and reranker scores.

use std::future::Future;
use std::pin::Pin;

use crate::RagError;

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The embedding model behind an [`Encoder`].
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderInfo {
    /// The model's name as the server knows it; collections record it.
    pub model: String,
    /// Width of the dense vectors the encoder returns.
    pub dimension: usize,
    /// Whether the model has BGE-M3's sparse head.
    pub sparse_head: bool,
    /// Whether the model has BGE-M3's ColBERT head.
    pub colbert_head: bool,
    /// Most tokens one input may have.
    pub max_tokens: usize,
}

/// Which outputs to compute for each text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want {
    pub sparse: bool,
    pub colbert: bool,
}

/// One text's embeddings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    /// L2-normalized, [`EncoderInfo::dimension`] wide.
    pub dense: Vec<f32>,
    /// Lexical weights by token id (BGE-M3's sparse head).
    pub sparse: Option<Vec<(u32, f32)>>,
    /// One L2-normalized vector per token (BGE-M3's ColBERT head).
    pub colbert: Option<Vec<Vec<f32>>>,
}

pub trait Encoder: Send + Sync {
    fn info(&self) -> &EncoderInfo;
    /// The text's length in the model's tokens, special tokens excluded.
    fn count_tokens(&self, text: &str) -> usize;
    /// The text's token ids, special tokens excluded (BM25's terms on a
    /// Qdrant server).
    fn token_ids(&self, text: &str) -> Vec<u32>;
    /// Embeddings of every text, in order. Implementations batch them (one
    /// call may carry many chunks) and cut texts over the model's limit.
    fn encode<'a>(
        &'a self,
        texts: &'a [String],
        want: Want,
    ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>>;
}

pub trait Reranker: Send + Sync {
    /// The model that scores.
    fn model(&self) -> &str;
    /// A relevance score of each text for `query` (higher is more relevant;
    /// any scale: retrieval maps it through a logistic to 0..1).
    fn scores<'a>(
        &'a self,
        query: &'a str,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<f32>, RagError>>;
}
