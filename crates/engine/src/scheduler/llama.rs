//! The scheduler's [`Decoder`] on llama.cpp: the context, its batch, and
//! sampling with the model's vocabulary.

use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::{Decoder, Sampled};
use crate::sampling;
use crate::sequence::Sequence;
use crate::{EngineError, TokenLogprob};

pub(crate) struct LlamaDecoder<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

impl<'m> LlamaDecoder<'m> {
    pub fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>) -> Self {
        let n_batch = ctx.n_batch() as usize;
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
        }
    }
}

impl Decoder for LlamaDecoder<'_> {
    fn n_ctx(&self) -> usize {
        self.ctx.n_ctx() as usize
    }

    fn n_batch(&self) -> usize {
        self.ctx.n_batch() as usize
    }

    fn batch_clear(&mut self) {
        self.batch.clear();
    }

    fn batch_add(&mut self, token: LlamaToken, pos: usize, seq_id: i32, logits: bool) -> i32 {
        self.batch
            .add(token, pos as i32, &[seq_id], logits)
            .expect("the batch holds n_batch tokens and the budget never exceeds it");
        self.batch.n_tokens() - 1
    }

    fn decode(&mut self) -> Result<(), DecodeError> {
        self.ctx.decode(&mut self.batch)
    }

    fn kv_clear(&mut self) {
        self.ctx.clear_kv_cache();
    }

    fn kv_seq_rm(&mut self, seq_id: i32, from: Option<u32>) -> bool {
        self.ctx
            .clear_kv_cache_seq(Some(seq_id as u32), from, None)
            .ok()
            == Some(true)
    }

    fn kv_seq_cp(&mut self, src: i32, dst: i32, n: u32) {
        let _ = self.ctx.copy_kv_cache_seq(src, dst, Some(0), Some(n));
    }

    type Saved = SeqState;

    fn kv_seq_save(&mut self, seq_id: i32) -> Option<(SeqState, usize)> {
        let state = self
            .ctx
            .state_seq_get(seq_id, LlamaStateSeqFlags::empty())
            .ok()?;
        let bytes = state.byte_len();
        Some((state, bytes))
    }

    fn kv_seq_load(&mut self, seq_id: i32, saved: &SeqState) -> bool {
        // On failure llama.cpp leaves the sequence empty.
        self.ctx.state_seq_set(saved, seq_id).is_ok()
    }

    fn sample(&mut self, seq: &mut Sequence, index: i32) -> Result<Option<Sampled>, EngineError> {
        let vocab = self.model.vocab();
        let (token, grammar_complete) = match seq.constraint.as_mut().filter(|c| !c.is_waiting()) {
            None => (
                sampling::sample(&mut seq.sampler, seq.penalties.as_mut(), &self.ctx, index),
                false,
            ),
            Some(constraint) => {
                let spent = seq.n_generated;
                // Not with ignore_eos: the end token would not end it.
                let end_if_complete = seq.finish_within_budget
                    && !seq.ignore_eos
                    && seq.max_tokens.saturating_sub(spent) < spent;
                let step = constraint.sample(
                    &mut seq.sampler,
                    seq.penalties.as_mut(),
                    self.ctx.get_logits_ith(index),
                    |t| vocab.is_eog(t),
                    end_if_complete,
                )?;
                match step.token {
                    Some(token) => (token, step.complete),
                    None => return Ok(None),
                }
            }
        };
        let is_eog = vocab.is_eog(token);
        let piece = if is_eog {
            Vec::new()
        } else {
            vocab.token_to_piece(token, seq.special_text, None)
        };
        if let Some(constraint) = seq.constraint.as_mut() {
            constraint.observe(&piece);
        }
        let logprob = seq
            .logprobs
            .filter(|_| !is_eog || seq.ignore_eos)
            .map(|top| {
                token_logprob(
                    self.model,
                    self.ctx.get_logits_ith(index),
                    token,
                    &piece,
                    top,
                )
            });
        Ok(Some(Sampled {
            token,
            is_eog,
            piece,
            logprob,
            grammar_complete,
        }))
    }
}

/// The model's log-probability of `token` at this position (log-softmax of the raw
/// logits, before any sampling transform, as OpenAI reports it) and the `top` most
/// likely alternatives.
fn token_logprob(
    model: &LlamaModel,
    logits: &[f32],
    token: LlamaToken,
    piece: &[u8],
    top: u32,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let logprob_of = |id: usize| logits[id] - log_sum;
    let mut best: Vec<usize> = Vec::new();
    if top > 0 {
        let k = (top as usize).min(logits.len());
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(k);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        best = order;
    }
    let vocab = model.vocab();
    TokenLogprob {
        token: String::from_utf8_lossy(piece).into_owned(),
        bytes: piece.to_vec(),
        logprob: logprob_of(token.0 as usize),
        top: best
            .into_iter()
            .map(|id| {
                let bytes = vocab.token_to_piece(LlamaToken(id as i32), false, None);
                (
                    String::from_utf8_lossy(&bytes).into_owned(),
                    bytes,
                    logprob_of(id),
                )
            })
            .collect(),
    }
}
