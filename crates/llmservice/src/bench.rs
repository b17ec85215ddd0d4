//! `llmservice bench`: single-stream decode speed of the whole server (HTTP,
//! scheduler, sampling, SSE) against a plain llama-cpp-2 loop on the same model,
//! threads, context and prompt, interleaved run by run so both see the same
//! machine noise.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::api::{router, AppState};
use crate::config::{ServeArgs, Settings};
use crate::models::Registry;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// GGUF model to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// Threads for both the server and the plain loop.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// Tokens generated per run (end-of-generation is ignored so runs do equal work).
    #[arg(long, default_value_t = 128)]
    pub tokens: u32,
    /// Runs of each side.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Context size for both sides.
    #[arg(long, default_value_t = 4096)]
    pub n_ctx: u32,
    #[arg(long, default_value = "The history of the printing press begins")]
    pub prompt: String,
}

impl BenchArgs {
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs::default()
    }
}

pub async fn run(args: BenchArgs, mut settings: Settings) -> Result<(), String> {
    settings.tiers.clear();
    settings.models_dir = args
        .model
        .parent()
        .map(PathBuf::from)
        .ok_or("the model path has no directory")?;
    settings.dir_engine.n_threads = args.threads;
    settings.dir_engine.n_threads_batch = args.threads;
    settings.dir_engine.n_ctx = args.n_ctx;
    let model_id = args
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or("the model path has no file name")?;
    let settings = Arc::new(settings);
    let registry = Arc::new(Registry::new(settings.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let base = format!(
        "http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(AppState { settings, registry })).await;
    });
    let client = reqwest::Client::new();
    // Warm-up: loads the model into the server and pages the file in.
    server_run(&client, &base, &model_id, &args.prompt, 8).await?;

    let (mut server, mut plain) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let s = server_run(&client, &base, &model_id, &args.prompt, args.tokens).await?;
        let (path, prompt, threads, n_ctx, tokens) = (
            args.model.clone(),
            args.prompt.clone(),
            args.threads,
            args.n_ctx,
            args.tokens as usize,
        );
        let p = tokio::task::spawn_blocking(move || {
            engine::bench::plain_generate(&path, threads, n_ctx, &prompt, tokens)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .decode_tokens_per_sec();
        println!(
            "run {}: server {s:.2} tok/s, plain loop {p:.2} tok/s",
            run + 1
        );
        server.push(s);
        plain.push(p);
    }
    let (s, p) = (median(&mut server), median(&mut plain));
    println!(
        "median decode tokens/s over {} runs of {} tokens, {} threads: server {s:.2}, plain llama-cpp-2 loop {p:.2}, ratio {:.3}",
        args.runs,
        args.tokens,
        args.threads,
        s / p
    );
    Ok(())
}

/// One greedy streaming completion; decode tokens/s from the first text chunk to the last.
async fn server_run(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt: &str,
    tokens: u32,
) -> Result<f64, String> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let response = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!(
            "server answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ));
    }
    let mut bytes = response.bytes_stream();
    let (mut first, mut last, mut completion_tokens) = (None, None, 0u64);
    let mut buffer = String::new();
    while let Some(chunk) = bytes.next().await {
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let value: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if let Some(n) = value
                .pointer("/usage/completion_tokens")
                .and_then(Value::as_u64)
            {
                completion_tokens = n;
            }
            let has_text = value
                .pointer("/choices/0/text")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty());
            if has_text {
                first.get_or_insert(now);
                last = Some(now);
            }
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Err("the server streamed no text".to_owned());
    };
    Ok(completion_tokens.saturating_sub(1) as f64
        / last.duration_since(first).as_secs_f64().max(1e-9))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
