//! Finding chunks: exact dense search and sparse search (BM25, or the model's
//! lexical weights), fused by reciprocal rank fusion, with ColBERT MaxSim
//! rescoring of the fused candidates when the collection has those vectors.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dense::dot;
use crate::{Collection, Encoded, Filter, RagError, Sparse};

/// Which retrieval ranks the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Dense and sparse fused by reciprocal rank fusion (with ColBERT
    /// rescoring when the model has the head).
    #[default]
    Hybrid,
    /// Cosine similarity of the embeddings.
    Dense,
    /// Term weights: BM25, or the model's lexical weights.
    Sparse,
}

#[derive(Debug, Clone)]
pub struct SearchOptions {
    pub top_k: usize,
    /// The least relevance a hit must have: the reranker's (0..1) when
    /// reranked, else the cosine similarity of its embedding (dense and
    /// hybrid); not applied to sparse-only search, whose scores have no scale.
    pub score_threshold: Option<f32>,
    pub filter: Option<Filter>,
    pub mode: Mode,
    /// Rescore the candidates with the reranker.
    pub rerank: bool,
}

/// A chunk found for a query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// The chunk's id.
    pub id: String,
    pub document_id: String,
    /// The chunk's position in its document.
    pub chunk: u64,
    pub text: String,
    /// The ranking's score: the reranker's relevance (0..1) when reranked;
    /// else cosine similarity (dense), the fused rank score (hybrid), the
    /// ColBERT MaxSim score (hybrid with ColBERT), or the term score (sparse).
    pub score: f32,
    /// Cosine similarity of the chunk's embedding to the query's.
    pub similarity: Option<f32>,
    pub metadata: Value,
}

/// Rank fusion's constant (Cormack et al.): ranks deep in either list still count.
const RRF_K: f32 = 60.0;

/// How many candidates to fetch before thresholds and reranking cut them.
pub(crate) fn candidates(options: &SearchOptions) -> usize {
    let k = options.top_k.max(1);
    if options.rerank {
        (k * 4).clamp(20, 100)
    } else {
        (k * 2).clamp(10, 100)
    }
}

/// Reciprocal rank fusion of ranked lists: each id scores the sum of
/// 1 / (k + rank) over the lists it is in; best first.
pub(crate) fn fuse(lists: &[Vec<(i64, f32)>]) -> Vec<(i64, f32)> {
    let mut scores: HashMap<i64, f32> = HashMap::new();
    for list in lists {
        for (rank, (id, _)) in list.iter().enumerate() {
            *scores.entry(*id).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
        }
    }
    let mut fused: Vec<(i64, f32)> = scores.into_iter().collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    fused
}

/// ColBERT late interaction: for each query vector its best match among the
/// chunk's, averaged over the query's vectors.
fn max_sim(query: &[Vec<f32>], chunk: &[Vec<f32>]) -> f32 {
    if query.is_empty() || chunk.is_empty() {
        return 0.0;
    }
    let total: f32 = query
        .iter()
        .map(|q| chunk.iter().map(|c| dot(q, c)).fold(f32::MIN, f32::max))
        .sum();
    total / query.len() as f32
}

impl Collection {
    /// The best `limit` chunks for an encoded query, by `mode`, best first.
    pub(crate) fn search_points(
        &self,
        query_text: &str,
        query: &Encoded,
        mode: Mode,
        filter: Option<&Filter>,
        limit: usize,
    ) -> Result<Vec<Hit>, RagError> {
        let allowed = filter.map(|f| self.allowed(f)).transpose()?;
        let leg = limit.max(20);
        let dense = || self.dense().search(&query.dense, leg, allowed.as_ref());
        let sparse = || match self.meta().sparse {
            Sparse::Bm25 => self.bm25(query_text, allowed.as_ref(), leg),
            Sparse::Model => self.lexical(query.sparse.as_deref().unwrap_or_default(), filter, leg),
        };
        let mut ranked = match mode {
            Mode::Dense => dense(),
            Mode::Sparse => sparse()?,
            Mode::Hybrid => fuse(&[dense(), sparse()?]),
        };
        let colbert = query
            .colbert
            .as_ref()
            .filter(|_| mode == Mode::Hybrid && self.meta().colbert);
        // ColBERT rows are large: rescore only the candidates asked for.
        ranked.truncate(limit);
        let ids: Vec<i64> = ranked.iter().map(|r| r.0).collect();
        let mut stored: HashMap<i64, _> = self
            .chunks(&ids, colbert.is_some())?
            .into_iter()
            .map(|c| (c.id, c))
            .collect();
        let index = self.dense();
        let mut hits: Vec<Hit> = ranked
            .into_iter()
            .filter_map(|(id, score)| {
                let chunk = stored.remove(&id)?;
                let score = match (colbert, &chunk.colbert) {
                    (Some(q), Some(rows)) => max_sim(q, rows),
                    _ => score,
                };
                Some(Hit {
                    id: id.to_string(),
                    document_id: chunk.document_id,
                    chunk: chunk.chunk,
                    text: chunk.text,
                    score,
                    similarity: index
                        .vector(id)
                        .filter(|_| !query.dense.is_empty())
                        .map(|v| dot(v, &query.dense)),
                    metadata: chunk.metadata,
                })
            })
            .collect();
        if colbert.is_some() {
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        Ok(hits)
    }
}

/// The reranker's score as a relevance in 0..1.
pub(crate) fn relevance(score: f32) -> f32 {
    1.0 / (1.0 + (-score).exp())
}

/// Keeps the hits at or above the threshold, by the measure it applies to.
pub(crate) fn above_threshold(hits: &mut Vec<Hit>, options: &SearchOptions) {
    let Some(threshold) = options.score_threshold else {
        return;
    };
    if options.rerank {
        hits.retain(|h| h.score >= threshold);
    } else if options.mode != Mode::Sparse {
        hits.retain(|h| h.similarity.is_some_and(|s| s >= threshold));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement_and_keeps_single_list_finds() {
        let dense = vec![(1, 0.9), (2, 0.8), (3, 0.7)];
        let sparse = vec![(3, 12.0), (4, 9.0)];
        let fused = fuse(&[dense, sparse]);
        let order: Vec<i64> = fused.iter().map(|f| f.0).collect();
        assert_eq!(order[0], 3, "in both lists: first ({fused:?})");
        assert_eq!(order.len(), 4);
        assert!(order.contains(&4));
    }

    #[test]
    fn max_sim_averages_each_query_vectors_best_match() {
        let query = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let chunk = vec![vec![1.0, 0.0], vec![0.6, 0.8]];
        assert!((max_sim(&query, &chunk) - 0.9).abs() < 1e-6);
        assert_eq!(max_sim(&[], &chunk), 0.0);
    }
}
