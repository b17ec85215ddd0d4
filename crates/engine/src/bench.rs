//! The reference a server's decode speed is judged against: a plain llama-cpp-2
//! generation loop (one sequence, greedy, no scheduler, no HTTP).

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

use crate::EngineError;

/// Timings of one plain generation.
#[derive(Debug, Clone, Copy)]
pub struct PlainRun {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_secs: f64,
    /// Seconds from the first sampled token to the last.
    pub decode_secs: f64,
}

impl PlainRun {
    /// Decode tokens/s, counting the tokens generated after the first.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        (self.generated.saturating_sub(1)) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Greedy-generates exactly `n_tokens` tokens (EOS is not honoured, so runs compare equal work).
pub fn plain_generate(
    path: &Path,
    threads: i32,
    n_ctx: u32,
    prompt: &str,
    n_tokens: usize,
) -> Result<PlainRun, EngineError> {
    let err = |e: &dyn std::fmt::Display| EngineError::Inference(e.to_string());
    let backend = crate::backend::shared_backend()?;
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| err(&e))?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params).map_err(|e| err(&e))?;
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512.max(tokens.len()), 1);
    for (i, &t) in tokens.iter().enumerate() {
        batch
            .add(t, i as i32, &[0], i + 1 == tokens.len())
            .map_err(|e| err(&e))?;
    }
    let start = Instant::now();
    ctx.decode(&mut batch).map_err(|e| err(&e))?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let mut sampler = LlamaSampler::greedy();
    let mut index = batch.n_tokens() - 1;
    let decode_start = Instant::now();
    for pos in (tokens.len() as i32..).take(n_tokens) {
        let token = sampler.sample(&ctx, index);
        batch.clear();
        batch.add(token, pos, &[0], true).map_err(|e| err(&e))?;
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        index = 0;
    }
    Ok(PlainRun {
        prompt_tokens: tokens.len(),
        generated: n_tokens,
        prefill_secs,
        decode_secs: decode_start.elapsed().as_secs_f64(),
    })
}
