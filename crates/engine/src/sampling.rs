//! One llama.cpp sampler chain per sequence, built from its request's settings,
//! and the repetition penalties beside it.

use std::collections::VecDeque;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

use crate::SamplingParams;

/// llama.cpp draws a random seed when given this value (`LLAMA_DEFAULT_SEED`).
const RANDOM_SEED: u32 = u32::MAX;

/// Builds the chain in llama.cpp's own default order (logit bias, penalties,
/// top-k, top-p, min-p, temperature, draw), so the same settings sample the
/// same way as llama-server. Penalties, when asked for, are [`Penalties`]
/// beside the chain, which then also carries the logit bias that comes first.
pub(crate) fn build(params: &SamplingParams, n_vocab: i32) -> (LlamaSampler, Option<Penalties>) {
    let penalties = Penalties::new(params);
    (build_chain(params, n_vocab, penalties.is_none()), penalties)
}

/// The chain after the penalties; with the logit bias first when `bias`.
fn build_chain(params: &SamplingParams, n_vocab: i32, bias: bool) -> LlamaSampler {
    let mut chain = Vec::with_capacity(7);
    if bias && !params.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = params
            .logit_bias
            .iter()
            .map(|&(token, bias)| LlamaLogitBias::new(LlamaToken(token), bias))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    if params.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if params.top_k > 0 {
            chain.push(LlamaSampler::top_k(params.top_k));
        }
        if params.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(params.top_p, 1));
        }
        if params.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(params.min_p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        chain.push(LlamaSampler::dist(params.seed.unwrap_or(RANDOM_SEED)));
    }
    LlamaSampler::chain(chain, true)
}

/// llama.cpp's repetition penalties over the last `penalty_last_n` sampled
/// tokens (repeat, frequency and presence, in its arithmetic and order),
/// applied only to the tokens in that window. llama.cpp's penalties sampler
/// looks every candidate up in its window's table: on gemma's 262,144-token
/// vocabulary that walk cost ~6% of the server's CPU at 8 streams, while the
/// window holds at most `penalty_last_n` distinct tokens.
#[derive(Debug, Clone)]
pub(crate) struct Penalties {
    /// The request's logit bias, which llama.cpp applies before penalties.
    bias: Vec<(LlamaToken, f32)>,
    last_n: usize,
    repeat: f32,
    frequency: f32,
    presence: f32,
    window: VecDeque<LlamaToken>,
    /// How often each token occurs in `window` (only tokens that do).
    counts: Vec<(LlamaToken, u32)>,
}

impl Penalties {
    /// The penalties `params` ask for; `None` when they change nothing.
    pub(crate) fn new(params: &SamplingParams) -> Option<Self> {
        let active = params.repeat_penalty != 1.0
            || params.presence_penalty != 0.0
            || params.frequency_penalty != 0.0;
        let last_n = usize::try_from(params.penalty_last_n).ok()?;
        (active && last_n > 0).then(|| Self {
            bias: params
                .logit_bias
                .iter()
                .map(|&(token, bias)| (LlamaToken(token), bias))
                .collect(),
            last_n,
            repeat: params.repeat_penalty,
            frequency: params.frequency_penalty,
            presence: params.presence_penalty,
            window: VecDeque::with_capacity(last_n),
            counts: Vec::new(),
        })
    }

    /// Records a sampled token; the oldest leaves the window when it is full.
    pub(crate) fn accept(&mut self, token: LlamaToken) {
        if self.window.len() == self.last_n {
            if let Some(old) = self.window.pop_front() {
                if let Some(i) = self.counts.iter().position(|&(t, _)| t == old) {
                    self.counts[i].1 -= 1;
                    if self.counts[i].1 == 0 {
                        self.counts.swap_remove(i);
                    }
                }
            }
        }
        self.window.push_back(token);
        match self.counts.iter_mut().find(|(t, _)| *t == token) {
            Some((_, count)) => *count += 1,
            None => self.counts.push((token, 1)),
        }
    }

    /// Biases and penalizes the tokens concerned among `candidates`, which
    /// are in token order (the whole vocabulary, or the part a grammar allows).
    pub(crate) fn apply(&self, candidates: &mut [LlamaTokenData]) {
        for &(token, bias) in &self.bias {
            if let Some(candidate) = find(candidates, token) {
                candidate.set_logit(candidate.logit() + bias);
            }
        }
        for &(token, count) in &self.counts {
            let Some(candidate) = find(candidates, token) else {
                continue;
            };
            // llama.cpp multiplies negative logits (dividing them would make a
            // repeated token likelier), then subtracts frequency and presence.
            let mut logit = candidate.logit();
            if logit <= 0.0 {
                logit *= self.repeat;
            } else {
                logit /= self.repeat;
            }
            logit -= count as f32 * self.frequency + self.presence;
            candidate.set_logit(logit);
        }
    }
}

impl Penalties {
    /// The likeliest token of `logits` (the whole vocabulary) once biased
    /// and penalized, without copying the vocabulary: only the few tokens
    /// the bias and the window touch change, so the rest are scanned as they
    /// are, and a token is looked up among the touched ones only when it
    /// would be the best so far.
    pub(crate) fn greedy(&self, logits: &[f32]) -> Option<LlamaToken> {
        let mut touched: Vec<LlamaTokenData> = (self.bias.iter().map(|&(t, _)| t))
            .chain(self.counts.iter().map(|&(t, _)| t))
            .filter_map(|t| {
                let logit = *logits.get(usize::try_from(t.0).ok()?)?;
                Some(LlamaTokenData::new(t, logit, 0.0))
            })
            .collect();
        touched.sort_by_key(|c| c.id().0);
        touched.dedup_by_key(|c| c.id().0);
        self.apply(&mut touched);
        let mut best = touched
            .iter()
            .max_by(|a, b| a.logit().total_cmp(&b.logit()))
            .map(|c| (c.id(), c.logit()));
        for (id, &logit) in logits.iter().enumerate() {
            let id = id as i32;
            if best.is_none_or(|(_, b)| logit > b)
                && touched.binary_search_by_key(&id, |c| c.id().0).is_err()
            {
                best = Some((LlamaToken(id), logit));
            }
        }
        best.map(|(token, _)| token)
    }
}

/// `token` among candidates in token order: at its own index when they are
/// the whole vocabulary, found by its id otherwise.
fn find(candidates: &mut [LlamaTokenData], token: LlamaToken) -> Option<&mut LlamaTokenData> {
    let at = match usize::try_from(token.0) {
        Ok(i) if candidates.get(i).is_some_and(|c| c.id() == token) => i,
        _ => candidates
            .binary_search_by_key(&token.0, |c| c.id().0)
            .ok()?,
    };
    candidates.get_mut(at)
}

/// Draws a token for the logits of one position with `chain`, after the
/// sequence's penalties, and records it in both. Without penalties this is
/// llama.cpp's own `llama_sampler_sample`.
pub(crate) fn sample(
    chain: &mut LlamaSampler,
    penalties: Option<&mut Penalties>,
    ctx: &LlamaContext<'_>,
    index: i32,
) -> LlamaToken {
    let Some(penalties) = penalties else {
        return chain.sample(ctx, index);
    };
    let logits = ctx.get_logits_ith(index);
    let mut candidates = LlamaTokenDataArray::from_iter(
        logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)),
        false,
    );
    penalties.apply(&mut candidates.data);
    candidates.apply_sampler(chain);
    let token = candidates
        .selected_token()
        .expect("every sampler chain ends by selecting a token");
    chain.accept(token);
    penalties.accept(token);
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible stream of numbers in [0, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn candidates(logits: &[f32]) -> LlamaTokenDataArray {
        LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(id, &l)| LlamaTokenData::new(LlamaToken(id as i32), l, 0.0)),
            false,
        )
    }

    /// The penalties give exactly the logits llama.cpp's own logit-bias and
    /// penalties samplers give, over a sliding window with repeats, on the
    /// whole vocabulary and on a grammar's subset of it.
    #[test]
    fn penalties_match_llama_cpp_bit_for_bit() {
        let n_vocab = 512;
        let mut rng = Lcg(7);
        for (repeat, frequency, presence, last_n) in [
            (1.3, 0.0, 0.0, 16),
            (1.1, 0.5, 0.25, 8),
            (0.8, -0.3, 0.7, 64),
        ] {
            let params = SamplingParams {
                repeat_penalty: repeat,
                frequency_penalty: frequency,
                presence_penalty: presence,
                penalty_last_n: last_n,
                logit_bias: vec![(3, 2.5), (9, -4.0)],
                ..SamplingParams::default()
            };
            let biases = [
                LlamaLogitBias::new(LlamaToken(3), 2.5),
                LlamaLogitBias::new(LlamaToken(9), -4.0),
            ];
            let mut reference = LlamaSampler::chain(
                [
                    LlamaSampler::logit_bias(n_vocab, &biases),
                    LlamaSampler::penalties(n_vocab, last_n, repeat, frequency, presence),
                ],
                false,
            );
            let mut ours = Penalties::new(&params).expect("active");
            for _ in 0..200 {
                let logits: Vec<f32> = (0..n_vocab).map(|_| rng.next() * 20.0 - 10.0).collect();
                let mut expected = candidates(&logits);
                expected.apply_sampler(&mut reference);
                let mut got = candidates(&logits);
                ours.apply(&mut got.data);
                for (e, g) in expected.data.iter().zip(&got.data) {
                    assert_eq!(e.id(), g.id());
                    assert_eq!(
                        e.logit().to_bits(),
                        g.logit().to_bits(),
                        "token {:?}",
                        e.id()
                    );
                }
                // A grammar's subset: every third token, in token order.
                let mut subset: Vec<_> = candidates(&logits).data.into_iter().step_by(3).collect();
                ours.apply(&mut subset);
                for s in &subset {
                    let e = &expected.data[s.id().0 as usize];
                    assert_eq!(e.logit().to_bits(), s.logit().to_bits());
                }
                // The likeliest token after them, found without a copy.
                let likeliest = expected
                    .data
                    .iter()
                    .max_by(|a, b| a.logit().total_cmp(&b.logit()))
                    .map(LlamaTokenData::id);
                assert_eq!(ours.greedy(&logits), likeliest);
                // Few distinct tokens, so the window holds repeats.
                let token = LlamaToken((rng.next() * 12.0) as i32);
                reference.accept(token);
                ours.accept(token);
            }
        }
    }

    #[test]
    fn no_penalties_when_they_change_nothing() {
        assert!(Penalties::new(&SamplingParams::default()).is_none());
        let zero_window = SamplingParams {
            repeat_penalty: 1.2,
            penalty_last_n: 0,
            ..SamplingParams::default()
        };
        assert!(Penalties::new(&zero_window).is_none());
    }
}
