/// A token id of the model's vocabulary.
pub type TokenId = i32;

/// Sampling settings for one request, already merged with the model's defaults
/// and validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    pub min_p: f32,
    /// 1.0 disables it.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `None` draws a fresh seed.
    pub seed: Option<u32>,
    /// Added to the logits of these tokens before sampling (-inf bans a token).
    pub logit_bias: Vec<(TokenId, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            penalty_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

/// A validated generation request: prompt tokens in, text events out.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<TokenId>,
    /// Upper bound on generated tokens; the context size may end it sooner.
    pub max_tokens: u32,
    /// Stop strings: generation ends before the first one, which is never emitted.
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Report each token's logprob and this many alternatives (`None`: no logprobs).
    pub logprobs: Option<u32>,
    /// Keep generating through end-of-generation tokens (benchmarks compare equal work).
    pub ignore_eos: bool,
    /// Emit the text of special tokens too (tool-call markers such as Mistral's
    /// `[TOOL_CALLS]` are control tokens the tool-call parser must see).
    pub special_text: bool,
    /// What the output must match, compiled with [`crate::Engine::compile_constraint`].
    pub constraint: Option<crate::CompiledConstraint>,
    /// Once more than half of `max_tokens` is spent, a constrained output ends
    /// at the first point its grammar may end, rather than open another part
    /// (another tool call) that a part as long as the output so far would not
    /// have room to finish. Without it a small model that adds a call it does
    /// not need loses the whole answer to `max_tokens`.
    pub finish_within_budget: bool,
    /// A thinking model's request: `Some(open)`, `open` when the prompt opened
    /// its `<think>` block. The budget above then counts only the answer's
    /// tokens, not the thought's.
    pub thought: Option<bool>,
    /// Whether this request may use the model's speculation (only greedy
    /// requests speculate, and a guess is kept only where it is the token the
    /// model draws; the extra rows change the batch's shape, which on some
    /// CPU kernels rounds a near-tie the other way). False opts out.
    pub speculative: bool,
    /// Tokens the output is expected to repeat (OpenAI's predicted outputs):
    /// a greedy request guesses from them whatever the model's speculation
    /// setting, unless it opted out.
    pub prediction: Vec<TokenId>,
    /// The request's tracing span: engine-side logs for it are recorded inside it.
    pub span: tracing::Span,
}
