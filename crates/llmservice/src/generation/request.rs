//! From a request's sampling fields to an engine request: range checks, the
//! model's defaults under the request's values, and the context check.

use engine::{Engine, EngineError, GenerateRequest, SamplingParams, TokenId};

use crate::error::RequestError;
use crate::settings::GenerationDefaults;
use crate::wire::{SamplingFields, StopField};

/// Most stop strings a request may give.
const MAX_STOPS: usize = 16;
/// Most alternatives per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most choices per prompt, before the model's own parallel limit applies.
const MAX_CHOICES: u32 = 64;

fn check_range(param: &str, value: Option<f32>, min: f32, max: f32) -> Result<(), RequestError> {
    match value {
        Some(v) if !(min..=max).contains(&v) || v.is_nan() => Err(RequestError::invalid(
            param,
            format!("{param} must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Range checks and the features this server does not offer yet. Every error names its field.
pub fn validate(sampling: &SamplingFields) -> Result<(), RequestError> {
    check_range("temperature", sampling.temperature, 0.0, 2.0)?;
    check_range("top_p", sampling.top_p, 0.0, 1.0)?;
    check_range("min_p", sampling.min_p, 0.0, 1.0)?;
    check_range("presence_penalty", sampling.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)?;
    check_range("repeat_penalty", sampling.repeat_penalty, 0.0, 10.0)?;
    if sampling.top_k.is_some_and(|k| k < 0) {
        return Err(RequestError::invalid(
            "top_k",
            "top_k must be 0 (disabled) or positive",
        ));
    }
    for (param, value) in [
        ("max_tokens", sampling.max_tokens),
        ("max_completion_tokens", sampling.max_completion_tokens),
    ] {
        if value == Some(0) {
            return Err(RequestError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
    }
    if let Some(n) = sampling.n {
        if n == 0 || n > MAX_CHOICES {
            return Err(RequestError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES} (and at most the model's parallel sequences)"),
            ));
        }
    }
    if sampling.repeat_penalty.is_some_and(|p| p <= 0.0) {
        return Err(RequestError::invalid(
            "repeat_penalty",
            "repeat_penalty must be greater than 0 (1 disables it)",
        ));
    }
    if sampling.repeat_last_n.is_some_and(|n| n < -1) {
        return Err(RequestError::invalid(
            "repeat_last_n",
            "repeat_last_n must be -1 (the whole context), 0 (no penalties) or positive",
        ));
    }
    if sampling.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(RequestError::invalid(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    if let Some(biases) = &sampling.logit_bias {
        for (key, bias) in biases {
            if key.parse::<TokenId>().is_err() {
                return Err(RequestError::invalid(
                    "logit_bias",
                    format!("logit_bias keys must be token ids, got {key:?}"),
                ));
            }
            check_range("logit_bias", Some(*bias), -100.0, 100.0)?;
        }
    }
    if let Some(prediction) = &sampling.prediction {
        prediction
            .text()
            .map_err(|message| RequestError::invalid("prediction", message))?;
    }
    stops(sampling).map(|_| ())
}

fn stops(sampling: &SamplingFields) -> Result<Vec<String>, RequestError> {
    let stops: Vec<String> = match &sampling.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > MAX_STOPS {
        return Err(RequestError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop sequences are allowed"),
        ));
    }
    Ok(stops)
}

/// Merges request fields with the model's defaults (the request wins) and checks
/// the prompt against the context.
pub fn build_request(
    sampling: &SamplingFields,
    defaults: &GenerationDefaults,
    engine: &Engine,
    prompt: Vec<TokenId>,
    logprobs: Option<u32>,
) -> Result<GenerateRequest, RequestError> {
    let n_ctx = engine.info().n_ctx;
    let n_vocab = engine.info().n_vocab;
    if let Some(bad) = sampling
        .logit_bias
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| {
            k.parse::<TokenId>()
                .map_or(true, |t| t < 0 || t as u32 >= n_vocab)
        })
    {
        return Err(RequestError::invalid(
            "logit_bias",
            format!(
                "logit_bias key {bad} is not a token id of this model (vocabulary size {n_vocab})"
            ),
        ));
    }
    let prompt_len = prompt.len() as u32;
    let explicit = sampling.max_completion_tokens.or(sampling.max_tokens);
    if let Some(max) = explicit {
        if prompt_len.saturating_add(max) > n_ctx {
            return Err(EngineError::ContextLengthExceeded {
                n_ctx,
                requested: prompt_len.saturating_add(max),
                prompt: prompt_len,
                completion: max,
            }
            .into());
        }
    }
    let params = SamplingParams {
        temperature: sampling.temperature.unwrap_or(defaults.temperature),
        top_p: sampling.top_p.unwrap_or(defaults.top_p),
        top_k: sampling.top_k.unwrap_or(defaults.top_k),
        min_p: sampling.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: sampling.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        presence_penalty: sampling.presence_penalty.unwrap_or(0.0),
        frequency_penalty: sampling.frequency_penalty.unwrap_or(0.0),
        // -1 is the whole context; a longer window would see nothing more.
        penalty_last_n: match sampling.repeat_last_n {
            None => SamplingParams::default().penalty_last_n,
            Some(n) => {
                let context = i32::try_from(n_ctx).unwrap_or(i32::MAX);
                if n == -1 {
                    context
                } else {
                    n.min(context)
                }
            }
        },
        // Seeds are 64-bit on the wire and 32-bit in llama.cpp: fold, never reject.
        seed: sampling
            .seed
            .map(|s| (s as u64 ^ ((s as u64) >> 32)) as u32),
        logit_bias: sampling
            .logit_bias
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.parse().ok()?, *v)))
            .collect(),
    };
    Ok(GenerateRequest {
        prompt,
        max_tokens: max_tokens(explicit, sampling.n_predict, defaults.max_tokens)
            .min(n_ctx.saturating_sub(prompt_len).max(1)),
        stop: stops(sampling)?,
        sampling: params,
        ignore_eos: sampling.ignore_eos.unwrap_or(false),
        logprobs,
        constraint: None,
        finish_within_budget: false,
        thought: None,
        speculative: sampling.speculative.unwrap_or(true),
        prediction: sampling
            .prediction
            .as_ref()
            .and_then(|p| p.text().ok())
            .map(|text| engine.tokenize(&text, false, false))
            .unwrap_or_default(),
        special_text: false,
        span: tracing::Span::current(),
    })
}

/// The most tokens to generate, before the context's room cuts it:
/// `max_tokens` as asked, else `n_predict` (negative: no limit of its own),
/// else the tier's default.
pub fn max_tokens(explicit: Option<u32>, n_predict: Option<i64>, default: u32) -> u32 {
    match (explicit, n_predict) {
        (Some(max), _) => max,
        (None, Some(n)) if n < 0 => u32::MAX,
        (None, Some(n)) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
        _ => default,
    }
}

#[cfg(test)]
mod tests {
    use super::max_tokens;

    #[test]
    fn max_tokens_then_n_predict_then_the_default() {
        assert_eq!(max_tokens(Some(5), Some(9), 1000), 5);
        assert_eq!(max_tokens(None, Some(9), 1000), 9);
        // Negative: until the context is full (the caller cuts it there).
        assert_eq!(max_tokens(None, Some(-1), 1000), u32::MAX);
        assert_eq!(max_tokens(None, Some(-2), 1000), u32::MAX);
        assert_eq!(max_tokens(None, Some(0), 1000), 1000);
        assert_eq!(max_tokens(None, None, 1000), 1000);
    }
}
