//! The embedding and reranking worker: one thread per encoder model that packs
//! the inputs of every waiting request into shared batches (one decode for many
//! sequences, at most `n_batch` tokens), then pools, applies BGE-M3's heads or
//! reads the classifier's scores.
//!
//! The context runs without pooling (per-token hidden states) for embedding
//! models, so one decode yields the pooled vector the GGUF asks for *and* the
//! rows BGE-M3's sparse and ColBERT heads need; rerankers run llama.cpp's RANK
//! pooling, which applies the classification head in the graph.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::{BatchAddError, LlamaBatch};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{DecodeError, EmbeddingsError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::heads::M3Heads;
use crate::scheduler::SchedulerStats;
use crate::{EngineError, TokenId};

/// How token rows become one vector (llama.cpp's `pooling_type` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Last,
    /// A classifier head's scores (rerankers), computed by llama.cpp.
    Rank,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

/// Which outputs a request wants for each input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmbedOutputs {
    pub dense: bool,
    pub sparse: bool,
    pub colbert: bool,
}

/// What one input produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Embedding {
    /// Embedding models: the pooled, L2-normalized vector. Rerankers: the
    /// classifier's raw scores (`n_cls_out` values, never normalized).
    pub dense: Option<Vec<f32>>,
    /// BGE-M3 lexical weights: `(token id, weight)`, positive weights only, the
    /// largest per id, special tokens excluded, in order of first appearance.
    pub sparse: Option<Vec<(TokenId, f32)>>,
    /// BGE-M3 ColBERT vectors: one L2-normalized vector per token after the first.
    pub colbert: Option<Vec<Vec<f32>>>,
    pub n_tokens: u32,
}

pub(crate) struct EmbedJob {
    pub inputs: Vec<Vec<LlamaToken>>,
    pub outputs: EmbedOutputs,
    pub reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    pub span: tracing::Span,
}

/// A queued embedding request; await [`PendingEmbeddings::wait`] for its result.
/// Dropping it cancels the inputs not yet computed.
pub struct PendingEmbeddings {
    pub(crate) rx: oneshot::Receiver<Result<Vec<Embedding>, EngineError>>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl PendingEmbeddings {
    pub async fn wait(self) -> Result<Vec<Embedding>, EngineError> {
        self.rx.await.unwrap_or(Err(EngineError::ShutDown))
    }
}

/// What the worker needs to know about its model.
pub(crate) struct EmbedModel {
    pub pooling: Pooling,
    pub n_embd: usize,
    pub heads: Option<Arc<M3Heads>>,
    /// Token ids that never carry lexical weight (BOS/CLS, EOS, SEP, PAD, UNK).
    pub sparse_excluded: Vec<TokenId>,
    /// Most tokens in one decode (at least `max_input`).
    pub n_batch: usize,
    /// Most tokens one input may have: the context, capped by the model's training context.
    pub max_input: usize,
    /// Most sequences in one decode.
    pub n_seq_max: usize,
}

/// Why a request's embeddings could not be computed. Clients see the message
/// inside [`EngineError::Inference`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum EmbedError {
    #[error("cannot fill the batch: {0}")]
    Batch(#[from] BatchAddError),
    /// One failed decode fails every request in the batch: they share the error.
    #[error("decode failed: {0}")]
    Decode(Arc<DecodeError>),
    #[error("no scores for sequence {seq}: {source}")]
    NoScores {
        seq: i32,
        source: llama_cpp_2::EmbeddingsSeqError,
    },
    #[error("no hidden state for row {row}: {source}")]
    NoHiddenState { row: usize, source: EmbeddingsError },
    #[error("the model has no sparse head")]
    NoSparseHead,
    #[error("the model has no ColBERT head")]
    NoColbertHead,
}

struct Active {
    job: EmbedJob,
    results: Vec<Option<Embedding>>,
    /// Next input to put in a batch.
    next: usize,
    error: Option<EmbedError>,
}

pub(crate) fn run(
    mut ctx: LlamaContext<'_>,
    model: &EmbedModel,
    mut rx: mpsc::Receiver<EmbedJob>,
    stats: &SchedulerStats,
) {
    let mut queue: VecDeque<Active> = VecDeque::new();
    let mut batch = LlamaBatch::new(model.n_batch, 1);
    while take_jobs(&mut queue, &mut rx, stats) {
        if queue.is_empty() {
            continue;
        }
        let placed = pack(&mut batch, &mut queue, model);
        if !placed.is_empty() {
            let result = ctx.decode(&mut batch);
            stats.steps.fetch_add(1, Ordering::Relaxed);
            match result {
                Err(e) => {
                    let e = Arc::new(e);
                    for p in &placed {
                        queue[p.job].fail(EmbedError::Decode(e.clone()));
                    }
                }
                Ok(()) => read_batch(&ctx, model, &mut queue, &placed),
            }
            // Decoder-based embedders keep KV between calls: every batch starts clean.
            ctx.clear_kv_cache();
        }
        // Reply to every finished job, wherever it is in the queue.
        let mut i = 0;
        while i < queue.len() {
            if queue[i].is_finished() {
                queue.remove(i).expect("in range").reply();
            } else {
                i += 1;
            }
        }
    }
}

/// One input placed in the batch: its job, which input, and its first row.
struct Placed {
    job: usize,
    input: usize,
    first_row: usize,
}

/// Waits for work when there is none, takes every job waiting, and drops the
/// jobs whose client went away (their remaining inputs are not computed).
/// `false` once the queue has closed and nothing is left.
fn take_jobs(
    queue: &mut VecDeque<Active>,
    rx: &mut mpsc::Receiver<EmbedJob>,
    stats: &SchedulerStats,
) -> bool {
    if queue.is_empty() {
        stats.active.store(0, Ordering::Relaxed);
        match rx.blocking_recv() {
            Some(job) => queue.push_back(Active::new(job)),
            None => return false,
        }
    }
    while let Ok(job) = rx.try_recv() {
        queue.push_back(Active::new(job));
    }
    let before = queue.len();
    queue.retain(|a| !a.job.reply.is_closed());
    stats
        .cancelled
        .fetch_add((before - queue.len()) as u64, Ordering::Relaxed);
    stats.active.store(queue.len(), Ordering::Relaxed);
    true
}

/// Packs inputs in arrival order until the token or sequence budget is spent.
fn pack(batch: &mut LlamaBatch, queue: &mut VecDeque<Active>, model: &EmbedModel) -> Vec<Placed> {
    batch.clear();
    let mut placed = Vec::new();
    let mut rows = 0;
    'pack: for (j, active) in queue.iter_mut().enumerate() {
        while active.next < active.job.inputs.len() {
            let tokens = &active.job.inputs[active.next];
            if rows + tokens.len() > model.n_batch || placed.len() == model.n_seq_max {
                break 'pack;
            }
            let seq = placed.len() as i32;
            let added = tokens
                .iter()
                .enumerate()
                .try_for_each(|(pos, &token)| batch.add(token, pos as i32, &[seq], true));
            if let Err(e) = added {
                // Inputs are checked against n_batch when submitted, so this is a bug.
                active.fail(EmbedError::Batch(e));
                break 'pack;
            }
            placed.push(Placed {
                job: j,
                input: active.next,
                first_row: rows,
            });
            rows += tokens.len();
            active.next += 1;
        }
    }
    placed
}

/// Reads each placed input's outputs from a decoded batch.
fn read_batch(
    ctx: &LlamaContext<'_>,
    model: &EmbedModel,
    queue: &mut VecDeque<Active>,
    placed: &[Placed],
) {
    for (seq, p) in placed.iter().enumerate() {
        let active = &mut queue[p.job];
        if active.error.is_some() {
            continue;
        }
        let tokens = &active.job.inputs[p.input];
        let outputs = active.job.outputs;
        match read_outputs(ctx, model, seq as i32, p.first_row, tokens, outputs) {
            Ok(e) => active.results[p.input] = Some(e),
            Err(e) => active.fail(e),
        }
    }
}

impl Active {
    fn new(job: EmbedJob) -> Self {
        let n = job.inputs.len();
        Self {
            job,
            results: vec![None; n],
            next: 0,
            error: None,
        }
    }

    fn fail(&mut self, error: EmbedError) {
        let _span = self.job.span.enter();
        tracing::error!(message = %error, "embedding failed");
        self.error.get_or_insert(error);
        self.next = self.job.inputs.len();
    }

    fn is_finished(&self) -> bool {
        self.error.is_some() || self.results.iter().all(Option::is_some)
    }

    fn reply(self) {
        let reply = match self.error {
            Some(error) => Err(EngineError::Inference(error.to_string())),
            None => Ok(self.results.into_iter().flatten().collect()),
        };
        let _ = self.job.reply.send(reply);
    }
}

fn read_outputs(
    ctx: &LlamaContext<'_>,
    model: &EmbedModel,
    seq: i32,
    first_row: usize,
    tokens: &[LlamaToken],
    want: EmbedOutputs,
) -> Result<Embedding, EmbedError> {
    let mut out = Embedding {
        n_tokens: tokens.len() as u32,
        ..Default::default()
    };
    if model.pooling == Pooling::Rank {
        let scores = ctx
            .embeddings_seq_ith(seq)
            .map_err(|source| EmbedError::NoScores { seq, source })?;
        out.dense = Some(scores.to_vec());
        return Ok(out);
    }
    let row = |i: usize| -> Result<&[f32], EmbedError> {
        let row = first_row + i;
        let r = ctx
            .embeddings_ith(row as i32)
            .map_err(|source| EmbedError::NoHiddenState { row, source })?;
        Ok(&r[..model.n_embd.min(r.len())])
    };
    let n = tokens.len();
    if want.dense {
        let mut pooled = match model.pooling {
            Pooling::Cls => row(0)?.to_vec(),
            Pooling::Last => row(n - 1)?.to_vec(),
            Pooling::Mean | Pooling::Rank => {
                let mut sum = vec![0.0f32; model.n_embd];
                for i in 0..n {
                    for (s, v) in sum.iter_mut().zip(row(i)?) {
                        *s += v;
                    }
                }
                sum.iter_mut().for_each(|s| *s /= n as f32);
                sum
            }
        };
        normalize(&mut pooled);
        out.dense = Some(pooled);
    }
    let heads = model.heads.as_deref();
    if want.sparse {
        let sparse = heads
            .and_then(|h| h.sparse.as_ref())
            .ok_or(EmbedError::NoSparseHead)?;
        let mut weights: Vec<(TokenId, f32)> = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            let w = sparse.apply(row(i)?)[0].max(0.0);
            if w <= 0.0 || model.sparse_excluded.contains(&token.0) {
                continue;
            }
            match weights.iter_mut().find(|(id, _)| *id == token.0) {
                Some((_, best)) => *best = best.max(w),
                None => weights.push((token.0, w)),
            }
        }
        out.sparse = Some(weights);
    }
    if want.colbert {
        let colbert = heads
            .and_then(|h| h.colbert.as_ref())
            .ok_or(EmbedError::NoColbertHead)?;
        let vectors = (1..n)
            .map(|i| {
                let mut v = colbert.apply(row(i)?);
                normalize(&mut v);
                Ok(v)
            })
            .collect::<Result<Vec<_>, EmbedError>>()?;
        out.colbert = Some(vectors);
    }
    Ok(out)
}

/// L2 normalization (`F.normalize`: a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}
