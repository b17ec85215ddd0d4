//! Exact nearest neighbours over a collection's embeddings, kept in memory
//! (the SQLite file is the truth; this is rebuilt from it on open).
//!
//! Written here rather than taken from an ANN crate: an exact scan of
//! L2-normalized vectors is a dot product per chunk, which the compiler
//! vectorizes; 100k chunks of 384 dimensions take a few milliseconds on two
//! cores, with perfect recall and no index to build or keep consistent.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Rows at or above this scan on two threads.
const PARALLEL_FROM: usize = 20_000;

#[derive(Debug, Default)]
pub(crate) struct DenseIndex {
    dimension: usize,
    /// Chunk ids, in row order.
    ids: Vec<i64>,
    /// Row-major vectors, `dimension` values per row.
    values: Vec<f32>,
    rows: HashMap<i64, usize>,
}

/// A candidate by score, ordered for a min-heap of the best.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored(f32, i64);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl DenseIndex {
    pub(crate) fn new(dimension: usize) -> Self {
        Self {
            dimension,
            ..Self::default()
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn insert(&mut self, id: i64, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dimension);
        if let Some(&row) = self.rows.get(&id) {
            self.values[row * self.dimension..(row + 1) * self.dimension].copy_from_slice(vector);
            return;
        }
        self.rows.insert(id, self.ids.len());
        self.ids.push(id);
        self.values.extend_from_slice(vector);
    }

    pub(crate) fn remove(&mut self, id: i64) {
        let Some(row) = self.rows.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.rows.insert(moved, row);
            let d = self.dimension;
            self.values.copy_within(last * d..(last + 1) * d, row * d);
        }
        self.ids.pop();
        self.values.truncate(last * self.dimension);
    }

    /// The vector of chunk `id`.
    pub(crate) fn vector(&self, id: i64) -> Option<&[f32]> {
        let row = *self.rows.get(&id)?;
        Some(&self.values[row * self.dimension..(row + 1) * self.dimension])
    }

    /// The `k` chunks most similar to `query` (cosine: the vectors are
    /// normalized), best first; only chunks in `allowed` when it is given.
    pub(crate) fn search(
        &self,
        query: &[f32],
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Vec<(i64, f32)> {
        if k == 0 || self.ids.is_empty() {
            return Vec::new();
        }
        let best = if self.ids.len() >= PARALLEL_FROM && allowed.is_none() {
            let middle = self.ids.len() / 2;
            let (a, b) = std::thread::scope(|scope| {
                let left = scope.spawn(|| self.scan(query, k, 0..middle, None));
                let right = self.scan(query, k, middle..self.ids.len(), None);
                (left.join().expect("the scan does not panic"), right)
            });
            let mut all = a;
            all.extend(b);
            all
        } else {
            self.scan(query, k, 0..self.ids.len(), allowed)
        };
        let mut best: Vec<(i64, f32)> = best.into_iter().map(|Scored(s, id)| (id, s)).collect();
        best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        best.truncate(k);
        best
    }

    fn scan(
        &self,
        query: &[f32],
        k: usize,
        rows: std::ops::Range<usize>,
        allowed: Option<&HashSet<i64>>,
    ) -> Vec<Scored> {
        let d = self.dimension;
        let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
        for row in rows {
            let id = self.ids[row];
            if allowed.is_some_and(|a| !a.contains(&id)) {
                continue;
            }
            let score = dot(query, &self.values[row * d..(row + 1) * d]);
            if heap.len() < k {
                heap.push(Reverse(Scored(score, id)));
            } else if heap
                .peek()
                .is_some_and(|Reverse(worst)| Scored(score, id) > *worst)
            {
                heap.pop();
                heap.push(Reverse(Scored(score, id)));
            }
        }
        heap.into_iter().map(|Reverse(s)| s).collect()
    }
}

/// The dot product, in eight running sums so the compiler vectorizes it.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normalized(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        v.into_iter().map(|x| x / n).collect()
    }

    proptest! {
        /// The index finds exactly what sorting every score finds, after any
        /// inserts and removals.
        #[test]
        fn search_equals_a_full_sort(
            vectors in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 12), 1..60),
            removed in proptest::collection::vec(0usize..60, 0..20),
            query in proptest::collection::vec(-1.0f32..1.0, 12),
            k in 1usize..10,
        ) {
            let mut index = DenseIndex::new(12);
            let mut kept: HashMap<i64, Vec<f32>> = HashMap::new();
            for (i, v) in vectors.into_iter().enumerate() {
                let v = normalized(v);
                index.insert(i as i64 * 7, &v);
                kept.insert(i as i64 * 7, v);
            }
            for r in removed {
                index.remove(r as i64 * 7);
                kept.remove(&(r as i64 * 7));
            }
            prop_assert_eq!(index.len(), kept.len());
            let mut expected: Vec<(i64, f32)> = kept.iter().map(|(&id, v)| (id, dot(&query, v))).collect();
            expected.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            expected.truncate(k);
            let found = index.search(&query, k, None);
            prop_assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), expected.iter().map(|e| e.0).collect::<Vec<_>>());
            for (id, v) in &kept {
                prop_assert_eq!(index.vector(*id).unwrap(), v.as_slice());
            }
        }
    }

    #[test]
    fn allowed_rows_limit_the_search_and_large_indexes_scan_in_parallel() {
        let mut index = DenseIndex::new(4);
        for i in 0..(PARALLEL_FROM as i64 + 10) {
            let x = (i as f32 / PARALLEL_FROM as f32).min(1.0);
            index.insert(i, &normalized(vec![x, 1.0 - x, 0.1, 0.0]));
        }
        let query = normalized(vec![1.0, 0.0, 0.0, 0.0]);
        let best = index.search(&query, 3, None);
        assert_eq!(best.len(), 3);
        assert!(best[0].1 >= best[1].1 && best[1].1 >= best[2].1);
        let allowed: HashSet<i64> = [5, 6].into();
        let only: Vec<i64> = index
            .search(&query, 3, Some(&allowed))
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(only, [6, 5]);
    }
}
