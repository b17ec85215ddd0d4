//! The scheduler's decisions, driven through a fake [`Decoder`]: which slot a
//! request gets, what each decode step holds, what happens to the KV cache.
//! The fake checks what llama.cpp would need (a token goes at the next free
//! position of its sequence, logits are read only where they were asked for)
//! and draws scripted tokens, so every assertion is about the scheduler.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc;

use super::{Decoder, Sampled, Scheduler, SchedulerStats};
use crate::sequence::{Group, Sequence};
use crate::{EngineError, Event, FinishReason, Usage};

/// The fake's end-of-generation token.
const EOG: i32 = 2;

/// One token of a decoded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: i32,
    pos: usize,
    token: i32,
    logits: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvOp {
    Clear,
    Rm { seq: i32, from: Option<u32> },
    Cp { src: i32, dst: i32, n: u32 },
    Save { seq: i32, n: usize },
    Load { seq: i32, n: usize },
}

/// What the fake's sampler does for one draw of a sequence.
#[derive(Debug, Clone, Copy)]
enum Draw {
    Token(i32),
    /// This token completes the sequence's grammar.
    Completing(i32),
    /// The grammar was already complete.
    GrammarDone,
    /// Constrained sampling fails.
    Fail,
}

/// A fake language model: the token drawn after a sequence's KV prefix.
type Language = Box<dyn Fn(&[i32]) -> i32>;

struct Fake {
    n_ctx: usize,
    n_batch: usize,
    /// KV cells that fit: a decode that would need more fails with `NoKvCacheSlot`.
    kv_cells: usize,
    batch: Vec<Entry>,
    /// Every batch decoded, in order (failed decodes are not here).
    decoded: Vec<Vec<Entry>>,
    /// The next decode fails with this.
    fail_next: Option<DecodeError>,
    /// Tokens held per sequence id, by position. Copies count as cells of
    /// their own (llama.cpp's unified cache shares them: the fake is stricter).
    kv: HashMap<i32, Vec<i32>>,
    ops: Vec<KvOp>,
    /// Draws per sequence, by arrival; past the script a sequence draws
    /// `1000 * (arrival + 1) + tokens generated so far`.
    script: HashMap<u64, VecDeque<Draw>>,
    /// Every draw: (arrival, batch index of the logits, token).
    samples: Vec<(u64, i32, i32)>,
    /// A language model instead of the script: the token drawn at a position is
    /// a function of the sequence's KV up to and including that position.
    model: Option<Language>,
    /// The KV cache cannot drop part of a sequence (recurrent memory).
    whole_sequences_only: bool,
    /// Saved sequences find no room when loaded.
    refuse_loads: bool,
    /// What a decode takes: a fixed cost per step plus a cost per row,
    /// counted on the fake's own clock (steps are timed by it, so the
    /// payoff of guesses is judged the same however loaded the machine is).
    step_cost: Duration,
    row_cost: Duration,
    clock: Instant,
    /// A sliding attention window: positions more than this far behind a
    /// sequence's last are dropped after each decode (llama.cpp's SWA cache
    /// without `swa_full`), and `dropped` holds where each sequence's start.
    window: Option<usize>,
    dropped: HashMap<i32, usize>,
    /// Decodes refused for want of KV room (shared, to be read once the
    /// scheduler owns the fake).
    no_room: Arc<std::sync::atomic::AtomicUsize>,
}

impl Fake {
    fn new(n_batch: usize, kv_cells: usize) -> Self {
        Self {
            n_ctx: 1024,
            n_batch,
            kv_cells,
            batch: Vec::new(),
            decoded: Vec::new(),
            fail_next: None,
            kv: HashMap::new(),
            ops: Vec::new(),
            script: HashMap::new(),
            samples: Vec::new(),
            model: None,
            whole_sequences_only: false,
            refuse_loads: false,
            step_cost: Duration::ZERO,
            row_cost: Duration::ZERO,
            clock: Instant::now(),
            window: None,
            dropped: HashMap::new(),
            no_room: Arc::default(),
        }
    }

    fn cells(&self) -> usize {
        self.kv.values().map(Vec::len).sum()
    }
}

impl Decoder for Fake {
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn n_batch(&self) -> usize {
        self.n_batch
    }

    fn batch_clear(&mut self) {
        self.batch.clear();
    }

    fn batch_add(&mut self, token: LlamaToken, pos: usize, seq_id: i32, logits: bool) -> i32 {
        assert!(self.batch.len() < self.n_batch, "batch over n_batch");
        self.batch.push(Entry {
            seq: seq_id,
            pos,
            token: token.0,
            logits,
        });
        self.batch.len() as i32 - 1
    }

    fn decode(&mut self) -> Result<(), DecodeError> {
        assert!(!self.batch.is_empty(), "decode of an empty batch");
        if let Some(error) = self.fail_next.take() {
            return Err(error);
        }
        if self.cells() + self.batch.len() > self.kv_cells {
            self.no_room.fetch_add(1, Ordering::Relaxed);
            return Err(DecodeError::NoKvCacheSlot);
        }
        for e in &self.batch {
            let held = self.kv.entry(e.seq).or_default();
            assert_eq!(
                held.len(),
                e.pos,
                "sequence {} decodes position {} but holds {} positions",
                e.seq,
                e.pos,
                held.len()
            );
            held.push(e.token);
            let dropped = self.dropped.get(&e.seq).copied().unwrap_or(0);
            if let Some(window) = self.window {
                assert!(
                    dropped == 0 || dropped + window <= e.pos + 1,
                    "sequence {} decodes position {} without its window (positions below {dropped} are gone)",
                    e.seq,
                    e.pos
                );
            }
        }
        if let Some(window) = self.window {
            for (&seq, held) in &self.kv {
                let dropped = self.dropped.entry(seq).or_default();
                *dropped = (*dropped).max(held.len().saturating_sub(window));
            }
        }
        self.decoded.push(self.batch.clone());
        self.clock += self.step_cost + self.row_cost * self.batch.len() as u32;
        Ok(())
    }

    fn now(&self) -> Instant {
        self.clock
    }

    fn kv_clear(&mut self) {
        self.ops.push(KvOp::Clear);
        self.kv.clear();
        self.dropped.clear();
    }

    fn kv_seq_rm(&mut self, seq_id: i32, from: Option<u32>) -> bool {
        self.ops.push(KvOp::Rm { seq: seq_id, from });
        if self.whole_sequences_only && from.is_some_and(|f| f > 0) {
            return false;
        }
        let from = from.unwrap_or(0) as usize;
        let held = self.kv.entry(seq_id).or_default();
        held.truncate(from);
        let dropped = self.dropped.entry(seq_id).or_default();
        if from <= *dropped {
            // Nothing of the sequence is left.
            held.clear();
            *dropped = 0;
        }
        true
    }

    fn kv_seq_cp(&mut self, src: i32, dst: i32, n: u32) {
        self.ops.push(KvOp::Cp { src, dst, n });
        let copied = self.kv[&src][..n as usize].to_vec();
        let held = self.kv.entry(dst).or_default();
        assert!(held.is_empty(), "copy into sequence {dst}, which holds KV");
        *held = copied;
        let dropped = self.dropped.get(&src).copied().unwrap_or(0);
        self.dropped.insert(dst, dropped);
    }

    fn kv_seq_resumable(&self, seq_id: i32, keep: usize) -> bool {
        let dropped = self.dropped.get(&seq_id).copied().unwrap_or(0);
        dropped == 0 || self.window.is_some_and(|w| dropped + w <= keep + 1)
    }

    /// The tokens, and where the positions kept start: a copy holds the
    /// last window only, as llama.cpp's does.
    type Saved = (Vec<i32>, usize);

    fn kv_seq_save(&mut self, seq_id: i32, max_bytes: usize) -> Option<(Self::Saved, usize)> {
        let held = self.kv.get(&seq_id)?.clone();
        if held.len() * 4 > max_bytes {
            return None;
        }
        self.ops.push(KvOp::Save {
            seq: seq_id,
            n: held.len(),
        });
        let bytes = held.len() * 4;
        let dropped = self.dropped.get(&seq_id).copied().unwrap_or(0);
        let kept_from = self
            .window
            .map_or(dropped, |w| dropped.max(held.len().saturating_sub(w)));
        Some(((held, kept_from), bytes))
    }

    fn kv_seq_load(&mut self, seq_id: i32, saved: &Self::Saved) -> bool {
        let (tokens, kept_from) = saved;
        self.ops.push(KvOp::Load {
            seq: seq_id,
            n: tokens.len(),
        });
        assert!(
            self.kv.get(&seq_id).is_none_or(Vec::is_empty),
            "load into sequence {seq_id}, which holds KV"
        );
        if self.refuse_loads || self.cells() + tokens.len() > self.kv_cells {
            return false;
        }
        self.kv.insert(seq_id, tokens.clone());
        self.dropped.insert(seq_id, *kept_from);
        true
    }

    fn sample(&mut self, seq: &mut Sequence, index: i32) -> Result<Option<Sampled>, EngineError> {
        let batch = self.decoded.last().expect("a decoded batch");
        assert!(
            batch[index as usize].logits,
            "logits read at {index}, where none were asked for"
        );
        let entry = batch[index as usize];
        let draw = match &self.model {
            Some(model) => Draw::Token(model(&self.kv[&entry.seq][..=entry.pos])),
            None => self
                .script
                .get_mut(&seq.arrival)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Draw::Token(
                    1000 * (seq.arrival as i32 + 1) + seq.n_generated as i32,
                )),
        };
        let (token, grammar_complete) = match draw {
            Draw::Token(t) => (t, false),
            Draw::Completing(t) => (t, true),
            Draw::GrammarDone => return Ok(None),
            Draw::Fail => return Err(EngineError::InvalidGrammar("scripted failure".into())),
        };
        self.samples.push((seq.arrival, index, token));
        let is_eog = token == EOG;
        Ok(Some(Sampled {
            token: LlamaToken(token),
            is_eog,
            piece: if is_eog {
                Vec::new()
            } else {
                format!("<{token}>").into_bytes()
            },
            logprob: None,
            grammar_complete,
        }))
    }
}

/// The caller's end of one sequence.
struct Client(mpsc::Receiver<Event>);

/// Everything a client received: its text, and how it ended (if it has).
#[derive(Debug, PartialEq)]
struct Received {
    text: String,
    done: Option<(FinishReason, Usage)>,
    error: Option<String>,
}

impl Client {
    fn received(&mut self) -> Received {
        let mut out = Received {
            text: String::new(),
            done: None,
            error: None,
        };
        while let Ok(event) = self.0.try_recv() {
            match event {
                Event::Text { text, .. } => out.text.push_str(&text),
                Event::Done {
                    finish_reason,
                    usage,
                } => out.done = Some((finish_reason, usage)),
                Event::Error(e) => out.error = Some(format!("{e:?}")),
            }
        }
        out
    }
}

fn request(prompt: &[i32], max_tokens: u32, arrival: u64) -> (Sequence, Client) {
    let (tx, rx) = mpsc::channel(max_tokens as usize + 2);
    let seq = Sequence::new(
        prompt.iter().map(|&t| LlamaToken(t)).collect(),
        max_tokens,
        Vec::new(),
        LlamaSampler::greedy(),
        tx,
        tracing::Span::none(),
        arrival,
    );
    (seq, Client(rx))
}

/// `n` choices of one prompt, the first the leader.
fn group(prompt: &[i32], max_tokens: u32, first_arrival: u64, n: u64) -> Vec<(Sequence, Client)> {
    (0..n)
        .map(|i| {
            let (mut seq, client) = request(prompt, max_tokens, first_arrival + i);
            seq.group = Some(Group {
                id: first_arrival,
                leader: i == 0,
            });
            (seq, client)
        })
        .collect()
}

fn scheduler(parallel: usize, n_batch: usize, kv_cells: usize) -> Scheduler<Fake> {
    with_host_cache(parallel, n_batch, kv_cells, 0)
}

/// [`scheduler`], keeping up to `host_bytes` of prompt KV in host memory.
fn with_host_cache(
    parallel: usize,
    n_batch: usize,
    kv_cells: usize,
    host_bytes: usize,
) -> Scheduler<Fake> {
    Scheduler::new(
        Fake::new(n_batch, kv_cells),
        parallel,
        host_bytes,
        Arc::new(SchedulerStats::default()),
    )
}

/// The entries of `tokens` decoded for `seq` from position `first`, logits
/// asked for on the last one when `logits` is set.
fn run(seq: i32, first: usize, tokens: &[i32], logits: bool) -> Vec<Entry> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &token)| Entry {
            seq,
            pos: first + i,
            token,
            logits: logits && i + 1 == tokens.len(),
        })
        .collect()
}

fn concat(runs: &[Vec<Entry>]) -> Vec<Entry> {
    runs.concat()
}

fn tokens(range: std::ops::Range<i32>) -> Vec<i32> {
    range.collect()
}

/// Asks for one token after `prompt` in a tick of its own (the fake's
/// operations cleared first, so they are this request's); its usage.
fn ask_one(s: &mut Scheduler<Fake>, prompt: &[i32], arrival: u64) -> crate::Usage {
    let (seq, mut client) = request(prompt, 1, arrival);
    s.waiting.push_back(seq);
    s.decoder.ops.clear();
    s.tick();
    client.received().done.unwrap().1
}

#[test]
fn a_sliding_window_prefix_is_reused_only_where_its_window_is_whole() {
    let mut s = with_host_cache(1, 64, 1000, 1 << 20);
    s.decoder.window = Some(8);
    // The slot holds 50 positions, of which the window keeps the last 8.
    let a = tokens(100..150);
    ask_one(&mut s, &a, 0);
    // A prompt that shares 40 of them: cut back there, the window before
    // position 40 is gone, so the prompt is computed afresh (a fake decode
    // without its window fails the test).
    let mut b = a[..40].to_vec();
    b.extend([7, 8, 9]);
    let usage = ask_one(&mut s, &b, 1);
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (43, 0));
    // One that continues all the slot holds keeps all of it.
    let mut c = b.clone();
    c.extend([5, 6]);
    let usage = ask_one(&mut s, &c, 2);
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (45, 43));
    // The same prompt again: cut back by its last token only, whose window
    // is still there.
    let usage = ask_one(&mut s, &c, 3);
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (45, 44));

    // From host memory: the copy holds the last window only, so a prompt that
    // shares part of it is computed afresh too (and counts no hit).
    ask_one(&mut s, &tokens(200..250), 4);
    assert!(
        s.decoder.ops.contains(&KvOp::Save { seq: 0, n: 45 }),
        "{:?}",
        s.decoder.ops
    );
    let usage = ask_one(&mut s, &b, 5);
    assert!(s.decoder.ops.contains(&KvOp::Load { seq: 0, n: 45 }));
    assert_eq!(usage.cached_tokens, 0);
    assert_eq!(s.stats.host_hits.load(Ordering::Relaxed), 0);
    // While a prompt that continues it all reuses it.
    ask_one(&mut s, &tokens(300..350), 6);
    let mut d = c.clone();
    d.push(4);
    let usage = ask_one(&mut s, &d, 7);
    assert_eq!(usage.cached_tokens, 45);
    assert_eq!(s.stats.host_hits.load(Ordering::Relaxed), 1);
}

#[test]
fn a_slot_making_way_for_a_saved_prefix_does_not_push_it_out_of_host_memory() {
    // Room in host memory for one 40-token prefix (4 bytes a token), not two.
    let mut s = with_host_cache(1, 64, 1000, 240);
    let a = tokens(100..140);
    ask_one(&mut s, &a, 0);
    ask_one(&mut s, &tokens(200..240), 1);
    // a returns: the slot's own prefix cannot be kept beside a's, so it is
    // not, and a's is loaded.
    let mut follow_up = a.clone();
    follow_up.extend([7, 8]);
    let usage = ask_one(&mut s, &follow_up, 2);
    assert_eq!(usage.cached_tokens, 40);
    assert_eq!(s.stats.host_hits.load(Ordering::Relaxed), 1);
}

#[test]
fn a_prefix_overwritten_in_its_slot_returns_from_host_memory() {
    let mut s = with_host_cache(1, 64, 1000, 1 << 20);
    let a = tokens(100..140);
    ask_one(&mut s, &a, 0);
    // Another conversation takes the only slot: a's 40 tokens are saved first.
    ask_one(&mut s, &tokens(200..240), 1);
    assert_eq!(
        s.decoder.ops,
        [
            KvOp::Save { seq: 0, n: 40 },
            KvOp::Rm {
                seq: 0,
                from: Some(0)
            }
        ]
    );
    // a returns with a follow-up: its prefix is loaded (y's saved in its
    // place) and only the new tokens are computed.
    let mut follow_up = a.clone();
    follow_up.extend([7, 8]);
    let (z, mut cz) = request(&follow_up, 1, 2);
    s.waiting.push_back(z);
    s.decoder.ops.clear();
    let before = s.decoder.decoded.len();
    s.tick();
    assert_eq!(
        s.decoder.ops,
        [
            KvOp::Save { seq: 0, n: 40 },
            KvOp::Rm { seq: 0, from: None },
            KvOp::Load { seq: 0, n: 40 },
        ]
    );
    assert_eq!(s.decoder.decoded[before], run(0, 40, &[7, 8], true));
    let (_, usage) = cz.received().done.unwrap();
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (42, 40));
    assert_eq!(s.stats.host_hits.load(Ordering::Relaxed), 1);
    assert_eq!(s.stats.host_tokens.load(Ordering::Relaxed), 40);

    // Where the KV cache has no room for the saved prefix, the prompt is
    // computed as if nothing had been saved.
    let (w, mut cw) = request(&tokens(300..340), 1, 3);
    s.waiting.push_back(w);
    s.tick();
    cw.received().done.unwrap();
    s.decoder.refuse_loads = true;
    let (v, mut cv) = request(&follow_up, 1, 4);
    s.waiting.push_back(v);
    s.decoder.ops.clear();
    let before = s.decoder.decoded.len();
    s.tick();
    assert!(
        s.decoder.ops.contains(&KvOp::Load { seq: 0, n: 42 }),
        "{:?}",
        s.decoder.ops
    );
    let (_, usage) = cv.received().done.unwrap();
    assert_eq!(usage.cached_tokens, 0);
    assert!(s.decoder.decoded.len() > before);
}

#[test]
fn a_request_alone_on_an_idle_engine_moves_the_other_prefixes_to_host_memory() {
    let mut s = with_host_cache(4, 64, 1000, 1 << 20);
    let held = |s: &Scheduler<Fake>| s.decoder.kv.values().filter(|kv| !kv.is_empty()).count();
    let a = tokens(100..140);
    let b = tokens(200..240);
    ask_one(&mut s, &a, 0);
    // b arrives alone: a's 40 tokens go to host memory and leave the KV cache,
    // so b's attention spans its own cells only.
    ask_one(&mut s, &b, 1);
    assert!(
        matches!(
            s.decoder.ops[..],
            [KvOp::Save { n: 40, seq }, KvOp::Rm { seq: rm, from: None }, ..] if seq == rm
        ),
        "{:?}",
        s.decoder.ops
    );
    assert_eq!(held(&s), 1);
    // b's follow-up continues b where it is: nothing copied either way.
    let mut b2 = b.clone();
    b2.extend([7, 8]);
    let usage = ask_one(&mut s, &b2, 2);
    assert_eq!(usage.cached_tokens, 40);
    assert!(
        !s.decoder
            .ops
            .iter()
            .any(|op| matches!(op, KvOp::Save { .. } | KvOp::Load { .. })),
        "{:?}",
        s.decoder.ops
    );
    // a's follow-up comes back from host memory, b's prefix saved in turn.
    let mut a2 = a.clone();
    a2.extend([7, 8]);
    let usage = ask_one(&mut s, &a2, 3);
    assert_eq!(usage.cached_tokens, 40);
    assert_eq!(s.stats.host_hits.load(Ordering::Relaxed), 1);
    assert!(
        s.decoder
            .ops
            .iter()
            .any(|op| matches!(op, KvOp::Load { n: 40, .. })),
        "{:?}",
        s.decoder.ops
    );
    assert_eq!(held(&s), 1);

    // Without host memory the prefixes stay where they are.
    let mut s = scheduler(4, 64, 1000);
    ask_one(&mut s, &a, 0);
    ask_one(&mut s, &b, 1);
    assert_eq!(held(&s), 2);
}

#[test]
fn a_prefix_larger_than_the_host_budget_is_not_copied() {
    // 100 bytes hold 25 of the fake's 4-byte tokens: a 40-token prefix is
    // dropped as before, without a copy made only to be thrown away.
    let mut s = with_host_cache(1, 64, 1000, 100);
    for (arrival, range) in [(0, 100..140), (1, 200..240)] {
        ask_one(&mut s, &tokens(range), arrival);
    }
    assert_eq!(
        s.decoder.ops,
        [KvOp::Rm {
            seq: 0,
            from: Some(0)
        }]
    );
}

#[test]
fn admission_picks_the_longest_cached_prefix_and_breaks_ties_by_least_recent_use() {
    let mut s = scheduler(3, 64, 1000);
    let (x, mut cx) = request(&[1, 2, 3, 4], 1, 0);
    let (y, _cy) = request(&[1, 2, 9, 9], 1, 1);
    let (z, _cz) = request(&[5, 6, 7], 1, 2);
    s.waiting.extend([x, y, z]);
    s.tick();
    // All caches empty and never used: the tie goes to the last slot, so x, y,
    // z land in slots 2, 1, 0 and prefill oldest first.
    assert_eq!(
        s.decoder.decoded[0],
        concat(&[
            run(2, 0, &[1, 2, 3, 4], true),
            run(1, 0, &[1, 2, 9, 9], true),
            run(0, 0, &[5, 6, 7], true),
        ])
    );
    assert_eq!(cx.received().done.unwrap().0, FinishReason::Length);
    let cached: Vec<Vec<LlamaToken>> = s.slots.iter().map(|s| s.cached.clone()).collect();
    assert_eq!(
        cached,
        [vec![5, 6, 7], vec![1, 2, 9, 9], vec![1, 2, 3, 4]]
            .map(|v| v.into_iter().map(LlamaToken).collect::<Vec<_>>())
    );

    // [1, 2, 3] is shared with slot 2 (x), only [1, 2] with slot 1 (y).
    let (w, mut cw) = request(&[1, 2, 3, 7, 8], 1, 3);
    s.waiting.push_back(w);
    s.decoder.ops.clear();
    s.tick();
    assert_eq!(
        s.decoder.ops,
        [KvOp::Rm {
            seq: 2,
            from: Some(3)
        }]
    );
    assert_eq!(s.decoder.decoded[1], run(2, 3, &[7, 8], true));
    let (_, usage) = cw.received().done.unwrap();
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (5, 3));

    // Nothing shared anywhere: the least recently used slot (0, released
    // first) goes, not the one w just used.
    let (v, _cv) = request(&[42, 43], 1, 4);
    s.waiting.push_back(v);
    s.decoder.ops.clear();
    s.tick();
    assert_eq!(
        s.decoder.ops,
        [KvOp::Rm {
            seq: 0,
            from: Some(0)
        }]
    );
    assert_eq!(s.decoder.decoded[2], run(0, 0, &[42, 43], true));
}

#[test]
fn a_long_prompt_is_chunked_while_running_streams_get_a_token_every_step() {
    let mut s = scheduler(2, 8, 1000);
    let (a, mut ca) = request(&[1, 2, 3], 20, 0);
    s.waiting.push_back(a);
    s.tick();
    s.tick();
    assert_eq!(s.decoder.decoded[1], run(1, 3, &[1000], true));

    let prompt = tokens(100..120);
    let (b, mut cb) = request(&prompt, 2, 1);
    s.waiting.push_back(b);
    for _ in 0..4 {
        s.tick();
    }
    let d = &s.decoder.decoded;
    // a's token comes first every step; b's 20 prompt tokens fill the remaining
    // 7 of n_batch = 8, with logits asked only for the last prompt token.
    assert_eq!(
        d[2],
        concat(&[run(1, 4, &[1001], true), run(0, 0, &prompt[0..7], false)])
    );
    assert_eq!(
        d[3],
        concat(&[run(1, 5, &[1002], true), run(0, 7, &prompt[7..14], false)])
    );
    assert_eq!(
        d[4],
        concat(&[run(1, 6, &[1003], true), run(0, 14, &prompt[14..20], true)])
    );
    assert_eq!(
        d[5],
        concat(&[run(0, 20, &[2000], true), run(1, 7, &[1004], true)])
    );
    assert_eq!(cb.received().text, "<2000><2001>");
    assert_eq!(ca.received().text, "<1000><1001><1002><1003><1004><1005>");
}

#[test]
fn prompt_chunks_go_to_the_oldest_request_first() {
    let mut s = scheduler(2, 8, 1000);
    let (older, _c0) = request(&tokens(10..16), 4, 0);
    let (newer, _c1) = request(&tokens(20..26), 4, 1);
    s.waiting.extend([older, newer]);
    s.tick();
    s.tick();
    // The older request sits in slot 1, the newer in slot 0: the order is by
    // arrival, not by slot.
    assert_eq!(
        s.decoder.decoded[0],
        concat(&[
            run(1, 0, &tokens(10..16), true),
            run(0, 0, &tokens(20..22), false)
        ])
    );
    assert_eq!(
        s.decoder.decoded[1],
        concat(&[run(1, 6, &[1000], true), run(0, 2, &tokens(22..26), true)])
    );
}

#[test]
fn a_preempted_sequence_resumes_from_host_memory() {
    let mut s = with_host_cache(2, 64, 85, 1 << 20);
    let (a, mut ca) = request(&tokens(100..140), 10, 0);
    let (b, mut cb) = request(&tokens(200..240), 10, 1);
    s.waiting.extend([a, b]);
    // Both prompts and a few tokens each fill the 85 cells; then b, the
    // newer, is preempted, its KV copied to host memory first.
    let mut saved = None;
    for _ in 0..12 {
        s.decoder.ops.clear();
        s.tick();
        if s.stats.preemptions.load(Ordering::Relaxed) > 0 {
            saved = s.decoder.ops.iter().find_map(|op| match op {
                KvOp::Save { seq, n } => Some((*seq, *n)),
                _ => None,
            });
            break;
        }
    }
    let (_, n) = saved.expect("b was preempted and saved");
    assert!(n > 40, "its prompt and some output: {n}");
    let preempted_at = s.decoder.decoded.len();
    s.decoder.ops.clear();
    while s.has_work() {
        s.tick();
    }
    // Readmitted, it loads what it had and computes only what follows.
    assert!(
        s.decoder
            .ops
            .iter()
            .any(|op| matches!(op, KvOp::Load { n: m, .. } if *m == n)),
        "{:?}",
        s.decoder.ops
    );
    let recomputed = s.decoder.decoded[preempted_at..]
        .iter()
        .flatten()
        .filter(|e| e.pos < n - 1 && (200..240).contains(&e.token))
        .count();
    assert_eq!(recomputed, 0);
    assert_eq!(ca.received().done.unwrap().0, FinishReason::Length);
    let b_end = cb.received();
    assert_eq!(
        b_end.text,
        (2000..2010).map(|t| format!("<{t}>")).collect::<String>()
    );
    assert_eq!(b_end.done.unwrap().1.completion_tokens, 10);
}

#[test]
fn a_full_kv_cache_drops_idle_prefixes_then_preempts_the_newest_which_resumes_with_its_tokens() {
    let mut s = scheduler(3, 16, 12);
    let (idle, _ci) = request(&[7, 7], 1, 0);
    s.waiting.push_back(idle);
    s.tick(); // Slot 2 keeps [7, 7] cached: 2 cells.

    let (a, mut ca) = request(&[1, 2, 3, 4], 5, 1);
    let (b, mut cb) = request(&[5, 6, 7, 8], 5, 2);
    s.waiting.extend([a, b]);
    s.tick(); // a in slot 1, b in slot 0: 10 cells.
    s.tick(); // 12 cells.
    s.decoder.ops.clear();
    s.tick(); // 14 would not fit: the idle prefix goes first.
    assert_eq!(s.decoder.ops, [KvOp::Rm { seq: 2, from: None }]);
    assert_eq!(s.stats.preemptions.load(Ordering::Relaxed), 0);
    s.tick(); // 12 cells again.
    s.decoder.ops.clear();
    s.tick(); // Full, nothing idle: the newest running sequence (b) is preempted.
    assert_eq!(s.decoder.ops, [KvOp::Rm { seq: 0, from: None }]);
    assert_eq!(s.stats.preemptions.load(Ordering::Relaxed), 1);
    assert_eq!(s.waiting.front().map(|q| q.arrival), Some(2));

    // Under pressure nothing is admitted, not b and not a newcomer, though a
    // slot is free: a runs alone until it finishes.
    let (c, mut cc) = request(&[9, 9], 1, 3);
    s.waiting.push_back(c);
    let before = s.decoder.decoded.len();
    s.tick();
    s.tick();
    assert_eq!(
        s.decoder.decoded[before..],
        [run(1, 6, &[2002], true), run(1, 7, &[2003], true)]
    );
    let a_end = ca.received();
    assert_eq!(a_end.text, "<2000><2001><2002><2003><2004>");
    assert_eq!(a_end.done.unwrap().0, FinishReason::Length);

    // Then b comes back first, re-prefilling its prompt and the tokens it had
    // generated; a's cached prefix makes room for it.
    s.decoder.ops.clear();
    s.tick();
    assert_eq!(s.decoder.ops, [KvOp::Rm { seq: 1, from: None }]);
    s.tick();
    s.tick();
    let resumed = &s.decoder.decoded[before + 2];
    assert_eq!(
        *resumed,
        concat(&[
            run(0, 0, &[5, 6, 7, 8, 3000, 3001, 3002], true),
            run(2, 0, &[9, 9], true),
        ])
    );
    let b_end = cb.received();
    assert_eq!(b_end.text, "<3000><3001><3002><3003><3004>");
    let (reason, usage) = b_end.done.unwrap();
    assert_eq!(reason, FinishReason::Length);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 5));
    assert_eq!(cc.received().text, "<4000>");
}

#[test]
fn followers_copy_the_leaders_prompt_kv_and_sample_from_its_logits() {
    let mut s = scheduler(3, 16, 1000);
    let prompt = [1, 2, 3, 4, 5];
    let (seqs, mut clients): (Vec<_>, Vec<_>) = group(&prompt, 2, 0, 3).into_iter().unzip();
    s.waiting.extend(seqs);
    s.tick();
    // Only the leader (slot 2) computes the prompt.
    assert_eq!(s.decoder.decoded, [run(2, 0, &prompt, true)]);
    assert_eq!(
        s.decoder.ops,
        [
            // Admission empties the followers' slots (1 and 0)...
            KvOp::Rm { seq: 1, from: None },
            KvOp::Rm { seq: 0, from: None },
            // ...and after the leader's decode each gets a copy of its prompt.
            KvOp::Rm { seq: 0, from: None },
            KvOp::Cp {
                src: 2,
                dst: 0,
                n: 5
            },
            KvOp::Rm { seq: 1, from: None },
            KvOp::Cp {
                src: 2,
                dst: 1,
                n: 5
            },
        ]
    );
    assert_eq!(
        s.decoder.samples,
        [(0, 4, 1000), (2, 4, 3000), (1, 4, 2000)],
        "every choice drew its first token from the leader's logits"
    );
    assert_eq!(s.stats.forks.load(Ordering::Relaxed), 2);
    s.tick();
    assert_eq!(
        s.decoder.decoded[1],
        concat(&[
            run(0, 5, &[3000], true),
            run(1, 5, &[2000], true),
            run(2, 5, &[1000], true),
        ])
    );
    for (i, client) in clients.iter_mut().enumerate() {
        let first = 1000 * (i as i32 + 1);
        let got = client.received();
        assert_eq!(got.text, format!("<{first}><{}>", first + 1));
        assert_eq!(got.done.unwrap().1.prompt_tokens, 5);
    }
}

#[test]
fn a_follower_whose_leader_leaves_early_computes_the_prompt_itself() {
    let mut s = scheduler(2, 4, 1000);
    let prompt = tokens(1..11);
    let (seqs, mut clients): (Vec<_>, Vec<_>) = group(&prompt, 1, 0, 2).into_iter().unzip();
    s.waiting.extend(seqs);
    s.tick();
    assert_eq!(s.decoder.decoded, [run(1, 0, &prompt[0..4], false)]);
    drop(clients.remove(0)); // The leader's client goes away mid-prompt.
    s.tick();
    s.tick();
    s.tick();
    assert_eq!(
        s.decoder.decoded[1..],
        [
            run(0, 0, &prompt[0..4], false),
            run(0, 4, &prompt[4..8], false),
            run(0, 8, &prompt[8..10], true),
        ]
    );
    assert!(!s.decoder.ops.iter().any(|op| matches!(op, KvOp::Cp { .. })));
    assert_eq!(s.stats.forks.load(Ordering::Relaxed), 0);
    assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 1);
    let got = clients[0].received();
    assert_eq!(got.text, "<2000>");
    assert_eq!(got.done.unwrap().1.prompt_tokens, 10);
}

#[test]
fn cancelled_sequences_are_dropped_before_compute_and_keep_their_kv_as_a_prefix() {
    let mut s = scheduler(2, 16, 1000);
    let (a, _ca) = request(&[1, 2], 10, 0);
    let (b, cb) = request(&[3, 4], 10, 1);
    let (c, cc) = request(&[5, 6], 10, 2);
    s.waiting.extend([a, b, c]);
    s.tick();
    assert_eq!(s.waiting.len(), 1, "c waits for a slot");
    drop(cb); // b is running (slot 0), c is waiting.
    drop(cc);
    s.tick();
    assert_eq!(s.decoder.decoded[1], run(1, 2, &[1000], true));
    assert!(s.waiting.is_empty());
    assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 2);
    assert!(s.slots[0].active.is_none());
    assert_eq!(s.slots[0].cached, [LlamaToken(3), LlamaToken(4)]);
    assert_eq!(s.decoder.kv[&0], [3, 4], "a released slot keeps its KV");
    assert!(s.decoder.ops.is_empty());
    assert!(!s.decoder.decoded.concat().iter().any(|e| e.token == 5));
}

#[test]
fn a_request_that_waits_past_its_deadline_fails_with_queue_timeout() {
    let mut s = scheduler(1, 16, 1000);
    let (a, _ca) = request(&[1, 2], 10, 0);
    let (mut late, mut c_late) = request(&[3, 4], 10, 1);
    late.deadline = Some(Instant::now());
    late.queued_at = Instant::now() - Duration::from_secs(7);
    let (mut patient, mut c_patient) = request(&[5, 6], 10, 2);
    patient.deadline = Some(Instant::now() + Duration::from_secs(3600));
    // A sequence already admitted once (preempted since) never times out.
    let (mut resumed, mut c_resumed) = request(&[7, 8], 10, 3);
    resumed.deadline = Some(Instant::now());
    resumed.started = true;
    s.waiting.extend([a, late, patient, resumed]);
    s.tick();
    let got = c_late.received();
    assert_eq!(
        got.error.as_deref(),
        Some("QueueTimeout { waited_secs: 7 }")
    );
    assert!(got.done.is_none() && got.text.is_empty());
    assert_eq!(s.stats.timed_out.load(Ordering::Relaxed), 1);
    let waiting: Vec<u64> = s.waiting.iter().map(|q| q.arrival).collect();
    assert_eq!(waiting, [2, 3]);
    assert_eq!(c_patient.received().error, None);
    assert_eq!(c_resumed.received().error, None);
}

#[test]
fn a_completed_grammar_or_an_end_token_ends_the_sequence_and_a_failed_one_fails_it() {
    let mut s = scheduler(4, 64, 1000);
    let script = [
        (0, vec![Draw::Token(5), Draw::Completing(6)]),
        (1, vec![Draw::Token(7), Draw::GrammarDone]),
        (2, vec![Draw::Fail]),
        (3, vec![Draw::Token(8), Draw::Token(EOG)]),
    ];
    let mut clients = Vec::new();
    for (arrival, draws) in script {
        s.decoder.script.insert(arrival, draws.into());
        let (seq, client) = request(&[10 + arrival as i32, 20], 50, arrival);
        s.waiting.push_back(seq);
        clients.push(client);
    }
    s.tick();
    s.tick();
    assert!(s.slots.iter().all(|slot| slot.active.is_none()));
    let ends: Vec<Received> = clients.iter_mut().map(Client::received).collect();
    let stop = |completion_tokens| {
        Some((
            FinishReason::Stop,
            Usage {
                prompt_tokens: 2,
                completion_tokens,
                cached_tokens: 0,
                ..Usage::default()
            },
        ))
    };
    assert_eq!(ends[0].text, "<5><6>");
    assert_eq!(ends[0].done, stop(2));
    assert_eq!(ends[1].text, "<7>");
    assert_eq!(ends[1].done, stop(1));
    assert_eq!(ends[2].done, None);
    assert_eq!(
        ends[2].error.as_deref(),
        Some(r#"InvalidGrammar("scripted failure")"#)
    );
    assert_eq!(ends[3].text, "<8>");
    assert_eq!(ends[3].done, stop(1));
}

#[test]
fn a_failed_decode_fails_the_sequences_in_the_batch_and_drops_their_kv() {
    let mut s = scheduler(2, 16, 1000);
    let (a, mut ca) = request(&[1, 2], 10, 0);
    s.waiting.push_back(a);
    s.tick();
    s.decoder.fail_next = Some(DecodeError::Unknown(-3));
    let (b, mut cb) = request(&[3, 4], 10, 1);
    s.waiting.push_back(b);
    s.tick();
    for client in [&mut ca, &mut cb] {
        let got = client.received();
        assert!(
            got.error
                .as_deref()
                .is_some_and(|e| e.starts_with("Inference(\"Decode Error -3")),
            "{got:?}"
        );
    }
    assert_eq!(
        s.decoder.ops,
        [
            KvOp::Rm { seq: 0, from: None },
            KvOp::Rm { seq: 1, from: None }
        ]
    );
    assert!(s
        .slots
        .iter()
        .all(|slot| slot.active.is_none() && slot.cached.is_empty()));
}

/// A small deterministic language over tokens 3..=10: the next token follows
/// from the last two, except at positions where `seed` says otherwise (so
/// guesses copied from earlier text are sometimes wrong), and now and then it
/// is the end token.
fn language(seed: u64) -> Language {
    let mix = |mut x: u64| {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
        x ^= x >> 33;
        x
    };
    Box::new(move |prefix: &[i32]| {
        let n = prefix.len();
        let last = prefix[n - 1] as u64;
        let before = if n > 1 { prefix[n - 2] as u64 } else { 0 };
        let h = mix(seed ^ last.wrapping_mul(31) ^ before.wrapping_mul(1009));
        if h % 61 == 0 {
            EOG
        } else if mix(seed.wrapping_add(n as u64)) % 5 == 0 {
            3 + ((h >> 8) % 8) as i32
        } else {
            3 + (h % 8) as i32
        }
    })
}

/// Runs `requests` (prompt, max tokens, stop strings) to the end on a fake
/// model speaking `language(seed)`, with guesses or without; returns what each
/// client got and the scheduler's counters.
fn speak(
    seed: u64,
    parallel: usize,
    kv_cells: usize,
    requests: &[(Vec<i32>, u32, Vec<String>)],
    guess: bool,
    setup: impl FnOnce(&mut Fake),
) -> (Vec<Received>, Arc<SchedulerStats>) {
    let stats = Arc::new(SchedulerStats::default());
    let mut fake = Fake::new(64, kv_cells);
    fake.model = Some(language(seed));
    setup(&mut fake);
    let mut s = Scheduler::new(fake, parallel, 0, stats.clone());
    let mut clients = Vec::new();
    for (arrival, (prompt, max_tokens, stops)) in requests.iter().enumerate() {
        let (tx, rx) = mpsc::channel(*max_tokens as usize + 2);
        let mut seq = Sequence::new(
            prompt.iter().map(|&t| LlamaToken(t)).collect(),
            *max_tokens,
            stops.clone(),
            LlamaSampler::greedy(),
            tx,
            tracing::Span::none(),
            arrival as u64,
        );
        if guess {
            seq.drafter = Some(crate::speculation::Drafter::default());
        }
        s.waiting.push_back(seq);
        clients.push(Client(rx));
    }
    let mut ticks = 0;
    while s.has_work() {
        s.tick();
        ticks += 1;
        assert!(ticks < 10_000, "the scheduler does not finish");
    }
    let received = clients.iter_mut().map(Client::received).collect();
    (received, stats)
}

/// What must not change with guessing: the text, how it ended, the token counts.
fn outcome(received: &[Received]) -> Vec<(String, Option<FinishReason>, Option<u32>)> {
    received
        .iter()
        .map(|r| {
            assert_eq!(r.error, None);
            (
                r.text.clone(),
                r.done.map(|(finish, _)| finish),
                r.done.map(|(_, usage)| usage.completion_tokens),
            )
        })
        .collect()
}

#[test]
fn guesses_from_the_sequences_own_text_save_steps_and_change_no_token() {
    // A prompt that states a passage the answer repeats.
    let passage: Vec<i32> = (0..30).map(|i| 3 + (i % 8)).collect();
    let requests = vec![(passage, 120, Vec::new())];
    // A language that is one fixed cycle, so earlier text predicts the rest.
    let cycle = |prefix: &[i32]| 3 + (prefix[prefix.len() - 1] - 3 + 1) % 8;
    // Steps that cost about the same whatever their rows (weights streamed
    // from memory): guesses pay.
    let run = |guess| {
        speak(0, 1, 1000, &requests, guess, |fake| {
            fake.model = Some(Box::new(cycle));
            fake.step_cost = Duration::from_millis(2);
            fake.row_cost = Duration::from_micros(20);
        })
    };
    let (plain, plain_stats) = run(false);
    let (guessed, stats) = run(true);
    assert_eq!(outcome(&guessed), outcome(&plain));
    assert_eq!(outcome(&plain)[0].2, Some(120));
    let steps = |s: &SchedulerStats| s.steps.load(Ordering::Relaxed);
    assert_eq!(
        steps(&plain_stats),
        120,
        "one step per token, the first with the prompt"
    );
    // Each step checks up to one period of the cycle (8 tokens) after its own.
    assert!(steps(&stats) <= 20, "{} steps with guesses", steps(&stats));
    let accepted = stats.draft_accepted.load(Ordering::Relaxed);
    assert!(accepted >= 100, "{accepted} accepted");
    let usage = guessed[0].done.unwrap().1;
    assert_eq!(usage.accepted_draft_tokens as u64, accepted);
    assert_eq!(
        usage.draft_tokens as u64,
        stats.drafted.load(Ordering::Relaxed)
    );
    assert_eq!(plain[0].done.unwrap().1.draft_tokens, 0);
}

#[test]
fn a_batch_of_guesses_without_kv_room_is_retried_without_them_and_preempts_nobody() {
    let prompt: Vec<i32> = (0..12).map(|i| 3 + (i % 4)).collect();
    let requests = vec![
        (prompt.clone(), 30, Vec::new()),
        (prompt[2..].to_vec(), 60, Vec::new()),
    ];
    // A cycle that guesses always predict. Room for the second sequence's
    // tokens (70) once the first's idle prefix (42) is dropped, which a
    // batch that finds no room first does; guesses on top find none sooner.
    let run = |guess| {
        let refused = Arc::default();
        let (received, stats) = speak(7, 2, 90, &requests, guess, |fake| {
            fake.model = Some(Box::new(|p: &[i32]| 3 + (p[p.len() - 1] - 3 + 1) % 4));
            fake.step_cost = Duration::from_micros(500);
            fake.no_room = Arc::clone(&refused);
        });
        (received, stats, refused.load(Ordering::Relaxed))
    };
    let (plain, _, plain_refused) = run(false);
    let (guessed, stats, refused) = run(true);
    assert_eq!(outcome(&guessed), outcome(&plain));
    assert_eq!(outcome(&plain)[1].2, Some(60));
    assert!(plain_refused > 0, "the idle prefix made way");
    assert!(refused > plain_refused, "batches of guesses found no room");
    assert_eq!(stats.preemptions.load(Ordering::Relaxed), 0);
    assert!(
        stats.draft_accepted.load(Ordering::Relaxed) > 0,
        "it guessed"
    );
}

#[test]
fn guesses_that_cost_more_than_they_save_are_paused() {
    // A model whose tokens depend on the position only, so earlier text
    // predicts some guesses and not others. Every row costs as much as a step (a small model on
    // few cores), so guessing only loses.
    let mix = |n: usize| (n as u64).wrapping_mul(0x9e3779b97f4a7c15) >> 61;
    let noise = move |prefix: &[i32]| 3 + mix(prefix.len()) as i32;
    let prompt: Vec<i32> = (0..40).map(|i| 3 + mix(i) as i32).collect();
    let requests = vec![(prompt, 300, Vec::new())];
    let run = |guess| {
        speak(0, 1, 1000, &requests, guess, |fake| {
            fake.model = Some(Box::new(noise));
            fake.row_cost = Duration::from_micros(500);
        })
    };
    let (plain, plain_stats) = run(false);
    let (guessed, stats) = run(true);
    assert_eq!(outcome(&guessed), outcome(&plain));
    let steps = |s: &SchedulerStats| s.steps.load(Ordering::Relaxed);
    let verifications = stats.verifications.load(Ordering::Relaxed);
    // Six timed steps with guesses, a pause of 64, six more, a pause of 128...
    // (24 in all); without the pauses it would be near 300.
    assert!(verifications <= 24, "{verifications} steps with guesses");
    assert!(verifications >= 6, "{verifications}: it tried");
    assert!(steps(&stats) <= steps(&plain_stats));
}

#[test]
fn a_cache_that_cannot_drop_rejected_guesses_turns_guessing_off_and_recomputes() {
    let prompt: Vec<i32> = (0..16).map(|i| 3 + (i * 3 % 5)).collect();
    let requests = vec![(prompt, 60, Vec::new())];
    let (plain, _) = speak(11, 1, 1000, &requests, false, |_| {});
    let (guessed, stats) = speak(11, 1, 1000, &requests, true, |fake| {
        fake.whole_sequences_only = true;
    });
    assert_eq!(outcome(&guessed), outcome(&plain));
    // Guesses were checked once (and one was rejected), never again.
    assert_eq!(stats.verifications.load(Ordering::Relaxed), 1);
}

mod guessing {
    use proptest::prelude::*;

    use super::*;

    fn requests() -> impl Strategy<Value = Vec<(Vec<i32>, u32, Vec<String>)>> {
        let stops = prop::collection::vec((3..=10i32, 3..=10i32), 0..=1).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(a, b)| format!("<{a}><{b}>"))
                .collect::<Vec<_>>()
        });
        let one = (prop::collection::vec(3..=10i32, 1..24), 1..60u32, stops);
        prop::collection::vec(one, 1..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any prompts, budgets, stop strings and slot counts: the same text,
        /// end and token count with guesses as without, and the fake's KV
        /// checks (each position written once, in order) hold throughout.
        #[test]
        fn greedy_output_never_changes(
            seed in any::<u64>(),
            parallel in 1..4usize,
            requests in requests(),
        ) {
            let (plain, _) = speak(seed, parallel, 4000, &requests, false, |_| {});
            let (guessed, _) = speak(seed, parallel, 4000, &requests, true, |_| {});
            prop_assert_eq!(outcome(&guessed), outcome(&plain));
        }
    }
}
