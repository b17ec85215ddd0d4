//! Prompt KV kept in host memory. A slot keeps the KV of its last sequence
//! for the next prompt that starts the same way, but there are only
//! `parallel` slots: with more conversations than slots, a returning one has
//! lost its prefix and computes its whole history again. Before a slot's
//! cached prefix is overwritten, its KV is copied here (a memcpy of the
//! sequence's cells), and a prompt that continues a saved prefix further
//! than any slot's is restored from it instead of recomputed, as
//! llama-server's `--cache-ram` does.

use llama_cpp_2::token::LlamaToken;

use super::common_prefix;

/// Prefixes shorter than this are not worth an entry: recomputing them costs
/// about as much as the bookkeeping.
pub(super) const MIN_TOKENS: usize = 32;

struct Entry<S> {
    id: u64,
    tokens: Vec<LlamaToken>,
    state: S,
    bytes: usize,
    last_used: u64,
}

/// Saved prefixes, least recently used dropped first past `budget` bytes.
pub(super) struct HostCache<S> {
    entries: Vec<Entry<S>>,
    bytes: usize,
    budget: usize,
    clock: u64,
    /// An entry about to be loaded, which inserts meanwhile do not evict.
    pinned: Option<u64>,
}

impl<S> HostCache<S> {
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            budget,
            clock: 0,
            pinned: None,
        }
    }

    /// Whether `tokens` is worth saving: long enough, and not already held
    /// by an entry that covers it (which then counts as just used).
    pub fn wants(&mut self, tokens: &[LlamaToken]) -> bool {
        if self.budget == 0 || tokens.len() < MIN_TOKENS {
            return false;
        }
        let covering = self
            .entries
            .iter_mut()
            .find(|e| common_prefix(&e.tokens, tokens) == tokens.len());
        match covering {
            Some(entry) => {
                self.clock += 1;
                entry.last_used = self.clock;
                false
            }
            None => true,
        }
    }

    /// Keeps `state`, the KV of `tokens`, in place of entries it covers;
    /// nothing when it would not fit beside the pinned entry.
    pub fn insert(&mut self, tokens: Vec<LlamaToken>, state: S, bytes: usize) {
        let pinned = self
            .entries
            .iter()
            .find(|e| Some(e.id) == self.pinned)
            .map_or(0, |e| e.bytes);
        if bytes + pinned > self.budget {
            return;
        }
        let spared = self.pinned;
        self.entries.retain(|e| {
            let covered =
                Some(e.id) != spared && common_prefix(&e.tokens, &tokens) == e.tokens.len();
            if covered {
                self.bytes -= e.bytes;
            }
            !covered
        });
        while self.bytes + bytes > self.budget {
            let oldest = (0..self.entries.len())
                .filter(|&i| Some(self.entries[i].id) != spared)
                .min_by_key(|&i| self.entries[i].last_used)
                .expect("bytes beyond the pinned entry's are held by others");
            self.bytes -= self.entries.swap_remove(oldest).bytes;
        }
        self.clock += 1;
        self.bytes += bytes;
        self.entries.push(Entry {
            id: self.clock,
            tokens,
            state,
            bytes,
            last_used: self.clock,
        });
    }

    /// The entry that shares the longest prefix with `tokens`, if it shares
    /// more than `beyond` of the tokens a prompt can reuse (all but its last,
    /// which is decoded for its logits), counted as just used.
    pub fn find(&mut self, tokens: &[LlamaToken], beyond: usize) -> Option<u64> {
        let usable = tokens.len().saturating_sub(1);
        let (i, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, tokens).min(usable)))
            .max_by_key(|&(_, shared)| shared)?;
        if shared <= beyond || shared < MIN_TOKENS {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[i];
        entry.last_used = self.clock;
        Some(entry.id)
    }

    /// Keeps entry `id` (or none) from being evicted by inserts until unpinned.
    pub fn pin(&mut self, id: Option<u64>) {
        self.pinned = id;
    }

    /// Entry `id`'s tokens and state, unless it has been dropped since.
    pub fn get(&self, id: u64) -> Option<(&[LlamaToken], &S)> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| (e.tokens.as_slice(), &e.state))
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(range: std::ops::Range<i32>) -> Vec<LlamaToken> {
        range.map(LlamaToken).collect()
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_short_ones_are_not_kept() {
        let mut cache = HostCache::new(1000);
        assert!(!cache.wants(&toks(0..MIN_TOKENS as i32 - 1)));
        cache.insert(toks(0..40), "a", 10);
        cache.insert(toks(100..200), "b", 10);
        let mut prompt = toks(0..36);
        prompt.extend(toks(500..520));
        let id = cache.find(&prompt, 0).unwrap();
        let (tokens, state) = cache.get(id).unwrap();
        assert_eq!((tokens.len(), *state), (40, "a"));
        // Not when a slot already holds as much.
        assert!(cache.find(&prompt, 36).is_none());
        assert!(cache.find(&toks(1000..1100), 0).is_none());
    }

    #[test]
    fn an_entry_is_replaced_by_one_that_covers_it_and_never_saved_twice() {
        let mut cache = HostCache::new(1000);
        cache.insert(toks(0..40), "short", 10);
        assert!(!cache.wants(&toks(0..40)));
        assert!(!cache.wants(&toks(0..35)));
        assert!(cache.wants(&toks(0..60)));
        cache.insert(toks(0..60), "long", 15);
        assert_eq!(cache.bytes(), 15);
        let id = cache.find(&toks(0..50), 0).unwrap();
        assert_eq!(cache.get(id).unwrap().1, &"long");
    }

    #[test]
    fn the_least_recently_used_entries_go_first_past_the_budget() {
        let mut cache = HostCache::new(30);
        cache.insert(toks(0..40), "a", 10);
        cache.insert(toks(100..140), "b", 10);
        cache.insert(toks(200..240), "c", 10);
        // Using "a" makes "b" the oldest.
        assert!(cache.find(&toks(0..40), 0).is_some());
        cache.insert(toks(300..340), "d", 10);
        assert_eq!(cache.bytes(), 30);
        assert!(cache.find(&toks(100..140), 0).is_none());
        for kept in [0, 200, 300] {
            assert!(cache.find(&toks(kept..kept + 40), 0).is_some(), "{kept}");
        }
        // An entry larger than the whole budget is not kept, and evicts nothing.
        cache.insert(toks(400..440), "huge", 31);
        assert_eq!(cache.bytes(), 30);
        // With no budget nothing is wanted.
        assert!(!HostCache::<()>::new(0).wants(&toks(0..40)));
    }

    #[test]
    fn a_pinned_entry_is_not_evicted_and_what_does_not_fit_beside_it_is_not_kept() {
        let mut cache = HostCache::new(30);
        cache.insert(toks(0..40), "a", 20);
        let a = cache.find(&toks(0..40), 0).unwrap();
        cache.pin(Some(a));
        // "b" would need "a"'s room: it is not kept, and "a" stays.
        cache.insert(toks(100..140), "b", 15);
        assert_eq!(cache.bytes(), 20);
        assert!(cache.get(a).is_some());
        // What fits beside it evicts others, never it.
        cache.insert(toks(200..240), "c", 10);
        cache.insert(toks(300..340), "d", 10);
        assert_eq!(cache.bytes(), 30);
        assert!(cache.get(a).is_some());
        assert!(cache.find(&toks(200..240), 0).is_none());
        cache.pin(None);
        cache.insert(toks(100..140), "b", 15);
        assert!(cache.get(a).is_none(), "unpinned, it is the oldest");
    }
}
