//! The prompt of a retrieval-augmented answer: the sources numbered in the
//! system message, which asks the model to answer from them and cite them as
//! [1], [2]; when nothing relevant was found, it says so instead of leaving
//! the model to invent context.

use crate::Hit;

/// The system message for an answer from `sources` (in citation order).
pub fn system_message(sources: &[Hit]) -> String {
    if sources.is_empty() {
        return "No document in the knowledge base is relevant to the user's question. Tell the \
                user that the documents do not cover it; do not make up an answer from them."
            .to_owned();
    }
    let mut message = String::from(
        "Answer the user's question using the numbered sources below. After each statement, \
         cite the sources it comes from by number in square brackets, like [1] or [2]. If the \
         sources do not contain the answer, say that you do not know.\n\nSources:",
    );
    for (index, source) in sources.iter().enumerate() {
        message.push_str(&format!("\n\n[{}]", index + 1));
        if let Some(label) = label(source) {
            message.push_str(&format!(" ({label})"));
        }
        message.push(' ');
        message.push_str(source.text.trim());
    }
    message
}

/// What names a source for the reader: its `title` or `source` metadata.
fn label(source: &Hit) -> Option<&str> {
    ["title", "source"]
        .iter()
        .find_map(|key| source.metadata.get(key)?.as_str())
        .filter(|s| !s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hit(text: &str, metadata: serde_json::Value) -> Hit {
        Hit {
            id: "p".into(),
            document_id: "d".into(),
            chunk: 0,
            text: text.into(),
            score: 1.0,
            similarity: None,
            metadata,
        }
    }

    #[test]
    fn sources_are_numbered_in_order_with_their_labels() {
        let message = system_message(&[
            hit("Docker packages apps.", json!({"source": "docker-docs"})),
            hit(" Kubernetes runs them. ", json!({})),
        ]);
        assert!(
            message.contains("[1] (docker-docs) Docker packages apps."),
            "{message}"
        );
        assert!(message.contains("[2] Kubernetes runs them."), "{message}");
        assert!(message.find("[1]") < message.find("[2] Kub"));
    }

    #[test]
    fn no_sources_tells_the_model_so() {
        assert!(system_message(&[]).contains("do not cover it"));
    }
}
