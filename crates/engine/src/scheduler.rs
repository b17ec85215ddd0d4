//! The continuous-batching loop: one OS thread per loaded model owns the llama
//! context. Every step decodes one token for each generating sequence plus chunks
//! of waiting prompts within the token budget, so a long prompt never stalls the
//! streams already running and new requests join at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use crate::sequence::Sequence;
use crate::speculation::{Payoff, TIMED_STREAMS};
use crate::{EngineError, FinishReason, TokenLogprob};

mod host_cache;
mod llama;
#[cfg(test)]
mod tests;

use host_cache::HostCache;

pub(crate) use llama::{same_vocabulary, DraftModel, LlamaDecoder};

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
    /// Speculation: guesses checked, tokens guessed, and tokens kept.
    pub verifications: AtomicU64,
    pub drafted: AtomicU64,
    pub draft_accepted: AtomicU64,
    /// Prompts that continued a prefix restored from host memory, the tokens
    /// restored, and the bytes the host cache holds.
    pub host_hits: AtomicU64,
    pub host_tokens: AtomicU64,
    pub host_bytes: AtomicUsize,
}

/// What the scheduler asks of the model: one batch under construction, the
/// decode of it, the KV cache's per-sequence operations, and drawing a token.
/// [`LlamaDecoder`] is llama.cpp; the tests drive the same scheduler with a fake.
/// The scheduler is generic over it, so every call is static (no `dyn` per token).
pub(crate) trait Decoder {
    /// KV cells of the context: also the most tokens one sequence may hold.
    fn n_ctx(&self) -> usize;
    /// Most tokens one decode takes.
    fn n_batch(&self) -> usize;
    /// Empties the batch being built.
    fn batch_clear(&mut self);
    /// Appends a token of sequence `seq_id` at position `pos`; returns its index
    /// in the batch, where its logits will be if `logits` is set.
    fn batch_add(&mut self, token: LlamaToken, pos: usize, seq_id: i32, logits: bool) -> i32;
    /// Runs the model over the batch, storing its tokens in the KV cache.
    fn decode(&mut self) -> Result<(), DecodeError>;
    /// Empties the whole KV cache.
    fn kv_clear(&mut self);
    /// Drops sequence `seq_id`'s KV from position `from` on (all of it for `None`).
    /// False when the cache could not drop that range.
    fn kv_seq_rm(&mut self, seq_id: i32, from: Option<u32>) -> bool;
    /// Copies the first `n` positions of `src`'s KV into `dst`.
    fn kv_seq_cp(&mut self, src: i32, dst: i32, n: u32);
    /// Whether sequence `seq_id`, cut back to its first `keep` positions,
    /// still holds what decoding at position `keep` attends to. False where a
    /// sliding-window cache no longer has that window: it dropped (or gave to
    /// other sequences) the cells that fell out of the window of the later
    /// positions, and a copy in host memory holds only the last window.
    fn kv_seq_resumable(&self, seq_id: i32, keep: usize) -> bool;
    /// What [`Decoder::kv_seq_save`] copies a sequence's KV into.
    type Saved;
    /// A copy of sequence `seq_id`'s KV and its size in bytes; `None` when
    /// it would take more than `max_bytes` (nothing is copied then).
    fn kv_seq_save(&mut self, seq_id: i32, max_bytes: usize) -> Option<(Self::Saved, usize)>;
    /// Puts a saved copy into the (empty) sequence `seq_id`; false when the
    /// cache has no room for it (the sequence is left empty).
    fn kv_seq_load(&mut self, seq_id: i32, saved: &Self::Saved) -> bool;
    /// At most `limit` tokens a draft model guesses to follow `tokens` in
    /// sequence `seq_id`; `None` without a draft model.
    fn guess(
        &mut self,
        _seq_id: i32,
        _tokens: &[LlamaToken],
        _limit: usize,
        _penalties: Option<&crate::sampling::Penalties>,
    ) -> Option<Vec<LlamaToken>> {
        None
    }
    /// The clock a step is timed by, to judge whether guesses pay for
    /// themselves: the wall clock, but a test decoder may count its own time.
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// Draws `seq`'s next token from the logits at `index` of the batch just
    /// decoded, with its sampler and grammar. `Ok(None)`: its grammar was
    /// already complete, so nothing more may be drawn. `Err`: constrained
    /// sampling failed.
    fn sample(&mut self, seq: &mut Sequence, index: i32) -> Result<Option<Sampled>, EngineError>;
}

/// A drawn token and what the sequence needs to know about it.
pub(crate) struct Sampled {
    pub token: LlamaToken,
    pub is_eog: bool,
    /// The token's text (empty for an end-of-generation token).
    pub piece: Vec<u8>,
    pub logprob: Option<TokenLogprob>,
    /// The grammar is complete after this token and allows nothing more.
    pub grammar_complete: bool,
}

/// One KV-cache sequence id of the shared context.
struct Slot {
    seq_id: i32,
    /// Tokens this slot's KV holds while idle (kept for prompt-prefix reuse).
    cached: Vec<LlamaToken>,
    last_used: u64,
    active: Option<Sequence>,
}

pub(crate) struct Scheduler<D: Decoder> {
    decoder: D,
    slots: Vec<Slot>,
    waiting: VecDeque<Sequence>,
    n_batch: usize,
    n_ctx: usize,
    clock: u64,
    /// Set after a preemption: admit nothing new until some sequence frees KV,
    /// or the preempted one would be re-admitted and preempted again forever.
    kv_pressure: bool,
    /// Whether sequences with a drafter may put guesses in the batch: false for
    /// the rest of the run once the KV cache could not drop a rejected guess,
    /// and for one step after a batch with guesses found no KV room.
    speculate: bool,
    skip_drafts: bool,
    /// Whether guesses have been paying for their rows (timed steps).
    payoff: Payoff,
    /// The batch being decoded: its generating sequences, and whether it
    /// is timed for `payoff`: not when it also holds prompt rows, nor when a
    /// draft model spent time on it without guessing (catching up on a prompt).
    batch_streams: usize,
    batch_timed: bool,
    /// Idle slots' prefixes saved before they were overwritten.
    host: HostCache<D::Saved>,
    stats: Arc<SchedulerStats>,
}

/// Rows of a step that guesses may fill, less [`ROWS_PER_STREAM`] for each
/// generating sequence: one stream guesses up to 16 tokens, four share 4, and
/// from five streams on the step is busy enough that guesses would cost more
/// than they save. Below that, [`Payoff`] times the steps and stops guesses
/// that cost more than they save.
const SPECULATION_ROWS: usize = 20;
const ROWS_PER_STREAM: usize = 4;
const _: () = assert!(SPECULATION_ROWS / ROWS_PER_STREAM == TIMED_STREAMS + 1);

impl<D: Decoder> Scheduler<D> {
    /// `host_bytes`: how much prompt KV may be kept in host memory (0: none).
    pub fn new(decoder: D, parallel: usize, host_bytes: usize, stats: Arc<SchedulerStats>) -> Self {
        let n_batch = decoder.n_batch();
        let n_ctx = decoder.n_ctx();
        Self {
            decoder,
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
            speculate: true,
            skip_drafts: false,
            payoff: Payoff::default(),
            batch_streams: 0,
            batch_timed: false,
            host: HostCache::new(host_bytes),
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
            self.tick();
        }
    }

    /// One round of the loop: drop the cancelled, admit, decode, publish.
    fn tick(&mut self) {
        self.drop_cancelled();
        self.admit();
        self.step();
        self.publish();
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
            if free == self.slots.len() {
                if !front.reuse_prefix {
                    // A seeded request on an idle engine starts from an empty cache: where
                    // its cells land in the KV buffer changes the order of attention's
                    // sums, and with it what a seeded sampler draws.
                    for i in 0..self.slots.len() {
                        self.save_prefix(i);
                    }
                    self.decoder.kv_clear();
                    self.slots.iter_mut().for_each(|s| s.cached.clear());
                } else if self.waiting.len() == group_size {
                    let tokens = front.tokens.clone();
                    self.spill_idle_prefixes(&tokens);
                }
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
        if follower {
            // Its prompt KV is copied from the leader once the leader has computed it;
            // until then the slot must hold nothing, in case it computes the prompt
            // itself (its leader left early) from position 0.
            self.drop_prefix(slot_idx);
            seq.awaiting_fork = true;
            seq.n_past = 0;
        } else {
            let (common, restored) = if seq.reuse_prefix {
                self.reuse(slot_idx, &seq.tokens)
            } else {
                (0, false)
            };
            // At least one token must be decoded to get logits for the next sample.
            let mut keep = common.min(seq.tokens.len() - 1);
            let seq_id = self.slots[slot_idx].seq_id;
            if keep < self.slots[slot_idx].cached.len()
                && !self.decoder.kv_seq_resumable(seq_id, keep)
            {
                // A sliding window that no longer reaches back from `keep`:
                // reusing the prefix would decode without part of it.
                keep = 0;
            }
            // Saved when more than a few tokens would be lost (a follow-up
            // whose history re-tokenizes a little differently loses only
            // its tail, not worth a copy of the whole sequence).
            if self.slots[slot_idx].cached.len() >= keep + host_cache::MIN_TOKENS {
                self.save_prefix(slot_idx);
            }
            let slot = &mut self.slots[slot_idx];
            if keep < slot.cached.len() && !self.decoder.kv_seq_rm(slot.seq_id, Some(keep as u32)) {
                // Some memory types cannot drop a partial range: start this slot afresh.
                self.decoder.kv_seq_rm(slot.seq_id, None);
                keep = 0;
            }
            seq.n_past = keep;
            if !seq.started {
                seq.cached_tokens = keep.min(seq.n_prompt) as u32;
            }
            if restored && keep > 0 {
                self.stats.host_hits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .host_tokens
                    .fetch_add(keep as u64, Ordering::Relaxed);
            }
        }
        let slot = &mut self.slots[slot_idx];
        slot.cached.clear();
        if !seq.started {
            seq.started = true;
            tracing::debug!(parent: &seq.span, slot = slot.seq_id, cached = seq.n_past, prompt = seq.n_prompt, follower, "admitted");
        }
        slot.active = Some(seq);
    }

    /// How much of `tokens` slot `slot_idx` holds, after restoring a saved
    /// prefix into it when one holds more of what the prompt can reuse (its
    /// own prefix saved first); and whether it was restored.
    fn reuse(&mut self, slot_idx: usize, tokens: &[LlamaToken]) -> (usize, bool) {
        let common = common_prefix(&self.slots[slot_idx].cached, tokens);
        let usable = common.min(tokens.len().saturating_sub(1));
        let Some(id) = self.host.find(tokens, usable) else {
            return (common, false);
        };
        // The slot's own prefix goes to host memory first, without pushing
        // out the entry it is about to make way for.
        self.host.pin(Some(id));
        self.drop_prefix(slot_idx);
        let mut loaded = self.load(slot_idx, id);
        if !loaded {
            // Room from the idle slots' prefixes (kept in host memory), as
            // computing this prompt instead would take it.
            let idle: Vec<usize> = (0..self.slots.len())
                .filter(|&i| {
                    i != slot_idx
                        && self.slots[i].active.is_none()
                        && !self.slots[i].cached.is_empty()
                })
                .collect();
            if !idle.is_empty() {
                idle.into_iter().for_each(|i| self.drop_prefix(i));
                loaded = self.load(slot_idx, id);
            }
        }
        self.host.pin(None);
        if loaded {
            (common_prefix(&self.slots[slot_idx].cached, tokens), true)
        } else {
            (0, false)
        }
    }

    /// Before an idle engine runs one request alone, moves the cached prefixes
    /// of every slot but the one it will take to host memory (when it keeps
    /// prefixes there). Attention reads every KV cell up to the highest one in
    /// use, and llama.cpp splits a lone token's attention over that span in
    /// equal parts per thread: idle prefixes there cost a lone stream up to a
    /// sixth of its speed with 16 slots (BENCHMARKS.md, 2026-12-07). Their
    /// conversations come back from host memory, a copy instead of a recompute.
    fn spill_idle_prefixes(&mut self, tokens: &[LlamaToken]) {
        if self.host.budget() == 0 {
            return;
        }
        let Some(taken) = self.best_free_slot(tokens) else {
            return;
        };
        // A saved prefix the prompt will load is not pushed out by these copies.
        let shared = common_prefix(&self.slots[taken].cached, tokens);
        let wanted = self.host.find(tokens, shared);
        self.host.pin(wanted);
        for i in 0..self.slots.len() {
            if i != taken && self.slots[i].active.is_none() && !self.slots[i].cached.is_empty() {
                self.drop_prefix(i);
            }
        }
        self.host.pin(None);
    }

    /// Loads host entry `id` into empty slot `slot_idx`, which then holds its
    /// tokens; false when the entry is gone (saving a slot's prefix needed
    /// its room) or the KV cache has no room, the slot then left empty.
    fn load(&mut self, slot_idx: usize, id: u64) -> bool {
        let seq_id = self.slots[slot_idx].seq_id;
        let Some((tokens, state)) = self.host.get(id) else {
            return false;
        };
        if self.decoder.kv_seq_load(seq_id, state) {
            self.slots[slot_idx].cached = tokens.to_vec();
            return true;
        }
        // llama.cpp clears what it loaded of it; so does this, whatever the decoder.
        self.decoder.kv_seq_rm(seq_id, None);
        false
    }

    /// Empties a slot's KV, its cached prefix kept in host memory first
    /// (where [`Self::save_prefix`] wants it).
    fn drop_prefix(&mut self, slot_idx: usize) {
        self.save_prefix(slot_idx);
        self.decoder.kv_seq_rm(self.slots[slot_idx].seq_id, None);
        self.slots[slot_idx].cached.clear();
    }

    /// Copies an idle slot's cached prefix to host memory, unless it is too
    /// short or already there.
    fn save_prefix(&mut self, slot_idx: usize) {
        let slot = &self.slots[slot_idx];
        if !self.host.wants(&slot.cached) {
            return;
        }
        let budget = self.host.budget();
        if let Some((state, bytes)) = self.decoder.kv_seq_save(slot.seq_id, budget) {
            self.host.insert(slot.cached.clone(), state, bytes);
            self.stats
                .host_bytes
                .store(self.host.bytes(), Ordering::Relaxed);
        }
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
        // Timed from the batch's making: a draft model's guesses are made there.
        let started = self.decoder.now();
        if !self.fill_batch() {
            return;
        }
        let guessed = self.has_drafts();
        match self.decoder.decode() {
            Ok(()) => {}
            Err(DecodeError::NoKvCacheSlot) if guessed => {
                // Guesses are never worth a preemption: retry without them.
                self.skip_drafts = true;
                return;
            }
            Err(DecodeError::NoKvCacheSlot) => return self.make_kv_room(),
            Err(error) => return self.fail_batch(&error.to_string()),
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);

        // Leaders that just computed their prompt, to copy to their followers.
        let mut forks = Vec::new();
        let mut produced = 0;
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
                forks.push(Fork {
                    group: group.id,
                    leader_seq: seq_id,
                    index,
                    n_prompt: seq.n_past,
                    cached: seq.cached_tokens,
                });
            }
            let drafts = std::mem::take(&mut seq.drafts);
            let drafts_at = seq.drafts_at;
            self.sample(i, index);
            produced += 1;
            if !drafts.is_empty() {
                produced += self.verify(i, &drafts, drafts_at);
            }
        }
        for fork in forks {
            self.fork_followers(&fork);
        }
        if self.batch_timed {
            let losses = self.payoff.losses;
            let secs = (self.decoder.now() - started).as_secs_f64();
            self.payoff
                .record(self.batch_streams, guessed, secs, produced);
            if self.payoff.losses > losses {
                tracing::debug!("guesses cost more than they saved: pausing speculation");
            }
        }
    }

    /// Fills the batch: one token for each generating sequence first, then
    /// prompt chunks, oldest request first, within what is left of `n_batch`.
    /// False when there is nothing to decode.
    fn fill_batch(&mut self) -> bool {
        self.decoder.batch_clear();
        let mut budget = self.n_batch;
        let generating = self
            .slots
            .iter()
            .filter_map(|s| s.active.as_ref())
            .filter(|s| s.pending() == 1 && !s.awaiting_fork)
            .count();
        let could_guess = self.speculate
            && !self.skip_drafts
            && self
                .slots
                .iter()
                .filter_map(|s| s.active.as_ref())
                .any(|s| s.drafter.is_some());
        let mut guess_rows = if could_guess && self.payoff.allows(generating) {
            SPECULATION_ROWS.saturating_sub(generating * ROWS_PER_STREAM)
        } else {
            0
        };
        self.batch_streams = generating;
        self.skip_drafts = false;
        self.batch_timed = true;
        // Generating sequences first: one token each keeps every stream moving.
        for slot in &mut self.slots {
            let Some(seq) = slot.active.as_mut() else {
                continue;
            };
            seq.in_batch = 0;
            seq.logits_at = None;
            seq.drafts.clear();
            if seq.pending() == 1 && !seq.awaiting_fork && budget > 0 {
                add(&mut self.decoder, seq, slot.seq_id, 1);
                budget -= 1;
                let rows = guess_rows.min(budget);
                let (guessed, untimed) =
                    add_drafts(&mut self.decoder, seq, slot.seq_id, self.n_ctx, rows);
                budget -= guessed;
                guess_rows -= guessed;
                self.batch_timed &= !untimed;
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
            add(&mut self.decoder, seq, slot.seq_id, take);
            budget -= take;
            self.batch_timed = false;
        }
        budget < self.n_batch
    }

    /// Gives the followers of a leader that just computed its prompt a copy of
    /// its KV, and samples their first token from the leader's logits.
    fn fork_followers(&mut self, fork: &Fork) {
        for i in 0..self.slots.len() {
            let follower_seq = self.slots[i].seq_id;
            let Some(seq) = self.slots[i].active.as_mut() else {
                continue;
            };
            if !seq.awaiting_fork || seq.group.map(|g| g.id) != Some(fork.group) {
                continue;
            }
            self.decoder.kv_seq_rm(follower_seq, None);
            // Unified KV makes partial sequence copies safe (see backend.rs).
            self.decoder
                .kv_seq_cp(fork.leader_seq, follower_seq, fork.n_prompt as u32);
            seq.awaiting_fork = false;
            self.stats.forks.fetch_add(1, Ordering::Relaxed);
            seq.n_past = fork.n_prompt;
            seq.cached_tokens = fork.cached;
            self.sample(i, fork.index);
        }
    }

    /// Samples the next token of the sequence in `slot_idx` from the logits at
    /// `index` of the batch just decoded, emits it, and ends the sequence if done.
    fn sample(&mut self, slot_idx: usize, index: i32) {
        let Some(seq) = self.slots[slot_idx].active.as_mut() else {
            return;
        };
        let drawn = match self.decoder.sample(seq, index) {
            Ok(Some(drawn)) => drawn,
            Ok(None) => {
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
        };
        let mut finish = seq.accept(drawn.token, &drawn.piece, drawn.is_eog, drawn.logprob);
        if finish.is_none() && drawn.grammar_complete {
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

    /// Checks the guesses that followed the pending token of the sequence in
    /// `slot_idx`, whose own token has just been drawn: while the token drawn
    /// equals the guess at its position, that guess's KV is what plain decoding
    /// would have computed, so the next token is drawn from the guess's logits.
    /// The KV of the guesses not kept is dropped. Returns how many were kept.
    fn verify(&mut self, slot_idx: usize, drafts: &[LlamaToken], drafts_at: i32) -> usize {
        let seq_id = self.slots[slot_idx].seq_id;
        let mut accepted = 0;
        // Positions [.., kv_end) hold KV now: the pending token's and every guess's.
        let kv_end = match self.slots[slot_idx].active.as_mut() {
            Some(seq) => {
                if let Some(drafter) = seq.drafter.as_mut() {
                    drafter.drafted += drafts.len() as u32;
                }
                seq.n_past + drafts.len()
            }
            None => self.slots[slot_idx].cached.len() + drafts.len(),
        };
        for (j, &draft) in drafts.iter().enumerate() {
            let Some(seq) = self.slots[slot_idx].active.as_mut() else {
                break;
            };
            if seq.tokens.get(seq.n_past) != Some(&draft) {
                break;
            }
            seq.n_past += 1;
            accepted += 1;
            if let Some(drafter) = seq.drafter.as_mut() {
                drafter.accepted += 1;
            }
            self.sample(slot_idx, drafts_at + j as i32);
        }
        self.stats.verifications.fetch_add(1, Ordering::Relaxed);
        self.stats
            .drafted
            .fetch_add(drafts.len() as u64, Ordering::Relaxed);
        self.stats
            .draft_accepted
            .fetch_add(accepted as u64, Ordering::Relaxed);
        let slot = &mut self.slots[slot_idx];
        let kept = match slot.active.as_mut() {
            Some(seq) => {
                if let Some(drafter) = seq.drafter.as_mut() {
                    drafter.adapt(drafts.len(), accepted);
                }
                seq.n_past
            }
            // It ended: `release` kept exactly the tokens whose KV is valid.
            None => slot.cached.len(),
        };
        if kept < kv_end && !self.decoder.kv_seq_rm(seq_id, Some(kept as u32)) {
            // This memory cannot drop part of a sequence (recurrent state): start
            // the sequence's KV afresh (it is recomputed from its tokens) and stop
            // guessing on this model.
            tracing::warn!(
                "the KV cache cannot drop rejected guesses: speculation is off for this model"
            );
            self.speculate = false;
            self.decoder.kv_seq_rm(seq_id, None);
            match slot.active.as_mut() {
                Some(seq) => seq.n_past = 0,
                None => slot.cached.clear(),
            }
        }
        accepted
    }

    fn has_drafts(&self) -> bool {
        self.slots
            .iter()
            .filter_map(|s| s.active.as_ref())
            .any(|s| !s.drafts.is_empty())
    }

    /// The KV cache is full: free the least valuable space and retry next step.
    fn make_kv_room(&mut self) {
        // First, cached prefixes of idle slots: they are only an optimisation
        // (kept in host memory where there is room).
        if let Some(idle) = (0..self.slots.len())
            .filter(|&i| self.slots[i].active.is_none() && !self.slots[i].cached.is_empty())
            .min_by_key(|&i| self.slots[i].last_used)
        {
            self.drop_prefix(idle);
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
            for &seq_id in &idle {
                self.decoder.kv_seq_rm(seq_id, None);
            }
            if idle.is_empty() || self.kv_pressure {
                self.fail_batch("the KV cache has no room for this batch");
            }
            self.kv_pressure = true;
            return;
        };
        let mut seq = self.slots[newest].active.take().expect("active");
        if active.len() > 1 && seq.reuse_prefix {
            // Kept in host memory: readmitted, it loads its KV back rather
            // than computing it again.
            self.slots[newest].cached = seq.tokens[..seq.n_past].to_vec();
        }
        self.drop_prefix(newest);
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
                self.decoder.kv_seq_rm(self.slots[i].seq_id, None);
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

/// A leader that just computed its prompt, whose KV its followers copy.
struct Fork {
    group: u64,
    leader_seq: i32,
    /// Where the leader's logits are in the batch: the followers sample from them too.
    index: i32,
    n_prompt: usize,
    cached: u32,
}

/// Appends `count` pending tokens of `seq` to the batch, asking for logits only
/// when the last pending token is included.
fn add<D: Decoder>(decoder: &mut D, seq: &mut Sequence, seq_id: i32, count: usize) {
    let start = seq.n_past;
    let complete = count == seq.pending();
    for offset in 0..count {
        let pos = start + offset;
        let last = complete && offset + 1 == count;
        let index = decoder.batch_add(seq.tokens[pos], pos, seq_id, last);
        if last {
            seq.logits_at = Some(index);
        }
    }
    seq.in_batch = count;
}

/// Appends up to `rows` guessed tokens after the pending token `add` just put
/// in the batch for `seq`, each with logits; returns how many. Guesses stop
/// short of the context's end and of the sequence's token budget (a guess past
/// the last token it may generate could never be used).
fn add_drafts<D: Decoder>(
    decoder: &mut D,
    seq: &mut Sequence,
    seq_id: i32,
    n_ctx: usize,
    rows: usize,
) -> (usize, bool) {
    // The first token of a request's choices is drawn before followers fork.
    if rows == 0 || (seq.group.is_some() && seq.n_generated == 0) {
        return (0, false);
    }
    let penalties = seq.penalties.as_ref();
    let Some(drafter) = seq.drafter.as_mut() else {
        return (0, false);
    };
    let first = seq.n_past + 1;
    let left = (seq.max_tokens - seq.n_generated) as usize;
    let limit = rows
        .min(n_ctx.saturating_sub(first + 1))
        .min(left.saturating_sub(1));
    let mut model_asked = false;
    let drafts = drafter.propose(&seq.tokens, seq.n_generated as usize, limit, |t, n| {
        let guess = decoder.guess(seq_id, t, n, penalties);
        model_asked = guess.is_some();
        guess
    });
    for (j, &token) in drafts.iter().enumerate() {
        let index = decoder.batch_add(token, first + j, seq_id, true);
        if j == 0 {
            seq.drafts_at = index;
        }
    }
    seq.drafts = drafts;
    // A draft model that decoded without guessing spent this step's time on
    // nothing the timer could weigh.
    (seq.drafts.len(), model_asked && seq.drafts.is_empty())
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
