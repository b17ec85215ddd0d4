//! The continuous-batching loop: one OS thread per loaded model owns the llama
//! context. Every step decodes one token for each generating sequence plus chunks
//! of waiting prompts within the token budget, so a long prompt never stalls the
//! streams already running and new requests join at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use crate::constraint::Step;
use crate::sequence::Sequence;
use crate::{EngineError, FinishReason, TokenLogprob};

/// A request handed to the scheduler thread: its choices (one unless `n` > 1).
pub(crate) type Admission = Vec<Sequence>;

/// Counters the scheduler publishes for observers (metrics, tests).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub active: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    pub cancelled: AtomicU64,
    pub timed_out: AtomicU64,
    /// Choices that copied their prompt's KV from a sibling instead of computing it.
    pub forks: AtomicU64,
}

/// One KV-cache sequence id of the shared context.
struct Slot {
    seq_id: i32,
    /// Tokens this slot's KV holds while idle (kept for prompt-prefix reuse).
    cached: Vec<LlamaToken>,
    last_used: u64,
    active: Option<Sequence>,
}

pub(crate) struct Scheduler<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    waiting: VecDeque<Sequence>,
    n_batch: usize,
    n_ctx: usize,
    clock: u64,
    /// Set after a preemption: admit nothing new until some sequence frees KV,
    /// or the preempted one would be re-admitted and preempted again forever.
    kv_pressure: bool,
    stats: Arc<SchedulerStats>,
}

impl<'m> Scheduler<'m> {
    pub fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        parallel: usize,
        stats: Arc<SchedulerStats>,
    ) -> Self {
        let n_batch = ctx.n_batch() as usize;
        let n_ctx = ctx.n_ctx() as usize;
        Self {
            model,
            batch: LlamaBatch::new(n_batch, 1),
            ctx,
            slots: (0..parallel)
                .map(|i| Slot {
                    seq_id: i as i32,
                    cached: Vec::new(),
                    last_used: 0,
                    active: None,
                })
                .collect(),
            waiting: VecDeque::new(),
            n_batch,
            n_ctx,
            clock: 0,
            kv_pressure: false,
            stats,
        }
    }

    /// Runs until the request channel closes and all accepted work is done.
    pub fn run(mut self, mut requests: mpsc::Receiver<Admission>) {
        let mut open = true;
        loop {
            if !self.has_work() {
                if !open {
                    return;
                }
                match requests.blocking_recv() {
                    Some(group) => self.waiting.extend(group),
                    None => return,
                }
            }
            while open {
                match requests.try_recv() {
                    Ok(group) => self.waiting.extend(group),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish();
        }
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.slots.iter().any(|s| s.active.is_some())
    }

    fn publish(&self) {
        let active = self.slots.iter().filter(|s| s.active.is_some()).count();
        self.stats.active.store(active, Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Frees the sequences whose caller went away, before spending compute on
    /// them, and fails those that waited too long for their first admission.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|seq| !seq.is_cancelled());
        let mut cancelled = (before - self.waiting.len()) as u64;
        let now = std::time::Instant::now();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut seq in self.waiting.drain(..) {
            if !seq.started && seq.deadline.is_some_and(|d| now >= d) {
                let waited_secs = now.duration_since(seq.queued_at).as_secs();
                tracing::info!(parent: &seq.span, waited_secs, "timed out waiting for a slot");
                seq.fail(EngineError::QueueTimeout { waited_secs });
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            } else {
                kept.push_back(seq);
            }
        }
        self.waiting = kept;
        for i in 0..self.slots.len() {
            if self.slots[i]
                .active
                .as_ref()
                .is_some_and(Sequence::is_cancelled)
            {
                let seq = self.slots[i].active.take().expect("checked above");
                tracing::debug!(parent: &seq.span, "client went away; sequence freed");
                self.release(i, seq);
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            self.stats.cancelled.fetch_add(cancelled, Ordering::Relaxed);
        }
    }

    /// Moves waiting sequences into free slots, reusing the longest cached prefix.
    /// The choices of one request are admitted together so they can share the prompt.
    fn admit(&mut self) {
        self.release_orphaned_followers();
        let any_active = self.slots.iter().any(|s| s.active.is_some());
        if self.kv_pressure && any_active {
            return;
        }
        self.kv_pressure = false;
        while let Some(front) = self.waiting.front() {
            let group_size = match front.group {
                Some(g) if g.leader && !front.started => self
                    .waiting
                    .iter()
                    .take_while(|s| s.group.is_some_and(|h| h.id == g.id))
                    .count(),
                _ => 1,
            };
            let free = self.slots.iter().filter(|s| s.active.is_none()).count();
            if free < group_size {
                return;
            }
            if !front.reuse_prefix && free == self.slots.len() {
                // A seeded request on an idle engine starts from an empty cache: where
                // its cells land in the KV buffer changes the order of attention's
                // sums, and with it what a seeded sampler draws.
                self.ctx.clear_kv_cache();
                self.slots.iter_mut().for_each(|s| s.cached.clear());
            }
            for member in 0..group_size {
                let seq = self.waiting.pop_front().expect("counted above");
                self.admit_one(seq, member > 0);
            }
        }
    }

    fn admit_one(&mut self, mut seq: Sequence, follower: bool) {
        let slot_idx = self
            .best_free_slot(&seq.tokens)
            .expect("the caller checked for a free slot");
        let slot = &mut self.slots[slot_idx];
        if follower {
            // Its prompt KV is copied from the leader once the leader has computed it;
            // until then the slot must hold nothing, in case it computes the prompt
            // itself (its leader left early) from position 0.
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(slot.seq_id as u32), None, None);
            seq.awaiting_fork = true;
            seq.n_past = 0;
        } else {
            let common = if seq.reuse_prefix {
                common_prefix(&slot.cached, &seq.tokens)
            } else {
                0
            };
            // At least one token must be decoded to get logits for the next sample.
            let mut keep = common.min(seq.tokens.len() - 1);
            if keep < slot.cached.len()
                && self
                    .ctx
                    .clear_kv_cache_seq(Some(slot.seq_id as u32), Some(keep as u32), None)
                    .ok()
                    != Some(true)
            {
                // Some memory types cannot drop a partial range: start this slot afresh.
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(Some(slot.seq_id as u32), None, None);
                keep = 0;
            }
            seq.n_past = keep;
            if !seq.started {
                seq.cached_tokens = keep.min(seq.n_prompt) as u32;
            }
        }
        slot.cached.clear();
        if !seq.started {
            seq.started = true;
            tracing::debug!(parent: &seq.span, slot = slot.seq_id, cached = seq.n_past, prompt = seq.n_prompt, follower, "admitted");
        }
        slot.active = Some(seq);
    }

    /// A follower whose leader left before computing the prompt computes it itself.
    fn release_orphaned_followers(&mut self) {
        let forking: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|s| s.active.as_ref())
            .filter(|s| s.n_generated == 0)
            .filter_map(|s| s.group.filter(|g| g.leader).map(|g| g.id))
            .collect();
        for seq in self.slots.iter_mut().filter_map(|s| s.active.as_mut()) {
            if seq.awaiting_fork && !seq.group.is_some_and(|g| forking.contains(&g.id)) {
                seq.awaiting_fork = false;
            }
        }
    }

    /// The free slot whose cache shares the longest prefix with `tokens`; ties go
    /// to the least recently used, so hot prefixes survive longest.
    fn best_free_slot(&self, tokens: &[LlamaToken]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .max_by_key(|(_, s)| {
                (
                    common_prefix(&s.cached, tokens),
                    std::cmp::Reverse(s.last_used),
                )
            })
            .map(|(i, _)| i)
    }

    /// One forward pass for every sequence that has tokens to process.
    fn step(&mut self) {
        self.batch.clear();
        let mut budget = self.n_batch;
        // Generating sequences first: one token each keeps every stream moving.
        for slot in &mut self.slots {
            let Some(seq) = slot.active.as_mut() else {
                continue;
            };
            seq.in_batch = 0;
            seq.logits_at = None;
            if seq.pending() == 1 && !seq.awaiting_fork && budget > 0 {
                add(&mut self.batch, seq, slot.seq_id, 1);
                budget -= 1;
            }
        }
        // Then prompt chunks, oldest request first, within what is left of the budget.
        let mut prefilling: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .active
                    .as_ref()
                    .is_some_and(|s| s.pending() > 1 && !s.awaiting_fork)
            })
            .collect();
        prefilling.sort_by_key(|&i| self.slots[i].active.as_ref().map(|s| s.arrival));
        for i in prefilling {
            if budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let seq = slot.active.as_mut().expect("filtered active");
            let take = seq.pending().min(budget);
            add(&mut self.batch, seq, slot.seq_id, take);
            budget -= take;
        }
        if self.batch.n_tokens() == 0 {
            return;
        }

        match self.ctx.decode(&mut self.batch) {
            Ok(()) => {}
            Err(DecodeError::NoKvCacheSlot) => return self.make_kv_room(),
            Err(error) => return self.fail_batch(&error.to_string()),
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);

        // Leaders that just computed their prompt, to copy to their followers.
        let mut forks = Vec::new();
        for i in 0..self.slots.len() {
            let seq_id = self.slots[i].seq_id;
            let Some(seq) = self.slots[i].active.as_mut() else {
                continue;
            };
            seq.n_past += seq.in_batch;
            let Some(index) = seq.logits_at else {
                continue;
            };
            if let Some(group) = seq.group.filter(|g| g.leader && seq.n_generated == 0) {
                forks.push((group.id, seq_id, index, seq.n_past, seq.cached_tokens));
            }
            self.sample(i, index);
        }
        for (group, leader_seq, index, n_prompt, cached) in forks {
            for i in 0..self.slots.len() {
                let follower_seq = self.slots[i].seq_id;
                let Some(seq) = self.slots[i].active.as_mut() else {
                    continue;
                };
                if !seq.awaiting_fork || seq.group.map(|g| g.id) != Some(group) {
                    continue;
                }
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(Some(follower_seq as u32), None, None);
                // Unified KV makes partial sequence copies safe (see backend.rs).
                let _ = self.ctx.copy_kv_cache_seq(
                    leader_seq,
                    follower_seq,
                    Some(0),
                    Some(n_prompt as u32),
                );
                seq.awaiting_fork = false;
                self.stats.forks.fetch_add(1, Ordering::Relaxed);
                seq.n_past = n_prompt;
                seq.cached_tokens = cached;
                self.sample(i, index);
            }
        }
    }

    /// Samples the next token of the sequence in `slot_idx` from the logits at
    /// `index` of the batch just decoded, emits it, and ends the sequence if done.
    fn sample(&mut self, slot_idx: usize, index: i32) {
        let Some(seq) = self.slots[slot_idx].active.as_mut() else {
            return;
        };
        let vocab = self.model.vocab();
        let (token, complete) = match seq.constraint.as_mut().filter(|c| !c.is_waiting()) {
            None => (seq.sampler.sample(&self.ctx, index), false),
            Some(constraint) => {
                let step =
                    constraint.sample(&mut seq.sampler, self.ctx.get_logits_ith(index), |t| {
                        vocab.is_eog(t)
                    });
                match step {
                    Ok(Step {
                        token: Some(token),
                        complete,
                    }) => (token, complete),
                    Ok(Step { token: None, .. }) => {
                        let mut seq = self.slots[slot_idx].active.take().expect("active");
                        seq.finish(FinishReason::Stop);
                        self.release(slot_idx, seq);
                        return;
                    }
                    Err(error) => {
                        let mut seq = self.slots[slot_idx].active.take().expect("active");
                        tracing::warn!(parent: &seq.span, %error, "constrained sampling stopped");
                        seq.fail(error);
                        self.release(slot_idx, seq);
                        return;
                    }
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
        let mut finish = seq.accept(token, &piece, is_eog, logprob);
        if finish.is_none() && complete {
            finish = Some(FinishReason::Stop);
        }
        if finish.is_none() && seq.tokens.len() >= self.n_ctx {
            finish = Some(FinishReason::Length);
        }
        if let Some(reason) = finish {
            let mut seq = self.slots[slot_idx].active.take().expect("active");
            seq.finish(reason);
            tracing::debug!(parent: &seq.span, ?reason, generated = seq.n_generated, "finished");
            self.release(slot_idx, seq);
        }
    }

    /// The KV cache is full: free the least valuable space and retry next step.
    fn make_kv_room(&mut self) {
        // First, cached prefixes of idle slots: they are only an optimisation.
        if let Some(idle) = self
            .slots
            .iter_mut()
            .filter(|s| s.active.is_none() && !s.cached.is_empty())
            .min_by_key(|s| s.last_used)
        {
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(idle.seq_id as u32), None, None);
            idle.cached.clear();
            return;
        }
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].active.is_some())
            .collect();
        // The newest sequence that holds KV: preempting one without frees nothing.
        let newest = active
            .iter()
            .copied()
            .filter(|&i| self.slots[i].active.as_ref().is_some_and(|s| s.n_past > 0))
            .max_by_key(|&i| self.slots[i].active.as_ref().map(|s| s.arrival));
        let Some(newest) = newest else {
            // Nothing holds KV that we know of: drop whatever idle slots may still
            // hold, and if that was nothing, fail the batch rather than retry forever.
            let idle: Vec<i32> = self
                .slots
                .iter()
                .filter(|s| s.active.is_none())
                .map(|s| s.seq_id)
                .collect();
            for seq_id in &idle {
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(Some(*seq_id as u32), None, None);
            }
            if idle.is_empty() || self.kv_pressure {
                self.fail_batch("the KV cache has no room for this batch");
            }
            self.kv_pressure = true;
            return;
        };
        let mut seq = self.slots[newest].active.take().expect("active");
        let seq_id = self.slots[newest].seq_id as u32;
        let _ = self.ctx.clear_kv_cache_seq(Some(seq_id), None, None);
        self.slots[newest].cached.clear();
        if active.len() > 1 {
            // Recompute-style preemption: requeue it first in line; its tokens so far
            // are kept and re-prefilled when KV frees up.
            tracing::info!(parent: &seq.span, generated = seq.n_generated, "KV cache full: preempting the newest sequence");
            seq.n_past = 0;
            self.waiting.push_front(seq);
            self.kv_pressure = true;
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        } else if seq.n_past >= seq.n_prompt {
            // Alone and still no room: the context is simply full.
            seq.finish(FinishReason::Length);
        } else {
            seq.fail(EngineError::Inference(
                "the KV cache has no room for this prompt".to_owned(),
            ));
        }
    }

    /// A decode error other than "no KV slot": fail the sequences in the batch.
    fn fail_batch(&mut self, message: &str) {
        tracing::error!(error = message, "decode failed");
        for i in 0..self.slots.len() {
            if self.slots[i]
                .active
                .as_ref()
                .is_some_and(|s| s.in_batch > 0)
            {
                let mut seq = self.slots[i].active.take().expect("active");
                seq.fail(EngineError::Inference(message.to_owned()));
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(Some(self.slots[i].seq_id as u32), None, None);
                self.slots[i].cached.clear();
            }
        }
    }

    /// Returns a finished or cancelled sequence's slot, keeping its KV as a cached prefix.
    fn release(&mut self, slot_idx: usize, mut seq: Sequence) {
        self.clock += 1;
        self.kv_pressure = false;
        let slot = &mut self.slots[slot_idx];
        seq.tokens.truncate(seq.n_past);
        slot.cached = std::mem::take(&mut seq.tokens);
        slot.last_used = self.clock;
    }
}

/// Appends `count` pending tokens of `seq` to the batch, asking for logits only
/// when the last pending token is included.
fn add(batch: &mut LlamaBatch<'static>, seq: &mut Sequence, seq_id: i32, count: usize) {
    let start = seq.n_past;
    let complete = count == seq.pending();
    for offset in 0..count {
        let pos = start + offset;
        let last = complete && offset + 1 == count;
        batch
            .add(seq.tokens[pos], pos as i32, &[seq_id], last)
            .expect("the batch holds n_batch tokens and the budget never exceeds it");
        if last {
            seq.logits_at = Some(batch.n_tokens() - 1);
        }
    }
    seq.in_batch = count;
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

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
