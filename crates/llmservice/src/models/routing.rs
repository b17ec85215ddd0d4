//! Name patterns: a model name nobody configured can still land on
//! the right tier (`*embed*` → embedding, `*rerank*` → reranker, `7b` → a chat tier).

use crate::settings::Tier;

/// The tier a free-form model name points at, if its name says so.
pub fn tier_for_name(name: &str) -> Option<Tier> {
    let lower = name.to_ascii_lowercase();
    // Rerankers first: their names often contain an embedding family's name too
    // (`bge-reranker-v2-m3`), and `rerank` is the more specific word.
    if ["rerank", "cross-encoder"]
        .iter()
        .any(|p| lower.contains(p))
    {
        return Some(Tier::Reranker);
    }
    if ["embed", "bge", "e5"].iter().any(|p| lower.contains(p)) {
        return Some(Tier::Embedding);
    }
    let billions = size_in_billions(&lower)?;
    Some(if billions <= 3.0 {
        Tier::Light
    } else if billions <= 14.0 {
        Tier::Medium
    } else {
        Tier::Heavy
    })
}

/// Finds a parameter-count hint such as `0.5b`, `7b` or `70B` (a number followed by
/// `b` that is not part of a longer word).
fn size_in_billions(name: &str) -> Option<f32> {
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'b' || i == 0 || !bytes[i - 1].is_ascii_digit() {
            continue;
        }
        if bytes.get(i + 1).is_some_and(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let start = bytes[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_digit() || *c == b'.'))
            .map_or(0, |p| p + 1);
        if start > 0 && bytes[start - 1].is_ascii_alphabetic() {
            continue;
        }
        if let Ok(n) = name[start..i].trim_start_matches('.').parse::<f32>() {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_patterns() {
        assert_eq!(tier_for_name("bge-m3"), Some(Tier::Embedding));
        assert_eq!(tier_for_name("jina-embeddings-v3"), Some(Tier::Embedding));
        assert_eq!(
            tier_for_name("multilingual-e5-large"),
            Some(Tier::Embedding)
        );
        assert_eq!(tier_for_name("bge-reranker-v2-m3"), Some(Tier::Reranker));
        assert_eq!(
            tier_for_name("ms-marco-cross-encoder"),
            Some(Tier::Reranker)
        );
        assert_eq!(tier_for_name("jina-reranker-v2"), Some(Tier::Reranker));
        assert_eq!(tier_for_name("qwen-0.5b"), Some(Tier::Light));
        assert_eq!(tier_for_name("llama-2-7b-chat"), Some(Tier::Medium));
        assert_eq!(tier_for_name("Mistral-24B-Instruct"), Some(Tier::Heavy));
        assert_eq!(tier_for_name("llama-3.3-70b"), Some(Tier::Heavy));
    }

    #[test]
    fn no_hint_means_no_tier() {
        assert_eq!(tier_for_name("gpt-4o"), None);
        assert_eq!(tier_for_name("default"), None);
        assert_eq!(tier_for_name("web"), None);
        assert_eq!(tier_for_name("sha256b"), None);
    }
}
