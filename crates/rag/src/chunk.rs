//! Cutting documents into chunks that fit the embedding model: recursive
//! splits at the largest semantic unit that fits (sections, paragraphs,
//! sentences, words), measured in the model's own tokens, with overlap.

use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};

use crate::{Encoder, RagError};

/// How big chunks are, in the embedding model's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkSize {
    pub tokens: usize,
    pub overlap: usize,
}

impl ChunkSize {
    /// `tokens` (at least 16) with `overlap` below it.
    pub fn new(tokens: usize, overlap: usize) -> Result<Self, RagError> {
        if tokens < 16 {
            return Err(RagError::invalid(
                "chunk_tokens",
                format!("chunks of {tokens} tokens are too small: use at least 16"),
            ));
        }
        if overlap >= tokens {
            return Err(RagError::invalid(
                "chunk_overlap",
                format!("an overlap of {overlap} tokens must be smaller than the chunks' {tokens}"),
            ));
        }
        Ok(Self { tokens, overlap })
    }
}

/// The encoder's token count as text-splitter's measure.
struct Tokens<'a>(&'a dyn Encoder);

impl ChunkSizer for Tokens<'_> {
    fn size(&self, chunk: &str) -> usize {
        self.0.count_tokens(chunk)
    }
}

/// The chunks of `text`, in order; none for blank text.
pub fn split(encoder: &dyn Encoder, text: &str, size: ChunkSize, markdown: bool) -> Vec<String> {
    let config = ChunkConfig::new(size.tokens)
        .with_sizer(Tokens(encoder))
        .with_overlap(size.overlap)
        .expect("ChunkSize keeps the overlap below the size");
    let chunks: Vec<String> = if markdown {
        MarkdownSplitter::new(config)
            .chunks(text)
            .map(str::to_owned)
            .collect()
    } else {
        TextSplitter::new(config)
            .chunks(text)
            .map(str::to_owned)
            .collect()
    };
    chunks
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BoxFuture, Encoded, EncoderInfo, Want};
    use proptest::prelude::*;

    /// Counts words as tokens: chunking logic only (the server's tests chunk
    /// with a real tokenizer).
    struct Words(EncoderInfo);

    impl Encoder for Words {
        fn info(&self) -> &EncoderInfo {
            &self.0
        }
        fn count_tokens(&self, text: &str) -> usize {
            text.split_whitespace().count()
        }
        fn token_ids(&self, _: &str) -> Vec<u32> {
            unreachable!("chunking counts tokens only")
        }
        fn encode<'a>(
            &'a self,
            _: &'a [String],
            _: Want,
        ) -> BoxFuture<'a, Result<Vec<Encoded>, RagError>> {
            unreachable!("chunking does not encode")
        }
    }

    fn words() -> Words {
        Words(EncoderInfo {
            model: "words".into(),
            dimension: 1,
            sparse_head: false,
            colbert_head: false,
            max_tokens: 512,
        })
    }

    #[test]
    fn sizes_below_sixteen_or_overlaps_as_large_are_refused() {
        assert!(ChunkSize::new(8, 0).is_err());
        assert!(ChunkSize::new(32, 32).is_err());
        assert!(ChunkSize::new(32, 8).is_ok());
    }

    #[test]
    fn a_short_text_is_one_chunk_and_blank_text_none() {
        let size = ChunkSize::new(64, 8).unwrap();
        assert_eq!(
            split(&words(), "Docker packages apps.", size, false),
            ["Docker packages apps."]
        );
        assert!(split(&words(), " \n\t ", size, false).is_empty());
    }

    #[test]
    fn markdown_splits_at_headings_before_sentences() {
        let size = ChunkSize::new(16, 0).unwrap();
        let text =
            "# Docker\n\nDocker packages applications into containers that run anywhere.\n\n\
                    # Kubernetes\n\nKubernetes schedules containers across a cluster of machines.";
        let chunks = split(&words(), text, size, true);
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert!(chunks[0].starts_with("# Docker") && chunks[1].starts_with("# Kubernetes"));
    }

    proptest! {
        /// Every chunk fits, and the chunks cover every word of the text in order.
        #[test]
        fn chunks_fit_and_cover_the_text(words_in in proptest::collection::vec("[a-z]{1,8}", 0..400),
                                        tokens in 16usize..80, overlap in 0usize..15) {
            let text = words_in.join(" ");
            let size = ChunkSize::new(tokens, overlap).unwrap();
            let encoder = words();
            let chunks = split(&encoder, &text, size, false);
            for chunk in &chunks {
                prop_assert!(encoder.count_tokens(chunk) <= tokens);
            }
            // Without overlap the chunks, joined, are the text's words.
            if overlap == 0 {
                let joined: Vec<&str> = chunks.iter().flat_map(|c| c.split_whitespace()).collect();
                prop_assert_eq!(joined, words_in.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
    }
}
