//! `llmservice bench`: single-stream decode speed of the whole server (HTTP,
//! scheduler, sampling, SSE; run as a separate process) against a plain
//! llama-cpp-2 loop on the same model, threads, context and prompt, interleaved
//! run by run so both see the same machine noise.

use std::path::PathBuf;
use std::time::Instant;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::cli::BenchArgs;
use crate::settings::Settings;

pub async fn run(args: BenchArgs, _settings: Settings) -> Result<(), String> {
    let server = ServerProcess::start(&args).await?;
    let client = reqwest::Client::new();
    let model = "light";
    // Warm-up: loads the model into the server and pages the file in.
    server_run(&client, &server.base, model, &args.prompt, 8).await?;

    let (mut served, mut plain) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let s = server_run(&client, &server.base, model, &args.prompt, args.tokens).await?;
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
        served.push(s);
        plain.push(p);
    }
    let (s, p) = (median(&mut served), median(&mut plain));
    println!(
        "median decode tokens/s over {} runs of {} tokens, {} threads: server {s:.2}, plain llama-cpp-2 loop {p:.2}, ratio {:.3}",
        args.runs,
        args.tokens,
        args.threads,
        s / p
    );
    Ok(())
}

/// The server under test, as its own process: clients are other processes, and
/// a client sharing the server's cores would distort its timings.
struct ServerProcess {
    child: std::process::Child,
    base: String,
    _dir: PathBuf,
}

impl ServerProcess {
    async fn start(args: &BenchArgs) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("llmservice-bench-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models")).map_err(|e| e.to_string())?;
        let model = std::fs::canonicalize(&args.model)
            .map_err(|e| format!("{}: {e}", args.model.display()))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(exe)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .current_dir(&dir)
            .env("LIGHT_MODEL_PATH", &model)
            .env("LIGHT_N_THREADS", args.threads.to_string())
            .env("LIGHT_N_CTX", args.n_ctx.to_string())
            // Every run repeats one greedy request: it must reach the engine, not the cache.
            .env("ENABLE_CACHE", "false")
            .env("MODELS_DIR", dir.join("models"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let mut server = Self {
            child,
            base: String::new(),
            _dir: dir.clone(),
        };
        for _ in 0..600 {
            if let Ok(port) = std::fs::read_to_string(dir.join(".port")) {
                server.base = format!("http://127.0.0.1:{}", port.trim());
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "the server exited with {status}; see {}",
                    dir.join("server.log").display()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err("the server did not start within 30 s".to_owned())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
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
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "repeat_penalty": 1.0,
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
    tracing::debug!(
        completion_tokens,
        secs = last.duration_since(first).as_secs_f64(),
        "server run"
    );
    Ok(completion_tokens.saturating_sub(1) as f64
        / last.duration_since(first).as_secs_f64().max(1e-9))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
