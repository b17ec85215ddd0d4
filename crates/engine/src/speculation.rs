//! Speculation: guess a sequence's next tokens from the request's predicted
//! output, a draft model (`scheduler/llama.rs`) or the sequence's own history
//! (prompt lookup), verify the guesses in the scheduler's ordinary batched
//! decode, keep the prefix the sampler agrees with.
//!
//! A greedy draw is a function of the logits, and the logits at each position
//! are the model's output for the tokens before it: so when the token drawn at
//! position `p` equals the guess placed at `p + 1`, the logits computed at
//! `p + 1` are the ones plain decoding would compute next, and the guess costs
//! one extra row of the batch instead of a whole step. Only greedy sequences
//! speculate: a sampled draw would need the speculative-sampling acceptance rule
//! over the chain's final distribution, which llama.cpp's sampler chain does not
//! expose.

use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;

/// Which speculation a model's sequences use (`{TIER}_SPECULATIVE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculation {
    #[default]
    Off,
    /// Prompt lookup: continuations of the latest earlier occurrence of the
    /// sequence's last few tokens.
    Ngram,
    /// A smaller model of the same vocabulary guesses greedily
    /// (`{TIER}_DRAFT_MODEL_PATH`).
    Draft,
}

/// Steps with this many generating streams or fewer are timed by [`Payoff`]
/// (the scheduler leaves no rows for guesses beyond them).
pub(crate) const TIMED_STREAMS: usize = 4;
/// Timed steps of each kind before guessing is judged.
const PLAIN_SAMPLES: u32 = 3;
const GUESSED_SAMPLES: u32 = 6;
/// Or fewer guessed steps once they produced this many tokens: a draft
/// model's long guesses cost a step's time per token guessed, and six such
/// steps can be a whole answer.
const GUESSED_TOKENS: usize = 32;
/// Weight of the newest step in the running rates.
const RATE_WEIGHT: f64 = 0.2;
/// First and longest pause, in steps, after guessing was found to cost time.
const PAYOFF_PAUSE_START: u32 = 64;
const PAYOFF_PAUSE_MAX: u32 = 4096;

/// Whether guessing pays here: a guessed row costs a share of a step that
/// depends on the machine, the model and the kernels (on a 2-core CPU with a
/// small model, every row costs about as much as a token, so guesses pay only
/// when nearly all hold; where weights stream from memory, rows are almost
/// free). So the scheduler times its steps, per number of generating
/// streams, and compares the seconds per produced token of steps with guesses
/// to those without: when guessing is the slower, it stops for a pause that
/// doubles each time it is found slower again, and is tried afresh after.
#[derive(Debug, Clone, Default)]
pub(crate) struct Payoff {
    plain: [Rate; TIMED_STREAMS],
    guessed: [Rate; TIMED_STREAMS],
    /// Steps left without guesses, and the pause the next loss starts.
    pause: u32,
    next_pause: u32,
    /// Times guessing was found to cost more than it saved.
    pub losses: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    secs_per_token: f64,
    samples: u32,
    tokens: usize,
}

impl Rate {
    fn add(&mut self, value: f64, tokens: usize) {
        self.secs_per_token = if self.samples == 0 {
            value
        } else {
            self.secs_per_token + RATE_WEIGHT * (value - self.secs_per_token)
        };
        self.samples += 1;
        self.tokens += tokens;
    }
}

impl Payoff {
    /// Whether a step with `streams` generating sequences may hold guesses;
    /// called once per step.
    pub fn allows(&mut self, streams: usize) -> bool {
        if self.pause > 0 {
            self.pause -= 1;
            return false;
        }
        // Until plain steps with as many streams were timed, run plain.
        (1..=TIMED_STREAMS).contains(&streams) && self.plain[streams - 1].samples >= PLAIN_SAMPLES
    }

    /// Records a step of decode tokens only (no prompt rows): `streams`
    /// generating sequences produced `tokens` tokens in `secs`.
    pub fn record(&mut self, streams: usize, guessed: bool, secs: f64, tokens: usize) {
        if !(1..=TIMED_STREAMS).contains(&streams) || tokens == 0 {
            return;
        }
        let value = secs / tokens as f64;
        let i = streams - 1;
        if !guessed {
            self.plain[i].add(value, tokens);
            return;
        }
        let guessed = &mut self.guessed[i];
        guessed.add(value, tokens);
        let judged = guessed.samples >= GUESSED_SAMPLES || guessed.tokens >= GUESSED_TOKENS;
        if !judged || self.plain[i].samples < PLAIN_SAMPLES {
            return;
        }
        if self.guessed[i].secs_per_token > self.plain[i].secs_per_token {
            self.losses += 1;
            self.pause = self.next_pause.max(PAYOFF_PAUSE_START);
            self.next_pause = (self.pause * 2).min(PAYOFF_PAUSE_MAX);
            self.guessed[i] = Rate::default();
        } else {
            self.next_pause = PAYOFF_PAUSE_START;
        }
    }
}

/// Longest and shortest suffix looked up. One token matches too often to be
/// worth a guess on a CPU, where every guessed row costs a share of a step.
const NGRAM_MAX: usize = 4;
const NGRAM_MIN: usize = 2;
/// Most tokens guessed at once, and the first guess's length.
pub(crate) const DRAFT_MAX: usize = 16;
const DRAFT_START: usize = 4;
/// Longest pause after guesses that all failed, in steps.
const PAUSE_MAX: u32 = 32;

/// One sequence's speculation state: how far to guess, and its record.
#[derive(Debug, Clone)]
pub(crate) struct Drafter {
    /// How many tokens the next guess may hold (grows while guesses hold,
    /// shrinks when they fail).
    len: usize,
    /// Steps left to skip guessing, after guesses that were all rejected.
    pause: u32,
    /// The pause the next wholly rejected guess starts.
    next_pause: u32,
    /// Tokens guessed and checked, and how many of them were kept (counted by
    /// the scheduler as it checks, so a sequence that ends midway reports them).
    pub drafted: u32,
    pub accepted: u32,
    /// The request's predicted output (OpenAI's `prediction`), looked up
    /// before the sequence's own text, and where in it the last guess ended.
    prediction: Arc<[LlamaToken]>,
    prediction_at: usize,
}

impl Default for Drafter {
    fn default() -> Self {
        Self::with_prediction(Arc::from([]))
    }
}

impl Drafter {
    pub fn with_prediction(prediction: Arc<[LlamaToken]>) -> Self {
        Self {
            len: DRAFT_START,
            pause: 0,
            next_pause: 1,
            drafted: 0,
            accepted: 0,
            prediction,
            prediction_at: 0,
        }
    }

    /// A guess of at most `limit` tokens to follow `tokens`, whose last
    /// `generated` are the sequence's output so far: from the prediction when
    /// there is one and it matches, else from the draft `model` when there is
    /// one (it answers `None` otherwise), else from the sequence's own text;
    /// nothing when there is no match or guessing is paused.
    pub fn propose(
        &mut self,
        tokens: &[LlamaToken],
        generated: usize,
        limit: usize,
        model: impl FnOnce(&[LlamaToken], usize) -> Option<Vec<LlamaToken>>,
    ) -> Vec<LlamaToken> {
        if self.pause > 0 {
            self.pause -= 1;
            return Vec::new();
        }
        let limit = limit.min(self.len);
        if limit == 0 {
            return Vec::new();
        }
        let output = &tokens[tokens.len() - generated.min(tokens.len())..];
        if let Some(at) = self.predicted(output) {
            self.prediction_at = at;
            let end = (at + limit).min(self.prediction.len());
            return self.prediction[at..end].to_vec();
        }
        model(tokens, limit).unwrap_or_else(|| lookup(tokens, limit).to_vec())
    }

    /// Where in the prediction the output goes on: after the whole output
    /// when it is the prediction's beginning, else after the output's last
    /// [`NGRAM_MAX`]..[`NGRAM_MIN`] tokens, their first occurrence from where
    /// the last guess ended on (else their latest before it).
    fn predicted(&self, output: &[LlamaToken]) -> Option<usize> {
        let prediction = &self.prediction[..];
        if output.len() < prediction.len() && prediction.starts_with(output) {
            return Some(output.len());
        }
        for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
            if output.len() < n || prediction.len() <= n {
                continue;
            }
            let suffix = &output[output.len() - n..];
            let starts = 0..prediction.len() - n;
            let matches = |&start: &usize| &prediction[start..start + n] == suffix;
            let after = self.prediction_at.saturating_sub(n);
            if let Some(start) = starts.clone().skip(after).find(matches) {
                return Some(start + n);
            }
            if let Some(start) = starts.take(after).rev().find(matches) {
                return Some(start + n);
            }
        }
        None
    }

    /// Sizes the next guess from how many of `proposed` guessed tokens were kept: two longer after a guess that held entirely, one shorter
    /// after a partial one, and a pause (doubling, up to [`PAUSE_MAX`] steps)
    /// after one that failed at its first token.
    pub fn adapt(&mut self, proposed: usize, accepted: usize) {
        if accepted == proposed {
            self.len = (self.len + 2).min(DRAFT_MAX);
            self.next_pause = 1;
        } else if accepted == 0 {
            self.len = (self.len / 2).max(1);
            self.pause = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(PAUSE_MAX);
        } else {
            self.len = (self.len - 1).max(1);
            self.next_pause = 1;
        }
    }
}

/// The tokens that followed the most recent earlier occurrence of the longest
/// suffix of `tokens` (from [`NGRAM_MAX`] down to [`NGRAM_MIN`] tokens), at most
/// `limit` of them. A linear scan: a few tens of microseconds at 16k tokens,
/// against milliseconds per decode step, so no index is kept.
pub(crate) fn lookup(tokens: &[LlamaToken], limit: usize) -> &[LlamaToken] {
    let len = tokens.len();
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if len <= n {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest start first: recent context predicts best. A match must leave
        // at least one token after it, so it starts at most at len - n - 1.
        let found = (0..len - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            return &tokens[from..(from + limit).min(len)];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken).collect()
    }

    fn ids(tokens: &[LlamaToken]) -> Vec<i32> {
        tokens.iter().map(|t| t.0).collect()
    }

    #[test]
    fn lookup_continues_the_latest_longest_match() {
        // "5 6 7" occurs twice; the later occurrence is followed by 9 9.
        let t = toks(&[1, 5, 6, 7, 8, 8, 5, 6, 7, 9, 9, 3, 5, 6, 7]);
        assert_eq!(ids(lookup(&t, 8)), vec![9, 9, 3, 5, 6, 7]);
        assert_eq!(ids(lookup(&t, 2)), vec![9, 9]);
    }

    #[test]
    fn lookup_prefers_longer_suffixes_over_recent_short_ones() {
        // The 2-gram "3 4" occurs late (followed by 0); the 3-gram "2 3 4" early (followed by 7).
        let t = toks(&[2, 3, 4, 7, 7, 1, 3, 4, 0, 2, 3, 4]);
        assert_eq!(ids(lookup(&t, 3)), vec![7, 7, 1]);
    }

    #[test]
    fn lookup_needs_two_tokens_and_a_continuation() {
        assert!(lookup(&toks(&[1, 2, 3, 4, 5]), 4).is_empty());
        // Only the single token 1 repeats.
        assert!(lookup(&toks(&[1, 2, 1, 3, 1]), 4).is_empty());
        assert!(lookup(&toks(&[]), 4).is_empty());
        assert!(lookup(&toks(&[7, 7]), 4).is_empty());
        // A run of one token: the suffix "7 7" matched one position earlier.
        assert_eq!(ids(lookup(&toks(&[7, 7, 7]), 4)), vec![7]);
    }

    #[test]
    fn payoff_stops_guessing_that_costs_time_and_tries_again_later() {
        let mut p = Payoff::default();
        // Plain steps come first: nothing to compare guesses with yet.
        assert!(!p.allows(1));
        for _ in 0..PLAIN_SAMPLES {
            p.record(1, false, 0.010, 1);
        }
        assert!(p.allows(1));
        assert!(!p.allows(2), "each stream count has its own baseline");
        assert!(!p.allows(5), "five streams and more are never timed");
        // Guesses that yield 1.5 tokens per 3 rows' time: slower per token.
        for _ in 0..GUESSED_SAMPLES {
            assert!(p.allows(1));
            p.record(1, true, 0.030, 2);
        }
        assert_eq!(p.losses, 1);
        for _ in 0..PAYOFF_PAUSE_START {
            assert!(!p.allows(1));
        }
        assert!(p.allows(1), "tried again after the pause");
        for _ in 0..GUESSED_SAMPLES {
            p.record(1, true, 0.030, 2);
        }
        assert_eq!(p.losses, 2);
        let mut paused = 0;
        while !p.allows(1) {
            paused += 1;
        }
        assert_eq!(
            paused,
            2 * PAYOFF_PAUSE_START,
            "the second pause is twice as long"
        );
        // Guesses that pay keep going, and reset the pause.
        for _ in 0..3 * GUESSED_SAMPLES {
            assert!(p.allows(1));
            p.record(1, true, 0.012, 4);
        }
        assert_eq!(p.losses, 2);
        assert_eq!(p.next_pause, PAYOFF_PAUSE_START);
    }

    #[test]
    fn long_guesses_are_judged_by_the_tokens_they_made_not_six_steps() {
        let mut p = Payoff::default();
        for _ in 0..PLAIN_SAMPLES {
            p.record(1, false, 0.010, 1);
        }
        // A draft model's 16 guesses held, at 0.3 s a step: 17 tokens each,
        // slower per token than plain steps. Two steps make enough tokens.
        p.record(1, true, 0.300, 17);
        assert_eq!(p.losses, 0);
        p.record(1, true, 0.300, 17);
        assert_eq!(p.losses, 1);
        assert!(!p.allows(1));
    }

    #[test]
    fn a_prediction_is_guessed_from_its_start_and_resumed_after_a_divergence() {
        let prediction: Arc<[LlamaToken]> = toks(&[10, 11, 12, 13, 14, 15, 16, 17, 18, 19]).into();
        let mut d = Drafter::with_prediction(prediction);
        let prompt = toks(&[1, 2, 3]);
        // Nothing generated yet: the prediction's beginning.
        assert_eq!(
            ids(&d.propose(&prompt, 0, 100, |_, _| None)),
            vec![10, 11, 12, 13]
        );
        d.adapt(4, 4);
        let mut t = prompt.clone();
        t.extend(toks(&[10, 11, 12, 13, 14]));
        assert_eq!(
            ids(&d.propose(&t, 5, 100, |_, _| None)),
            vec![15, 16, 17, 18, 19]
        );
        // The output left the prediction ("99") and came back to it: resume
        // after the matching tokens.
        let mut t = prompt.clone();
        t.extend(toks(&[10, 11, 99, 14, 15]));
        assert_eq!(ids(&d.propose(&t, 5, 3, |_, _| None)), vec![16, 17, 18]);
        // No match in the prediction: the sequence's own text.
        let mut t = toks(&[5, 6, 7, 8, 5, 6]);
        t.extend(toks(&[42, 5, 6]));
        assert_eq!(ids(&d.propose(&t, 3, 2, |_, _| None)), vec![42, 5]);
    }

    #[test]
    fn drafts_grow_while_they_hold_and_pause_when_they_fail() {
        let mut d = Drafter::default();
        let t = toks(&(0..40).map(|i| i % 10).collect::<Vec<_>>());
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), DRAFT_START);
        d.adapt(4, 4);
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), DRAFT_START + 2);
        assert_eq!(
            d.propose(&t, 0, 3, |_, _| None).len(),
            3,
            "the caller's limit holds"
        );
        d.adapt(6, 2);
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), DRAFT_START + 1);
        // A guess wholly rejected pauses one step, the next one two.
        d.adapt(5, 0);
        assert!(d.propose(&t, 0, 100, |_, _| None).is_empty());
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), 2);
        d.adapt(2, 0);
        assert!(d.propose(&t, 0, 100, |_, _| None).is_empty());
        assert!(d.propose(&t, 0, 100, |_, _| None).is_empty());
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), 1);
        for _ in 0..20 {
            d.adapt(1, 1);
        }
        // The latest match of a repeating text continues one period; a longer
        // history gives the whole grown guess.
        assert_eq!(d.propose(&t, 0, 100, |_, _| None).len(), 10);
        let long = toks(&(0..30).chain(0..4).collect::<Vec<_>>());
        assert_eq!(d.propose(&long, 0, 100, |_, _| None).len(), DRAFT_MAX);
    }
}
