//! The store alone, at scale: writes N synthetic chunks (384-dimensional
//! random unit vectors, texts of words drawn from a skewed 5,000-word
//! vocabulary), then times dense, sparse and hybrid searches of 200 queries
//! and reports the resident memory the collection added.
//!
//!     cargo run --release -p rag --example store_bench -- 10000 100000
//!
//! Query embedding is not in these times (the server's encoder computes it);
//! `scripts/bench/rag_quality.py` measures searches end to end.

use std::time::Instant;

use rag::{
    BoxFuture, Encoded, Encoder, EncoderInfo, Library, Mode, NewDocument, RagError, SearchOptions,
    Storage, Want,
};

const DIMENSION: usize = 384;
const VOCABULARY: u64 = 5_000;

/// Deterministic vectors from the text: a stand-in encoder for the store's sake.
struct Synthetic(EncoderInfo);

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn unit_vector(seed: u64) -> Vec<f32> {
    let mut next = rng(seed);
    let mut v: Vec<f32> = (0..DIMENSION)
        .map(|_| (next() % 20_001) as f32 / 10_000.0 - 1.0)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Words with a skewed frequency (low ids common), as natural text has.
fn words(seed: u64, n: usize) -> String {
    let mut next = rng(seed);
    (0..n)
        .map(|_| {
            let a = next() % VOCABULARY;
            let b = next() % VOCABULARY;
            format!("w{}", a.min(b))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Encoder for Synthetic {
    fn info(&self) -> &EncoderInfo {
        &self.0
    }

    fn count_tokens(&self, text: &str) -> usize {
        text.split_whitespace().count()
    }

    fn token_ids(&self, text: &str) -> Vec<u32> {
        text.split_whitespace()
            .map(|w| w.trim_start_matches('w').parse().unwrap_or(0))
            .collect()
    }

    fn encode<'a>(
        &'a self,
        texts: &'a [String],
        _: Want,
    ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>> {
        Box::pin(async move {
            Ok(texts
                .iter()
                .map(|t| Encoded {
                    dense: unit_vector(hash(t)),
                    ..Encoded::default()
                })
                .collect())
        })
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The exact top 3 documents of each query by brute force, to report the
/// dense search's recall.
fn exact_top3(n: usize) -> Vec<Vec<usize>> {
    let vectors: Vec<Vec<f32>> = (0..n)
        .map(|i| unit_vector(hash(&words(i as u64 + 1, 60))))
        .collect();
    (0..200u64)
        .map(|q| {
            let query = unit_vector(hash(&words(1_000_000 + q, 8)));
            let mut scores: Vec<(usize, f32)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v.iter().zip(&query).map(|(a, b)| a * b).sum()))
                .collect();
            scores.sort_by(|a, b| b.1.total_cmp(&a.1));
            scores.iter().take(3).map(|s| s.0).collect()
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000]
    } else {
        sizes
    };
    let encoder = Synthetic(EncoderInfo {
        model: "synthetic".into(),
        dimension: DIMENSION,
        sparse_head: false,
        colbert_head: false,
        max_tokens: 512,
    });
    let size = rag::chunk::ChunkSize::new(256, 0).unwrap();
    println!(
        "| chunks | mode | search p50 ms | p95 ms | dense recall@3 | write chunks/s | RSS added MiB | file MiB | reopen s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let library = Library::open(&Storage::Disk(dir.path().to_owned())).unwrap();
        let rss_before = rss_kib();
        let started = Instant::now();
        for batch in 0..n.div_ceil(1000) {
            let documents = (0..1000.min(n - batch * 1000))
                .map(|i| NewDocument {
                    id: None,
                    text: words((batch * 1000 + i) as u64 + 1, 60),
                    metadata: Default::default(),
                    markdown: false,
                })
                .collect();
            library
                .ingest("bench", &encoder, documents, size, &|_| {})
                .await
                .unwrap();
        }
        let write_rate = n as f64 / started.elapsed().as_secs_f64();
        let rss_added = (rss_kib().saturating_sub(rss_before)) as f64 / 1024.0;
        let file = std::fs::metadata(dir.path().join("bench.sqlite")).map_or(0, |m| m.len()) as f64
            / (1024.0 * 1024.0);
        let exact = exact_top3(n);
        // Opening again rebuilds the in-memory indexes from the file.
        drop(library);
        let started = Instant::now();
        let library = Library::open(&Storage::Disk(dir.path().to_owned())).unwrap();
        let reopen = started.elapsed().as_secs_f64();
        for mode in [Mode::Dense, Mode::Sparse, Mode::Hybrid] {
            let options = SearchOptions {
                top_k: 3,
                score_threshold: None,
                filter: None,
                mode,
                rerank: false,
            };
            let mut times = Vec::new();
            let mut recalled = 0;
            for q in 0..200u64 {
                let query = words(1_000_000 + q, 8);
                let t = Instant::now();
                let hits = library
                    .search("bench", &encoder, None, &query, &options)
                    .await
                    .unwrap();
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                assert!(!hits.is_empty());
                recalled += exact[q as usize]
                    .iter()
                    .filter(|&&i| hits.iter().any(|h| h.text == words(i as u64 + 1, 60)))
                    .count();
            }
            let recall = if mode == Mode::Dense {
                format!("{:.3}", recalled as f64 / 600.0)
            } else {
                "".into()
            };
            times.sort_by(f64::total_cmp);
            println!(
                "| {n} | {mode:?} | {:.2} | {:.2} | {recall} | {write_rate:.0} | {rss_added:.0} | {file:.0} | {reopen:.1} |",
                percentile(&times, 0.5),
                percentile(&times, 0.95)
            );
        }
    }
}
