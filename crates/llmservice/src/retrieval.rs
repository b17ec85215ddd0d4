//! Retrieval's models: the embedding model as a [`rag::Encoder`] (on our
//! engine its inputs share the embedding worker's batches with
//! `/v1/embeddings` traffic) and the reranker as a [`rag::Reranker`], each
//! served here or by the upstream of a tier served elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engine::{EmbedOutputs, Engine, EngineError};
use rag::{BoxFuture, Encoded, Encoder, EncoderInfo, RagError, Reranker, Want};

use crate::settings::RagSettings;
use crate::upstream::UpstreamError;

pub struct EngineEncoder {
    engine: Arc<Engine>,
    info: EncoderInfo,
    /// Tokens embedded so far (usage).
    tokens: AtomicU64,
}

impl EngineEncoder {
    /// The encoder for `engine`, whose model the registry calls `model_id`,
    /// with dense vectors cut to `dimension` when that is narrower (Matryoshka
    /// models, `EMBEDDING_DIMENSION`).
    pub fn new(engine: Arc<Engine>, model_id: &str, dimension: Option<usize>) -> Self {
        let model = engine.info();
        let n_embd = model.n_embd as usize;
        let width = dimension.map_or(n_embd, |d| d.min(n_embd));
        let info = EncoderInfo {
            model: model_id.to_owned(),
            dimension: width,
            sparse_head: model.has_sparse_head,
            colbert_head: model.has_colbert_head,
            max_tokens: model.max_input_tokens as usize,
        };
        Self {
            engine,
            info,
            tokens: AtomicU64::new(0),
        }
    }
}

/// The embedding model retrieval uses: here, or on an upstream.
pub enum ModelEncoder {
    Engine(EngineEncoder),
    Upstream(UpstreamEncoder),
}

impl ModelEncoder {
    fn inner(&self) -> &dyn Encoder {
        match self {
            Self::Engine(encoder) => encoder,
            Self::Upstream(encoder) => encoder,
        }
    }

    /// Tokens embedded through this encoder.
    pub fn tokens(&self) -> u64 {
        match self {
            Self::Engine(encoder) => &encoder.tokens,
            Self::Upstream(encoder) => &encoder.tokens,
        }
        .load(Ordering::Relaxed)
    }

    /// Chunks of `RAG_CHUNK_TOKENS` (default 256), within the model's input
    /// limit after its special tokens.
    pub fn chunk_size(&self, settings: &RagSettings) -> Result<rag::chunk::ChunkSize, RagError> {
        let room = self.info().max_tokens.saturating_sub(2);
        let tokens = settings.chunk_tokens.unwrap_or(256).min(room);
        rag::chunk::ChunkSize::new(tokens, settings.chunk_overlap.min(tokens / 4))
    }
}

impl Encoder for ModelEncoder {
    fn info(&self) -> &EncoderInfo {
        self.inner().info()
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.inner().count_tokens(text)
    }

    fn token_ids(&self, text: &str) -> Vec<u32> {
        self.inner().token_ids(text)
    }

    fn encode<'a>(
        &'a self,
        texts: &'a [String],
        want: Want,
    ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>> {
        self.inner().encode(texts, want)
    }
}

fn model_error(error: EngineError) -> RagError {
    RagError::Model(Box::new(error))
}

/// One batch through an encoder model: `inputs` tokenizes off the async
/// threads, the engine computes `outputs`, and `tokens` counts what it read.
async fn run(
    engine: &Arc<Engine>,
    tokens: &AtomicU64,
    inputs: impl FnOnce(&Engine) -> Vec<Vec<engine::TokenId>> + Send + 'static,
    outputs: EmbedOutputs,
) -> Result<Vec<engine::Embedding>, RagError> {
    let tokenizer = engine.clone();
    let inputs = tokio::task::spawn_blocking(move || inputs(&tokenizer))
        .await
        .map_err(|e| RagError::Store(format!("tokenization failed: {e}")))?;
    let results = engine
        .embed(inputs, outputs)
        .map_err(model_error)?
        .wait()
        .await
        .map_err(model_error)?;
    let read: u64 = results.iter().map(|r| u64::from(r.n_tokens)).sum();
    tokens.fetch_add(read, Ordering::Relaxed);
    Ok(results)
}

impl Encoder for EngineEncoder {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.engine.tokenize(text, false, false).len()
    }

    fn token_ids(&self, text: &str) -> Vec<u32> {
        self.engine
            .tokenize(text, false, false)
            .into_iter()
            .filter_map(|t| u32::try_from(t).ok())
            .collect()
    }

    fn encode<'a>(
        &'a self,
        texts: &'a [String],
        want: Want,
    ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>> {
        Box::pin(async move {
            let owned = texts.to_vec();
            let inputs = move |engine: &Engine| {
                owned
                    .iter()
                    .map(|text| {
                        let mut tokens = engine.tokenize_input(text);
                        engine.truncate_input(&mut tokens);
                        tokens
                    })
                    .collect()
            };
            let outputs = EmbedOutputs {
                dense: true,
                sparse: want.sparse,
                colbert: want.colbert,
            };
            let results = run(&self.engine, &self.tokens, inputs, outputs).await?;
            Ok(results
                .into_iter()
                .map(|r| Encoded {
                    dense: narrowed(r.dense.unwrap_or_default(), self.info.dimension),
                    sparse: r.sparse.map(|weights| {
                        weights
                            .into_iter()
                            .map(|(id, w)| (id.max(0) as u32, w))
                            .collect()
                    }),
                    colbert: r.colbert,
                })
                .collect())
        })
    }
}

/// The first `width` values, L2-normalized again when cut.
fn narrowed(mut vector: Vec<f32>, width: usize) -> Vec<f32> {
    if vector.len() > width {
        vector.truncate(width);
        engine::normalize(&mut vector);
    }
    vector
}

pub struct EngineReranker {
    engine: Arc<Engine>,
    model: String,
    tokens: AtomicU64,
}

impl EngineReranker {
    pub fn new(engine: Arc<Engine>, model_id: &str) -> Self {
        Self {
            engine,
            model: model_id.to_owned(),
            tokens: AtomicU64::new(0),
        }
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
}

impl Reranker for EngineReranker {
    fn model(&self) -> &str {
        &self.model
    }

    fn scores<'a>(
        &'a self,
        query: &'a str,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<f32>, RagError>> {
        Box::pin(async move {
            let (query, owned) = (query.to_owned(), texts.to_vec());
            let pairs = move |engine: &Engine| {
                let query = engine.tokenize(&query, false, false);
                owned
                    .iter()
                    .map(|text| {
                        let document = engine.tokenize(text, false, false);
                        let mut pair = engine.rerank_pair(&query, &document);
                        engine.truncate_input(&mut pair);
                        pair
                    })
                    .collect()
            };
            let outputs = EmbedOutputs {
                dense: true,
                ..Default::default()
            };
            let results = run(&self.engine, &self.tokens, pairs, outputs).await?;
            Ok(results
                .iter()
                .map(|r| {
                    r.dense
                        .as_ref()
                        .and_then(|s| s.first())
                        .copied()
                        .unwrap_or(f32::NEG_INFINITY)
                })
                .collect())
        })
    }
}

/// Inputs per `/embeddings` call to an upstream (Text Embeddings Inference
/// takes 32 by default; vLLM and OpenAI more).
const UPSTREAM_BATCH: usize = 32;

/// The input limit assumed for an upstream's embedding model, which no
/// OpenAI-shaped API reports: BERT-style encoders' 512.
const UPSTREAM_MAX_TOKENS: usize = 512;

/// An embedding tier served by another server, through its `/embeddings`.
/// No tokenizer of its model is here, so chunks are sized by an estimate (a
/// token for every three bytes, more than English or most other scripts
/// take, so chunks stay within the model's limit) and BM25 weighs words
/// (lowercased, with stable ids) instead of the model's tokens.
pub struct UpstreamEncoder {
    upstream: Arc<crate::upstream::Upstream>,
    /// The name to ask for (the upstream's own wins, see `model_for`).
    requested: String,
    /// The width of the upstream's vectors, before any cut to `dimension`.
    width: usize,
    info: EncoderInfo,
    tokens: AtomicU64,
}

impl UpstreamEncoder {
    /// The encoder for `upstream`'s model, which the registry calls
    /// `model_id`; its width is asked of the upstream once (one embedding)
    /// and cut to `dimension` when that is narrower. Collections record it as
    /// `{model_id} (upstream)`: its vectors and its BM25 terms are not those
    /// of the same model run here, so the two never share a collection.
    pub async fn new(
        upstream: Arc<crate::upstream::Upstream>,
        model_id: &str,
        requested: &str,
        dimension: Option<usize>,
    ) -> Result<Self, RagError> {
        let width = upstream
            .embedding_width(requested)
            .await
            .map_err(upstream_error)?;
        let info = EncoderInfo {
            model: format!("{model_id} (upstream)"),
            dimension: dimension.map_or(width, |d| d.min(width)),
            sparse_head: false,
            colbert_head: false,
            max_tokens: UPSTREAM_MAX_TOKENS,
        };
        Ok(Self {
            upstream,
            requested: requested.to_owned(),
            width,
            info,
            tokens: AtomicU64::new(0),
        })
    }
}

/// The words of `text`, lowercased: runs of letters and digits.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// A word's id: FNV-1a of its bytes. Stored sparse vectors hold these ids,
/// so they must not change between builds, which std's hashers do not
/// promise; FNV-1a is five lines.
fn word_id(word: &str) -> u32 {
    word.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

impl Encoder for UpstreamEncoder {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn count_tokens(&self, text: &str) -> usize {
        text.len().div_ceil(3)
    }

    fn token_ids(&self, text: &str) -> Vec<u32> {
        words(text).map(|w| word_id(&w)).collect()
    }

    fn encode<'a>(
        &'a self,
        texts: &'a [String],
        _want: Want,
    ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(texts.len());
            for batch in texts.chunks(UPSTREAM_BATCH) {
                let (vectors, tokens) = self
                    .upstream
                    .embed(&self.requested, batch)
                    .await
                    .map_err(upstream_error)?;
                self.tokens.fetch_add(tokens, Ordering::Relaxed);
                for mut dense in vectors {
                    // Another model behind the same upstream: its vectors
                    // would be cut or padded into nonsense.
                    if dense.len() != self.width {
                        return Err(upstream_error(UpstreamError::Failed(format!(
                            "the upstream's embeddings are {} wide, not {} as when first asked",
                            dense.len(),
                            self.width
                        ))));
                    }
                    engine::normalize(&mut dense);
                    out.push(Encoded {
                        dense: narrowed(dense, self.info.dimension),
                        ..Default::default()
                    });
                }
            }
            Ok(out)
        })
    }
}

/// An upstream's failure in a call the server made itself: a refusal is the
/// upstream's (a wrong key, an unknown model, an input it finds too long),
/// not the client's, so it is a 502 that quotes it rather than its status.
fn upstream_error(error: UpstreamError) -> RagError {
    let error = match error {
        UpstreamError::Refused {
            status, message, ..
        } => UpstreamError::Failed(format!("it refused with {status}: {message}")),
        other => other,
    };
    RagError::Model(Box::new(error))
}

/// A reranker tier served by another server, through its `/rerank`.
pub struct UpstreamReranker {
    upstream: Arc<crate::upstream::Upstream>,
    model: String,
}

impl UpstreamReranker {
    /// Asks `upstream` for `model` (its `{TIER}_UPSTREAM_MODEL` wins).
    pub fn new(upstream: Arc<crate::upstream::Upstream>, model: &str) -> Self {
        Self {
            upstream,
            model: model.to_owned(),
        }
    }
}

impl Reranker for UpstreamReranker {
    fn model(&self) -> &str {
        &self.model
    }

    fn scores<'a>(
        &'a self,
        query: &'a str,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<f32>, RagError>> {
        Box::pin(async move {
            self.upstream
                .rerank(&self.model, query, texts)
                .await
                .map_err(upstream_error)
        })
    }
}

/// Every collection with its counts, for metrics and the dashboard; gives up
/// after a few seconds (a Qdrant server that does not answer must not stall
/// them).
pub async fn collection_stats(
    library: &rag::Library,
) -> Result<Vec<(rag::CollectionMeta, rag::CollectionStats)>, String> {
    match tokio::time::timeout(std::time::Duration::from_secs(3), library.collections()).await {
        Ok(Ok(all)) => Ok(all),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("{} did not answer within 3 s", library.location())),
    }
}
