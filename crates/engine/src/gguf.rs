//! What a GGUF file is, read from its metadata header alone (no weights are
//! loaded), so the model list and the router know each file's kind cheaply.

use std::path::Path;

use llama_cpp_2::gguf::GgufContext;
use llama_cpp_sys_2 as sys;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    Chat,
    Embedding,
    Reranker,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embedding => "embedding",
            Self::Reranker => "reranker",
        }
    }
}

/// The metadata a server needs before loading a model.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    pub architecture: String,
    pub name: Option<String>,
    pub kind: ModelKind,
    /// llama.cpp pooling type (`{arch}.pooling_type`), when the file sets one.
    pub pooling_type: Option<u32>,
    pub context_length: Option<u64>,
    pub has_chat_template: bool,
    /// `tokenizer.ggml.unknown_token_id` (llama.cpp's vocabulary API does not expose it).
    pub unknown_token_id: Option<u32>,
    /// `{arch}.embedding_length`: the width of the model's hidden states.
    pub embedding_length: Option<u64>,
    /// `general.size_label` (`135M`, `7B`, `8x7B`), where the file says.
    pub size_label: Option<String>,
    /// Bytes of f16 KV cache one token takes in a causal model (keys and
    /// values of every layer); `None` for encoders, which keep none, or when
    /// the header does not say.
    pub kv_bytes_per_token: Option<u64>,
}

/// Encoder-only architectures: always embedding (or, with a classifier, reranking) models.
const ENCODER_ARCHITECTURES: &[&str] = &[
    "bert",
    "nomic-bert",
    "nomic-bert-moe",
    "jina-bert-v2",
    "jina-bert-v3",
    "neo-bert",
    "modern-bert",
    "t5encoder",
];

/// llama.cpp's `LLAMA_POOLING_TYPE_RANK`.
const POOLING_RANK: u32 = 4;

/// Reads a GGUF header. `None` when the file is not a readable GGUF.
pub fn inspect(path: &Path) -> Option<GgufSummary> {
    let ctx = GgufContext::from_file(path)?;
    let architecture = string(&ctx, "general.architecture")?;
    let pooling_type = unsigned(&ctx, &format!("{architecture}.pooling_type"));
    let has_classifier = ctx.find_key(&format!("{architecture}.classifier.output_labels")) >= 0;
    let kind = if has_classifier || pooling_type == Some(POOLING_RANK) {
        ModelKind::Reranker
    } else if pooling_type.is_some_and(|p| p > 0)
        || ENCODER_ARCHITECTURES.contains(&architecture.as_str())
    {
        ModelKind::Embedding
    } else {
        ModelKind::Chat
    };
    let kv_bytes_per_token = (kind == ModelKind::Chat)
        .then(|| kv_bytes_per_token(&ctx, &architecture))
        .flatten();
    Some(GgufSummary {
        kv_bytes_per_token,
        embedding_length: unsigned(&ctx, &format!("{architecture}.embedding_length"))
            .map(u64::from),
        size_label: string(&ctx, "general.size_label"),
        name: string(&ctx, "general.name"),
        kind,
        pooling_type,
        context_length: unsigned(&ctx, &format!("{architecture}.context_length")).map(u64::from),
        has_chat_template: ctx.find_key("tokenizer.chat_template") >= 0,
        unknown_token_id: unsigned(&ctx, "tokenizer.ggml.unknown_token_id"),
        architecture,
    })
}

/// Keys and values of every layer for one token, f16: layers × KV heads ×
/// (key width + value width) × 2 bytes (for latent attention, layers ×
/// (latent rank + rotary width) × 2). A per-layer head count (an array)
/// or a missing width leaves it unknown rather than guessed.
fn kv_bytes_per_token(ctx: &GgufContext, arch: &str) -> Option<u64> {
    let key = |name: &str| unsigned(ctx, &format!("{arch}.{name}")).map(u64::from);
    let layers = key("block_count")?;
    // Multi-head latent attention (DeepSeek's) caches one compressed
    // vector and the rotary part per layer, not keys and values per head.
    if let Some(rank) = key("attention.kv_lora_rank") {
        let rope = key("rope.dimension_count").unwrap_or(0);
        return layers.checked_mul(rank.checked_add(rope)?)?.checked_mul(2);
    }
    let heads = key("attention.head_count")?;
    let kv_heads = if ctx.find_key(&format!("{arch}.attention.head_count_kv")) >= 0 {
        key("attention.head_count_kv")?
    } else {
        heads
    };
    let head_width = key("embedding_length")?.checked_div(heads)?;
    let key_width = key("attention.key_length").unwrap_or(head_width);
    let value_width = key("attention.value_length").unwrap_or(head_width);
    // Checked: the numbers come from the file, which may lie.
    layers
        .checked_mul(kv_heads)?
        .checked_mul(key_width.checked_add(value_width)?)?
        .checked_mul(2)
}

/// The chat template a GGUF file carries (`tokenizer.chat_template`).
pub fn chat_template(path: &Path) -> Option<String> {
    string(&GgufContext::from_file(path)?, "tokenizer.chat_template")
}

fn string(ctx: &GgufContext, key: &str) -> Option<String> {
    let idx = ctx.find_key(key);
    // Reading a value as the wrong type trips an assertion inside ggml that aborts
    // the process: check the stored type first, always.
    (idx >= 0 && ctx.kv_type(idx) == sys::GGUF_TYPE_STRING)
        .then(|| ctx.val_str(idx).map(str::to_owned))
        .flatten()
}

fn unsigned(ctx: &GgufContext, key: &str) -> Option<u32> {
    let idx = ctx.find_key(key);
    if idx < 0 {
        return None;
    }
    match ctx.kv_type(idx) {
        sys::GGUF_TYPE_UINT32 => Some(ctx.val_u32(idx)),
        sys::GGUF_TYPE_INT32 => u32::try_from(ctx.val_i32(idx)).ok(),
        sys::GGUF_TYPE_UINT64 => u32::try_from(ctx.val_u64(idx)).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shared_model(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models"
        ))
        .join(name)
    }

    #[test]
    fn kinds_of_the_shared_models() {
        let chat = inspect(&shared_model("SmolLM2-135M-Instruct-Q4_1.gguf")).expect("chat gguf");
        assert_eq!(chat.kind, ModelKind::Chat);
        assert_eq!(chat.architecture, "llama");
        assert!(chat.has_chat_template);
        // SmolLM2-135M: 30 layers, 3 KV heads of 64 (576 wide over 9 heads).
        assert_eq!(chat.kv_bytes_per_token, Some(30 * 3 * (64 + 64) * 2));
        assert_eq!(chat.embedding_length, Some(576));
        let template = chat_template(&shared_model("SmolLM2-135M-Instruct-Q4_1.gguf")).unwrap();
        assert!(template.contains("<|im_start|>"), "{template}");

        let embed = inspect(&shared_model("all-MiniLM-L6-v2-f16.gguf")).expect("embedding gguf");
        assert_eq!(embed.kind, ModelKind::Embedding);
        assert_eq!(embed.pooling_type, Some(1));
        assert_eq!(embed.kv_bytes_per_token, None, "encoders keep no KV cache");

        let rerank =
            inspect(&shared_model("SYNTHETIC-minilm-l6-reranker-f16.gguf")).expect("reranker gguf");
        assert_eq!(rerank.kind, ModelKind::Reranker);
        assert_eq!(rerank.pooling_type, None);
    }

    #[test]
    fn not_a_gguf_is_none_not_a_crash() {
        let dir = std::env::temp_dir().join(format!("gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.gguf");
        std::fs::write(&path, b"this is not a gguf file at all").unwrap();
        assert!(inspect(&path).is_none());
        assert!(inspect(&dir.join("missing.gguf")).is_none());
    }
}
