//! The scheduler's [`Decoder`] on llama.cpp: the context, its batch, and
//! sampling with the model's vocabulary.

use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::{Decoder, Sampled};
use crate::sampling::{self, Penalties};
use crate::sequence::Sequence;
use crate::speculation::DRAFT_MAX;
use crate::{EngineError, TokenLogprob};

pub(crate) struct LlamaDecoder<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    draft: Option<DraftModel<'m>>,
    /// The model's sliding attention window, in tokens, when its GGUF states
    /// one (`{arch}.attention.sliding_window`: gemma 2 and 3, ...).
    sliding_window: Option<usize>,
}

impl<'m> LlamaDecoder<'m> {
    pub fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        draft: Option<DraftModel<'m>>,
    ) -> Self {
        let n_batch = ctx.n_batch() as usize;
        let sliding_window = model
            .meta_val_str("general.architecture")
            .and_then(|arch| model.meta_val_str(&format!("{arch}.attention.sliding_window")))
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n > 0);
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            draft,
            sliding_window,
        }
    }
}

/// A smaller model of the same vocabulary that guesses greedy sequences' next
/// tokens (`{TIER}_DRAFT_MODEL_PATH`). Its context keeps one KV sequence per
/// slot, holding the tokens it has seen of that slot's sequence, so each
/// guess computes only what is new since the last (the tokens kept, and the
/// rejected guesses dropped).
pub(crate) struct DraftModel<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Per slot: the tokens in the draft's KV.
    seen: Vec<Vec<LlamaToken>>,
}

impl<'m> DraftModel<'m> {
    pub fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, slots: usize) -> Self {
        let n_batch = ctx.n_batch() as usize;
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            seen: vec![Vec::new(); slots],
        }
    }

    /// Up to `limit` greedy tokens after `tokens`, stopping before an end of
    /// generation, under the sequence's repetition `penalties` (and the logit
    /// bias they carry) as its own draws are, else its guesses would miss
    /// wherever those decide. Nothing while it is still catching up on a long
    /// new prompt, nor when its cache has no room even without the other
    /// slots' tokens (it is then emptied, and the next guess starts afresh).
    fn guess(
        &mut self,
        seq_id: i32,
        tokens: &[LlamaToken],
        limit: usize,
        penalties: Option<&Penalties>,
    ) -> Vec<LlamaToken> {
        let Some(seen) = self.seen.get_mut(seq_id as usize) else {
            return Vec::new();
        };
        if tokens.is_empty() || limit == 0 {
            return Vec::new();
        }
        // The last token is decoded even when seen: its logits start the guess.
        let mut keep = super::common_prefix(seen, tokens).min(tokens.len() - 1);
        if keep < seen.len()
            && self
                .ctx
                .clear_kv_cache_seq(Some(seq_id as u32), Some(keep as u32), None)
                .ok()
                != Some(true)
        {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None);
            keep = 0;
        }
        seen.truncate(keep);
        let mut pending = tokens[keep..].to_vec();
        // A token of the model's padding that the draft lacks (see
        // `same_vocabulary`): nothing to decode it as.
        if pending.iter().any(|t| t.0 >= self.model.n_vocab()) {
            return Vec::new();
        }
        let mut penalties = penalties.cloned();
        let n_batch = self.ctx.n_batch() as usize;
        let mut pos = keep;
        let mut guesses = Vec::new();
        loop {
            // A long catch-up (a new prompt) goes one batch a step, so that
            // the streams sharing the step wait for one draft batch per
            // catching-up sequence, not a whole prompt's; guesses resume once
            // the draft has seen the whole sequence.
            let behind = pending.len() > n_batch;
            // More than a guess's worth to catch up on (a new prompt, or what
            // a pause produced) is a call of its own: guessing in it would
            // charge the catch-up to the guesses, whose time decides whether
            // guessing pays.
            let catching_up = pending.len() > DRAFT_MAX + 1;
            let chunk = &pending[..pending.len().min(n_batch)];
            self.batch.clear();
            for (i, &token) in chunk.iter().enumerate() {
                let last = !behind && !catching_up && i + 1 == chunk.len();
                if self
                    .batch
                    .add(token, (pos + i) as i32, &[seq_id], last)
                    .is_err()
                {
                    self.forget_all();
                    return Vec::new();
                }
            }
            if !self.decode_making_room(seq_id) {
                self.forget_all();
                return Vec::new();
            }
            self.seen[seq_id as usize].extend_from_slice(chunk);
            pos += chunk.len();
            if behind || catching_up {
                return Vec::new();
            }
            let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
            let best = greedy(logits, penalties.as_mut());
            match best {
                Some(token) if !self.model.vocab().is_eog(token) => guesses.push(token),
                _ => return guesses,
            }
            if guesses.len() == limit {
                return guesses;
            }
            pending = guesses[guesses.len() - 1..].to_vec();
        }
    }

    /// Decodes the batch; when the cache is full, drops the other slots'
    /// tokens (idle sequences it was never told to drop, or others it will
    /// catch up with again) and tries once more.
    fn decode_making_room(&mut self, seq_id: i32) -> bool {
        match self.ctx.decode(&mut self.batch) {
            Ok(()) => true,
            Err(DecodeError::NoKvCacheSlot) => {
                for (other, seen) in self.seen.iter_mut().enumerate() {
                    if other as i32 != seq_id && !seen.is_empty() {
                        let _ = self.ctx.clear_kv_cache_seq(Some(other as u32), None, None);
                        seen.clear();
                    }
                }
                self.ctx.decode(&mut self.batch).is_ok()
            }
            Err(_) => false,
        }
    }

    fn forget_all(&mut self) {
        self.ctx.clear_kv_cache();
        self.seen.iter_mut().for_each(Vec::clear);
    }
}

/// The likeliest token after `penalties` (which then record it).
fn greedy(logits: &[f32], penalties: Option<&mut Penalties>) -> Option<LlamaToken> {
    let Some(penalties) = penalties else {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(id, _)| LlamaToken(id as i32));
    };
    let best = penalties.greedy(logits)?;
    penalties.accept(best);
    Some(best)
}

/// How many more or fewer tokens a draft's vocabulary may have than the
/// model's: a family's GGUFs can differ by padding (Qwen2.5's 0.5B to 3B
/// have 151,936 tokens, its 7B and larger 152,064), which llama.cpp's own
/// speculation allows for up to this many.
const VOCAB_SIZE_SLACK: i32 = 128;

/// Whether `draft` writes every token they share as `model` does, so that
/// its guesses are the model's token ids; the first difference otherwise.
/// Guesses beyond the model's vocabulary are cut off where they are made.
pub(crate) fn same_vocabulary(model: &LlamaModel, draft: &LlamaModel) -> Result<(), String> {
    let (n, m) = (model.n_vocab(), draft.n_vocab());
    if (n - m).abs() > VOCAB_SIZE_SLACK {
        return Err(format!("it has {m} tokens, the model {n}"));
    }
    let (ours, theirs) = (model.vocab(), draft.vocab());
    for id in 0..n.min(m) {
        let token = LlamaToken(id);
        let (a, b) = (
            ours.token_to_piece(token, true, None),
            theirs.token_to_piece(token, true, None),
        );
        if a != b || ours.is_eog(token) != theirs.is_eog(token) {
            return Err(format!(
                "token {id} is {:?} in it and {:?} in the model",
                String::from_utf8_lossy(&b),
                String::from_utf8_lossy(&a)
            ));
        }
    }
    Ok(())
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

    fn kv_seq_resumable(&self, seq_id: i32, keep: usize) -> bool {
        // llama.cpp keeps every position from the sequence's smallest on
        // (only a sliding-window cache drops the smallest ones). Decoding at
        // `keep` attends to the window's positions before it, which must be
        // there; a window of unknown width is never assumed whole.
        let first = self.ctx.kv_cache_seq_pos_min(seq_id);
        let Ok(first @ 1..) = usize::try_from(first) else {
            return true;
        };
        self.sliding_window
            .is_some_and(|window| first + window <= keep + 1)
    }

    type Saved = SeqState;

    fn kv_seq_save(&mut self, seq_id: i32, max_bytes: usize) -> Option<(SeqState, usize)> {
        // Sized first: a long sequence's copy can be gigabytes.
        let size = self
            .ctx
            .state_seq_get_size_ext(seq_id, LlamaStateSeqFlags::empty());
        if size > max_bytes {
            return None;
        }
        let state = self
            .ctx
            .state_seq_get(seq_id, LlamaStateSeqFlags::empty())
            .ok()?;
        let bytes = state.byte_len();
        Some((state, bytes))
    }

    fn guess(
        &mut self,
        seq_id: i32,
        tokens: &[LlamaToken],
        limit: usize,
        penalties: Option<&Penalties>,
    ) -> Option<Vec<LlamaToken>> {
        let mut guesses = self.draft.as_mut()?.guess(seq_id, tokens, limit, penalties);
        // A draft with more (padding) tokens than the model may name one
        // the model does not have.
        let n_vocab = self.model.n_vocab();
        if let Some(cut) = guesses.iter().position(|t| t.0 >= n_vocab) {
            guesses.truncate(cut);
        }
        Some(guesses)
    }

    fn kv_seq_load(&mut self, seq_id: i32, saved: &SeqState) -> bool {
        // On failure llama.cpp leaves the sequence empty.
        self.ctx.state_seq_set(saved, seq_id).is_ok()
    }

    fn sample(&mut self, seq: &mut Sequence, index: i32) -> Result<Option<Sampled>, EngineError> {
        let vocab = self.model.vocab();
        let spent = seq.answer_tokens();
        let (token, grammar_complete) = match seq.constraint.as_mut().filter(|c| !c.is_waiting()) {
            None => (
                sampling::sample(&mut seq.sampler, seq.penalties.as_mut(), &self.ctx, index),
                false,
            ),
            Some(constraint) => {
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
        let answer = seq.answer_part(&piece);
        if let Some(constraint) = seq.constraint.as_mut() {
            constraint.observe(&answer);
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::path::PathBuf;

    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::model::params::LlamaModelParams;

    use super::*;

    fn smollm() -> LlamaModel {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf"
        ));
        let backend = crate::backend::shared_backend().unwrap();
        LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).unwrap()
    }

    fn draft(model: &LlamaModel) -> DraftModel<'_> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(256))
            .with_n_batch(64)
            .with_n_ubatch(64)
            .with_n_seq_max(2)
            .with_kv_unified(true)
            .with_n_threads(2)
            .with_n_threads_batch(2);
        let backend = crate::backend::shared_backend().unwrap();
        DraftModel::new(model, model.new_context(backend, params).unwrap(), 2)
    }

    /// A new draft's guess for `tokens`, once it has caught up with them.
    fn fresh(
        model: &LlamaModel,
        tokens: &[LlamaToken],
        limit: usize,
        penalties: Option<&Penalties>,
    ) -> Vec<LlamaToken> {
        let mut draft = draft(model);
        loop {
            let caught_up = draft.seen[0].len() >= tokens.len();
            let guess = draft.guess(0, tokens, limit, penalties);
            if caught_up || !guess.is_empty() {
                return guess;
            }
        }
    }

    #[test]
    fn a_draft_keeps_what_it_saw_and_guesses_as_a_fresh_one_would() {
        let model = smollm();
        let vocab = model.vocab();
        // Longer than one draft batch (64), so the catch-up takes two calls.
        let text = "The lighthouse keeper climbed the one hundred and twelve steps every \
                    evening, wound the clockwork that turned the lens, and lit the lamp. "
            .repeat(4);
        let prompt = vocab.tokenize(text.as_bytes(), false, false);
        assert!(prompt.len() > 64 + DRAFT_MAX + 1, "{}", prompt.len());
        let mut kept = draft(&model);
        // A prompt longer than a batch is caught up with one batch a call,
        // and guessed for in a call after the one that saw its end.
        assert!(kept.guess(0, &prompt, 6, None).is_empty());
        assert_eq!(kept.seen[0].len(), 64);
        assert!(kept.guess(0, &prompt, 6, None).is_empty());
        assert_eq!(kept.seen[0].len(), prompt.len());
        let first = kept.guess(0, &prompt, 6, None);
        assert_eq!(first.len(), 6);
        assert_eq!(kept.seen[0].len(), prompt.len() + 5);

        // Three guesses kept, then a token of the model's own; meanwhile
        // another slot's sequence passes through the draft.
        let mut tokens = prompt.clone();
        tokens.extend(&first[..3]);
        tokens.extend(vocab.tokenize(b" Ships", false, false));
        let other = vocab.tokenize(b"Once upon a time", false, false);
        assert!(!kept.guess(1, &other, 3, None).is_empty());
        let again = kept.guess(0, &tokens, 4, None);
        assert_eq!(again, fresh(&model, &tokens, 4, None));
        assert_eq!(&kept.seen[0][..tokens.len()], &tokens[..]);

        // A sequence that starts over in the slot is guessed for afresh.
        assert_eq!(
            kept.guess(0, &other, 3, None),
            fresh(&model, &other, 3, None)
        );
        assert_eq!(kept.guess(0, &[], 3, None), Vec::<LlamaToken>::new());
        assert!(same_vocabulary(&model, &model).is_ok());

        // Under the sequence's penalties, as its own draws are: a heavy
        // repetition penalty turns the guess away from the repeated text.
        let params = crate::SamplingParams {
            repeat_penalty: 100.0,
            penalty_last_n: 256,
            ..crate::SamplingParams::default()
        };
        let mut penalties = Penalties::new(&params).unwrap();
        prompt.iter().for_each(|&t| penalties.accept(t));
        let plain = fresh(&model, &prompt, 3, None);
        let penalized = fresh(&model, &prompt, 3, Some(&penalties));
        let repeats = |guess: &[LlamaToken]| guess.iter().filter(|t| prompt.contains(t)).count();
        assert!(
            repeats(&plain) > repeats(&penalized),
            "{plain:?} {penalized:?}"
        );
    }
}
