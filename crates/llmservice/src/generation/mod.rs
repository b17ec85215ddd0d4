//! Generation shared by every text endpoint: building the engine request from
//! the wire's sampling fields, reading each choice's events, and accumulating
//! them into the one per-choice record that every answer shape reads.

mod answer;
mod choices;
mod request;

use std::time::Instant;

use engine::Usage;

use crate::telemetry::Metrics;

pub use answer::{ChoiceEvent, ChoiceRecord};
pub use choices::{merge, start, total_usage, Choice};
pub use request::{build_request, max_tokens, validate, MAX_TOP_LOGPROBS};

/// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
pub fn include_usage(sampling: &crate::wire::SamplingFields) -> bool {
    sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

pub fn log_done(metrics: &Metrics, model: &str, endpoint: &str, usage: &Usage, started: Instant) {
    metrics.observe_usage(model, usage);
    // The one line per generation: request id (from the span), model, tokens, latency.
    tracing::info!(
        model,
        endpoint,
        status = 200,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens,
        draft_tokens = usage.draft_tokens,
        accepted_draft_tokens = usage.accepted_draft_tokens,
        latency_ms = started.elapsed().as_millis() as u64,
        "generation finished"
    );
}
