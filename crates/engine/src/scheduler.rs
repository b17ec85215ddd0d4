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

use crate::sequence::Sequence;
use crate::{EngineError, FinishReason};

/// A request handed to the scheduler thread.
pub(crate) type Admission = Sequence;

/// Counters the scheduler publishes for observers (metrics, tests).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub active: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    pub cancelled: AtomicU64,
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
                    Some(seq) => self.waiting.push_back(seq),
                    None => return,
                }
            }
            while open {
                match requests.try_recv() {
                    Ok(seq) => self.waiting.push_back(seq),
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

    /// Frees the sequences whose caller went away, before spending compute on them.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|seq| !seq.is_cancelled());
        let mut cancelled = (before - self.waiting.len()) as u64;
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
    fn admit(&mut self) {
        let any_active = self.slots.iter().any(|s| s.active.is_some());
        if self.kv_pressure && any_active {
            return;
        }
        self.kv_pressure = false;
        while let Some(seq) = self.waiting.front() {
            let Some(slot_idx) = self.best_free_slot(&seq.tokens) else {
                return;
            };
            let mut seq = self.waiting.pop_front().expect("front exists");
            let slot = &mut self.slots[slot_idx];
            let common = common_prefix(&slot.cached, &seq.tokens);
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
            slot.cached.clear();
            seq.n_past = keep;
            if !seq.started {
                seq.started = true;
                seq.cached_tokens = keep.min(seq.n_prompt) as u32;
                tracing::debug!(parent: &seq.span, slot = slot.seq_id, cached = keep, prompt = seq.n_prompt, "admitted");
            }
            slot.active = Some(seq);
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
            if seq.pending() == 1 && budget > 0 {
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
                    .is_some_and(|s| s.pending() > 1)
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

        for i in 0..self.slots.len() {
            let Some(seq) = self.slots[i].active.as_mut() else {
                continue;
            };
            seq.n_past += seq.in_batch;
            let Some(index) = seq.logits_at else { continue };
            let token = seq.sampler.sample(&self.ctx, index);
            let vocab = self.model.vocab();
            let is_eog = vocab.is_eog(token);
            let piece = if is_eog {
                Vec::new()
            } else {
                vocab.token_to_piece(token, false, None)
            };
            let mut finish = seq.accept(token, &piece, is_eog);
            if finish.is_none() && seq.tokens.len() >= self.n_ctx {
                finish = Some(FinishReason::Length);
            }
            if let Some(reason) = finish {
                let mut seq = self.slots[i].active.take().expect("active");
                seq.finish(reason);
                tracing::debug!(parent: &seq.span, ?reason, generated = seq.n_generated, "finished");
                self.release(i, seq);
            }
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
        let newest = active
            .iter()
            .copied()
            .max_by_key(|&i| self.slots[i].active.as_ref().map(|s| s.arrival));
        let Some(newest) = newest else { return };
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

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
