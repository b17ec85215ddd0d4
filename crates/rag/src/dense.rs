//! Nearest neighbours over a collection's embeddings, kept in memory (the
//! SQLite file is the truth; this is rebuilt from it on open).
//!
//! Written here rather than taken from an ANN crate: a scan of L2-normalized
//! vectors is a dot product per chunk, which the compiler vectorizes, with no
//! graph to build or keep consistent. Past a few thousand chunks the scan
//! reads 8-bit codes of the vectors (a quarter of the memory traffic, which
//! bounds it) and rescores the best candidates exactly, as Qdrant's scalar
//! quantization does. Past tens of thousands it first ranks every chunk by
//! the Hamming distance of its sign bits (a 32nd of the traffic, a popcount
//! per 64 dimensions; Qdrant's binary quantization) and reads the 8-bit
//! codes of a generous shortlist only (a sixteenth of the rows).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Rows at or above this scan on two threads.
const PARALLEL_FROM: usize = 20_000;
/// Rows at or above this scan 8-bit codes first.
const QUANTIZED_FROM: usize = 4_096;
/// Candidates per result that the 8-bit scan hands to the exact rescoring.
const RESCORE_FACTOR: usize = 8;
/// Rows at or above this rank every row by sign bits before the 8-bit scan.
const BINARY_FROM: usize = 50_000;
/// The sign bits' shortlist: this many candidates per result, and at least
/// one row in `BINARY_SHORTLIST_SHARE`. Sign bits tell near from far well
/// for clustered embeddings (real text), less well among vectors that barely
/// resemble the query, where the true best can rank a few percent deep.
const BINARY_FACTOR: usize = 64;
const BINARY_SHORTLIST_SHARE: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct DenseIndex {
    dimension: usize,
    /// Chunk ids, in row order.
    ids: Vec<i64>,
    /// Row-major vectors, `dimension` values per row.
    values: Vec<f32>,
    /// The same vectors as 8-bit codes, and each row's scale (value ≈ code × scale).
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// The vectors' sign bits, `words` u64s per row.
    bits: Vec<u64>,
    rows: HashMap<i64, usize>,
}

/// A candidate by score (ties: the lower id first), ordered for a min-heap
/// of the best.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scored(pub f32, pub i64);

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

/// Keeps the best `k` in a min-heap.
pub(crate) fn push_best(heap: &mut BinaryHeap<Reverse<Scored>>, k: usize, scored: Scored) {
    if heap.len() < k {
        heap.push(Reverse(scored));
    } else if heap.peek().is_some_and(|Reverse(worst)| scored > *worst) {
        heap.pop();
        heap.push(Reverse(scored));
    }
}

/// The sign bits of a vector, 64 dimensions to a word.
fn sign_bits(vector: &[f32]) -> impl Iterator<Item = u64> + '_ {
    vector.chunks(64).map(|dims| {
        dims.iter()
            .enumerate()
            .fold(0u64, |word, (i, v)| word | (u64::from(*v > 0.0) << i))
    })
}

/// 8-bit codes of a vector and the scale that maps them back.
fn quantize(vector: &[f32]) -> (Vec<i8>, f32) {
    let max = vector.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return (vec![0; vector.len()], 0.0);
    }
    let scale = max / 127.0;
    let codes = vector.iter().map(|v| (v / scale).round() as i8).collect();
    (codes, scale)
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

    fn row(&self, row: usize) -> &[f32] {
        &self.values[row * self.dimension..(row + 1) * self.dimension]
    }

    /// u64 words of sign bits per row.
    fn words(&self) -> usize {
        self.dimension.div_ceil(64)
    }

    pub(crate) fn insert(&mut self, id: i64, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dimension);
        let (codes, scale) = quantize(vector);
        let d = self.dimension;
        let w = self.words();
        if let Some(&row) = self.rows.get(&id) {
            self.values[row * d..(row + 1) * d].copy_from_slice(vector);
            self.codes[row * d..(row + 1) * d].copy_from_slice(&codes);
            self.scales[row] = scale;
            for (word, bits) in self.bits[row * w..(row + 1) * w]
                .iter_mut()
                .zip(sign_bits(vector))
            {
                *word = bits;
            }
            return;
        }
        self.rows.insert(id, self.ids.len());
        self.ids.push(id);
        self.values.extend_from_slice(vector);
        self.codes.extend_from_slice(&codes);
        self.scales.push(scale);
        self.bits.extend(sign_bits(vector));
    }

    pub(crate) fn remove(&mut self, id: i64) {
        let Some(row) = self.rows.remove(&id) else {
            return;
        };
        let (d, w) = (self.dimension, self.words());
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.rows.insert(moved, row);
            self.values.copy_within(last * d..(last + 1) * d, row * d);
            self.codes.copy_within(last * d..(last + 1) * d, row * d);
            self.scales[row] = self.scales[last];
            self.bits.copy_within(last * w..(last + 1) * w, row * w);
        }
        self.ids.pop();
        self.values.truncate(last * d);
        self.codes.truncate(last * d);
        self.scales.pop();
        self.bits.truncate(last * w);
    }

    /// The vector of chunk `id`.
    pub(crate) fn vector(&self, id: i64) -> Option<&[f32]> {
        Some(self.row(*self.rows.get(&id)?))
    }

    /// The `k` chunks most similar to `query` (cosine: the vectors are
    /// normalized), best first, with their exact scores; only chunks in
    /// `allowed` when it is given.
    pub(crate) fn search(
        &self,
        query: &[f32],
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Vec<(i64, f32)> {
        let n = self.ids.len();
        if k == 0 || n == 0 {
            return Vec::new();
        }
        let best = if n < QUANTIZED_FROM {
            self.scan(k, 0..n, allowed, |row| dot(query, self.row(row)))
        } else {
            // The best candidates by their codes, then by their exact scores.
            let (codes, _) = quantize(query);
            let approximate = |row: usize| {
                let d = self.dimension;
                dot_codes(&codes, &self.codes[row * d..(row + 1) * d]) as f32 * self.scales[row]
            };
            let wanted = k * RESCORE_FACTOR;
            let candidates = if n >= BINARY_FROM {
                let shortlist = self.shortlist(
                    query,
                    (k * BINARY_FACTOR).max(n / BINARY_SHORTLIST_SHARE),
                    allowed,
                );
                let mut heap = BinaryHeap::with_capacity(wanted + 1);
                for row in shortlist {
                    push_best(&mut heap, wanted, Scored(approximate(row), self.ids[row]));
                }
                heap.into_iter().map(|Reverse(s)| s).collect()
            } else if n >= PARALLEL_FROM && allowed.is_none() {
                let middle = n / 2;
                std::thread::scope(|scope| {
                    let left = scope.spawn(|| self.scan(wanted, 0..middle, None, approximate));
                    let mut right = self.scan(wanted, middle..n, None, approximate);
                    right.extend(left.join().expect("the scan does not panic"));
                    right
                })
            } else {
                self.scan(wanted, 0..n, allowed, approximate)
            };
            candidates
                .into_iter()
                .map(|Scored(_, id)| Scored(dot(query, self.row(self.rows[&id])), id))
                .collect()
        };
        let mut best: Vec<(i64, f32)> = best.into_iter().map(|Scored(s, id)| (id, s)).collect();
        best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        best.truncate(k);
        best
    }

    /// The `count` rows (ties at the cut by row order) whose sign bits differ
    /// least from the query's, among `allowed` when it is given.
    fn shortlist(&self, query: &[f32], count: usize, allowed: Option<&HashSet<i64>>) -> Vec<usize> {
        let w = self.words();
        let query: Vec<u64> = sign_bits(query).collect();
        let far = u16::MAX;
        // Distances are at most the dimension: a histogram finds the cut.
        let mut counts = vec![0usize; self.dimension + 1];
        let distances: Vec<u16> = self
            .bits
            .chunks_exact(w)
            .zip(&self.ids)
            .map(|(row, id)| {
                if allowed.is_some_and(|a| !a.contains(id)) {
                    return far;
                }
                let distance: u32 = row
                    .iter()
                    .zip(&query)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum();
                counts[distance as usize] += 1;
                distance as u16
            })
            .collect();
        let mut cut = 0;
        let mut taken = 0;
        while cut < counts.len() && taken + counts[cut] <= count {
            taken += counts[cut];
            cut += 1;
        }
        // Every row nearer than the cut, and at the cut until `count`.
        let mut at_cut = count - taken;
        let cut = cut as u16;
        distances
            .iter()
            .enumerate()
            .filter(|&(_, &d)| {
                d < cut
                    || (d == cut && d != far && at_cut > 0 && {
                        at_cut -= 1;
                        true
                    })
            })
            .map(|(row, _)| row)
            .collect()
    }

    /// The best `k` of `rows` by `score`.
    fn scan(
        &self,
        k: usize,
        rows: std::ops::Range<usize>,
        allowed: Option<&HashSet<i64>>,
        score: impl Fn(usize) -> f32,
    ) -> Vec<Scored> {
        let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
        for row in rows {
            let id = self.ids[row];
            if allowed.is_some_and(|a| !a.contains(&id)) {
                continue;
            }
            push_best(&mut heap, k, Scored(score(row), id));
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

/// The dot product of two code rows, in integers (sixteen running sums).
/// Each product fits 16 bits (|-128 × 127| < 2^15), so the multiplies are
/// 16-bit lanes, twice as many per instruction as 32-bit ones.
fn dot_codes(a: &[i8], b: &[i8]) -> i32 {
    let mut sums = [0i32; 16];
    let chunks = a.len() / 16 * 16;
    for (x, y) in a[..chunks]
        .chunks_exact(16)
        .zip(b[..chunks].chunks_exact(16))
    {
        for i in 0..16 {
            sums[i] += i32::from(i16::from(x[i]) * i16::from(y[i]));
        }
    }
    let tail: i32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    sums.iter().sum::<i32>() + tail
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

    /// The search finds the best of each query and 98% of its exact top 10.
    fn assert_recall_at_10(index: &DenseIndex, queries: &[Vec<f32>]) {
        let (mut found, mut total) = (0, 0);
        for query in queries {
            let mut all: Vec<(i64, f32)> = (0..index.ids.len())
                .map(|row| (index.ids[row], dot(query, index.row(row))))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1));
            all.truncate(10);
            let got = index.search(query, 10, None);
            assert_eq!(got[0], all[0], "the best is always found");
            total += 10;
            found += got.iter().filter(|g| all.contains(g)).count();
        }
        assert!(found * 100 >= total * 98, "recall@10 {found}/{total}");
    }

    #[test]
    fn the_quantized_scan_finds_what_the_exact_scan_finds() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 20_001) as f32 / 10_000.0 - 1.0
        };
        let mut index = DenseIndex::new(384);
        for id in 0..(PARALLEL_FROM as i64 + 500) {
            index.insert(id, &normalized((0..384).map(|_| next()).collect()));
        }
        let queries: Vec<Vec<f32>> = (0..20)
            .map(|_| normalized((0..384).map(|_| next()).collect()))
            .collect();
        assert_recall_at_10(&index, &queries);
        // Removals keep codes and scales in step with the vectors.
        for id in 0..1000 {
            index.remove(id * 3);
        }
        let query = normalized((0..384).map(|_| next()).collect());
        for (id, score) in index.search(&query, 5, None) {
            assert_eq!(score, dot(&query, index.vector(id).unwrap()));
        }
    }

    #[test]
    fn the_sign_bit_shortlist_keeps_the_nearest_of_clustered_vectors() {
        // Embeddings of real text cluster by topic: vectors near one of 400
        // centres, queries near a centre, as a question is near its answers.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 20_001) as f32 / 10_000.0 - 1.0
        };
        let centres: Vec<Vec<f32>> = (0..400)
            .map(|_| normalized((0..384).map(|_| next()).collect()))
            .collect();
        let mut near = |centre: &[f32], spread: f32| {
            normalized(centre.iter().map(|c| c + spread * next()).collect())
        };
        let mut index = DenseIndex::new(384);
        for id in 0..(BINARY_FROM as i64 + 2_000) {
            index.insert(id, &near(&centres[id as usize % 400], 0.06));
        }
        let queries: Vec<Vec<f32>> = (0..30)
            .map(|q| near(&centres[q * 13 % 400], 0.04))
            .collect();
        assert_recall_at_10(&index, &queries);
        // Removals keep the bits in step; filters apply before the shortlist.
        for id in 0..3_000 {
            index.remove(id * 5);
        }
        let query = near(&centres[7], 0.04);
        for (id, score) in index.search(&query, 5, None) {
            assert_eq!(score, dot(&query, index.vector(id).unwrap()));
        }
        let allowed: HashSet<i64> = (0..400).map(|i| i * 401 + 3).collect();
        let only = index.search(&query, 5, Some(&allowed));
        assert_eq!(only.len(), 5);
        assert!(only.iter().all(|(id, _)| allowed.contains(id)));
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
