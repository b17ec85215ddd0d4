//! Ollama's API: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`,
//! `/api/chat`, `/api/generate`, `/api/embed` and `/api/embeddings`. Chat and
//! generate are translations onto the chat pipeline (`chat::ollama`), answered
//! as NDJSON lines by default.
//! Model names are ours, with Ollama's `:latest` tag accepted. Errors are
//! Ollama's `{"error": "..."}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::pipeline::{cache_key, cached_events, check, generate, load, replayed};
use super::{
    log_encoded, off_async, require_kind, respond, text_model, tokenize_inputs, wants_to_wait,
    Delivery,
};
use crate::analytics::Ledger;
use crate::api::answer::{AnswerHead, OllamaAnswer};
use crate::api::error::{ApiError, OllamaError};
use crate::api::json::Json;
use crate::api::response_cache::Served;
use crate::chat::ollama as translate;
use crate::keys::Caller;
use crate::models::ModelEntry;
use crate::state::AppState;
use crate::wire::{
    ChatCompletionRequest, OllamaChatRequest, OllamaChunk, OllamaDetails, OllamaEmbedAnswer,
    OllamaEmbedRequest, OllamaEmbeddingAnswer, OllamaEmbeddingsRequest, OllamaGenerateRequest,
    OllamaMessage, OllamaModel, OllamaModels, OllamaShow, OllamaShowRequest, OllamaStats,
    PromptField,
};

/// The version of Ollama's API these routes follow.
const OLLAMA_API_VERSION: &str = "0.12.0";

/// Our model name for an Ollama one: `name:latest` is `name`.
fn model_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

#[utoipa::path(get, path = "/api/version", responses((status = 200, description = "`{version}`: the Ollama API version these routes follow")))]
pub async fn version() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "version": OLLAMA_API_VERSION }))
}

#[utoipa::path(get, path = "/api/tags", responses((status = 200, description = "Every model the server offers", body = OllamaModels)))]
pub async fn tags(State(state): State<AppState>) -> axum::Json<OllamaModels> {
    // The directory scan and each file's size: off the async threads.
    let registry = state.registry.clone();
    let models = tokio::task::spawn_blocking(move || {
        registry
            .list()
            .iter()
            .map(|e| ollama_model(e, false))
            .collect()
    })
    .await
    .unwrap_or_default();
    axum::Json(OllamaModels { models })
}

#[utoipa::path(get, path = "/api/ps", responses((status = 200, description = "The models loaded now", body = OllamaModels)))]
pub async fn ps(State(state): State<AppState>) -> axum::Json<OllamaModels> {
    let registry = state.registry.clone();
    let models = tokio::task::spawn_blocking(move || {
        registry
            .loaded()
            .iter()
            .map(|e| ollama_model(e, true))
            .collect()
    })
    .await
    .unwrap_or_default();
    axum::Json(OllamaModels { models })
}

#[utoipa::path(post, path = "/api/show", request_body = OllamaShowRequest, responses((status = 200, description = "A model's details, template and capabilities", body = OllamaShow), (status = 400, description = "Malformed body or no model: `{error}`"), (status = 404, description = "Unknown model")))]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<OllamaShowRequest>, ApiError>,
) -> Result<axum::Json<OllamaShow>, OllamaError> {
    let Json(req) = body?;
    let name = req
        .model
        .or(req.name)
        .ok_or_else(|| ApiError::invalid("model", "model is required"))?;
    let entry = state.registry.resolve_async(model_name(&name)).await?;
    if entry.upstream.is_some() {
        return show_upstream(&state, &headers, entry).await;
    }
    // Read from the file, not a load: editors ask for every model they list.
    let reading = entry.clone();
    let (template, model_info, capabilities) = off_async(move || Ok(shown(&reading))).await?;
    Ok(axum::Json(OllamaShow {
        modelfile: String::new(),
        parameters: String::new(),
        template,
        details: details(&entry),
        model_info,
        capabilities,
        modified_at: modified_at(&entry),
    }))
}

/// What `/api/show` tells of a model: its template and capabilities, and
/// `model_info` under Ollama's keys (`{arch}.context_length`, the context it
/// serves with), from the loaded engine or else the GGUF header.
fn shown(entry: &ModelEntry) -> (String, serde_json::Value, Vec<&'static str>) {
    let config = entry.engine_config();
    let loaded = entry.loaded_engine();
    let info = loaded.as_ref().map(|engine| engine.info());
    let gguf = entry.gguf.as_ref();
    let architecture = info
        .map(|i| i.architecture.clone())
        .or_else(|| gguf.map(|g| g.architecture.clone()))
        .unwrap_or_default();
    let template = match info {
        Some(info) => info.chat_template.as_ref().map(|t| t.source().to_owned()),
        None => config
            .chat_template
            .clone()
            .or_else(|| engine::gguf_chat_template(&entry.path)),
    }
    .unwrap_or_default();
    let context = info.map(|i| u64::from(i.n_ctx)).unwrap_or_else(|| {
        let configured = u64::from(config.n_ctx);
        gguf.and_then(|g| g.context_length)
            .map_or(configured, |train| train.min(configured))
    });
    let mut model_info = json!({"general.architecture": architecture});
    model_info[format!("{architecture}.context_length")] = context.into();
    if let Some(width) = info
        .map(|i| u64::from(i.n_embd))
        .or_else(|| gguf.and_then(|g| g.embedding_length))
    {
        model_info[format!("{architecture}.embedding_length")] = width.into();
    }
    if let Some(info) = info {
        model_info["general.parameter_count"] = info.n_params.into();
    }
    let mut capabilities = Vec::new();
    match entry.kind {
        engine::ModelKind::Chat => {
            capabilities.push("completion");
            // Whether the template shows tools to the model, as a load reads it.
            let tools = match info {
                Some(info) => info
                    .chat_template
                    .as_ref()
                    .is_some_and(|t| t.supports_tools()),
                None => engine::chat::ChatTemplate::new(&template, "", "")
                    .is_ok_and(|t| t.supports_tools()),
            };
            if tools {
                capabilities.push("tools");
            }
            // Clients show a thinking toggle for these (Ollama's `think`).
            if engine::chat::template_thinks(&template) {
                capabilities.push("thinking");
            }
        }
        engine::ModelKind::Embedding | engine::ModelKind::Reranker => {
            capabilities.push("embedding")
        }
    }
    (template, model_info, capabilities)
}

/// `/api/show` for a model served upstream: what is known here (its
/// template and weights are the upstream's own).
async fn show_upstream(
    state: &AppState,
    headers: &HeaderMap,
    entry: Arc<ModelEntry>,
) -> Result<axum::Json<OllamaShow>, OllamaError> {
    state.registry.ready(&entry, wants_to_wait(headers)).await?;
    let capabilities = match entry.kind {
        // Tools are passed through; the upstream answers for them.
        engine::ModelKind::Chat => vec!["completion", "tools"],
        engine::ModelKind::Embedding | engine::ModelKind::Reranker => vec!["embedding"],
    };
    Ok(axum::Json(OllamaShow {
        modelfile: String::new(),
        parameters: String::new(),
        template: String::new(),
        details: details(&entry),
        model_info: json!({"general.architecture": "upstream"}),
        capabilities,
        modified_at: modified_at(&entry),
    }))
}

#[utoipa::path(post, path = "/api/chat", request_body = OllamaChatRequest, responses((status = 200, description = "NDJSON lines (`stream` defaults to true), the last with `done: true` and the counts and durations; one such object with `stream: false`", content((OllamaChunk = "application/json"), (String = "application/x-ndjson"))), (status = 400, description = "Bad parameters: `{error}`"), (status = 404, description = "Unknown model: `{error}`")))]
pub async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    body: Result<Json<OllamaChatRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let Json(req) = body?;
    // As in Ollama: no messages loads the model (or, with keep_alive 0, unloads it).
    if req.messages.is_empty() {
        return load_or_unload(state, headers, &req.model, req.keep_alive.as_ref(), true).await;
    }
    let chat = translate::chat_request(&req)?;
    answer(
        state,
        headers,
        caller,
        &req.model,
        chat,
        true,
        req.keep_alive.as_ref(),
    )
    .await
}

#[utoipa::path(post, path = "/api/generate", request_body = OllamaGenerateRequest, responses((status = 200, description = "NDJSON lines with `response` pieces, or one object with `stream: false`; an empty prompt only loads the model (`done_reason: \"load\"`, or `\"unload\"` with `keep_alive: 0`)", content((OllamaChunk = "application/json"), (String = "application/x-ndjson"))), (status = 400, description = "Bad parameters: `{error}`"), (status = 404, description = "Unknown model: `{error}`")))]
pub async fn generate_text(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    body: Result<Json<OllamaGenerateRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let Json(req) = body?;
    let prompt = req.prompt.as_deref().unwrap_or_default();
    if prompt.is_empty() {
        return load_or_unload(state, headers, &req.model, req.keep_alive.as_ref(), false).await;
    }
    let chat = translate::generate_request(&req, prompt)?;
    answer(
        state,
        headers,
        caller,
        &req.model,
        chat,
        false,
        req.keep_alive.as_ref(),
    )
    .await
}

#[utoipa::path(post, path = "/api/embed", request_body = OllamaEmbedRequest, responses((status = 200, description = "One dense, normalized vector per input", body = OllamaEmbedAnswer), (status = 400, description = "Bad parameters, or a chat model: `{error}`"), (status = 404, description = "Unknown model: `{error}`")))]
pub async fn embed(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    body: Result<Json<OllamaEmbedRequest>, ApiError>,
) -> Result<axum::Json<OllamaEmbedAnswer>, OllamaError> {
    let Json(req) = body?;
    let started = Instant::now();
    let truncate = req.truncate.unwrap_or(true);
    let (embeddings, tokens) = embed_texts(
        &state,
        &headers,
        caller,
        &req.model,
        &req.input,
        truncate,
        req.dimensions,
    )
    .await?;
    Ok(axum::Json(OllamaEmbedAnswer {
        model: req.model,
        embeddings,
        total_duration: started.elapsed().as_nanos() as u64,
        load_duration: 0,
        prompt_eval_count: tokens,
    }))
}

#[utoipa::path(post, path = "/api/embeddings", request_body = OllamaEmbeddingsRequest, responses((status = 200, description = "`{embedding}` for one `prompt` (empty for an empty prompt)", body = OllamaEmbeddingAnswer), (status = 400, description = "Malformed body, or not an embedding model: `{error}`"), (status = 404, description = "Unknown model: `{error}`")))]
pub async fn legacy_embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    body: Result<Json<OllamaEmbeddingsRequest>, ApiError>,
) -> Result<axum::Json<OllamaEmbeddingAnswer>, OllamaError> {
    let Json(req) = body?;
    if req.prompt.is_empty() {
        // Ollama answers an empty prompt with an empty vector.
        state.registry.resolve_async(model_name(&req.model)).await?;
        return Ok(axum::Json(OllamaEmbeddingAnswer {
            embedding: Vec::new(),
        }));
    }
    let input = PromptField::Text(req.prompt);
    let (mut vectors, _) =
        embed_texts(&state, &headers, caller, &req.model, &input, true, None).await?;
    Ok(axum::Json(OllamaEmbeddingAnswer {
        embedding: vectors.pop().unwrap_or_default(),
    }))
}

/// Dense embeddings of `input` (texts only), cut to `dimensions` and
/// re-normalized when asked; with the prompt's token count.
async fn embed_texts(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    model: &str,
    input: &PromptField,
    truncate: bool,
    dimensions: Option<u32>,
) -> Result<(Vec<Vec<f32>>, u32), ApiError> {
    let started = Instant::now();
    if !matches!(input, PromptField::Text(_) | PromptField::Texts(_)) {
        return Err(ApiError::invalid(
            "input",
            "input must be a text or a list of texts",
        ));
    }
    if dimensions == Some(0) {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions must be at least 1",
        ));
    }
    let entry = super::resolve(state, model_name(model)).await?;
    require_kind(&entry, engine::ModelKind::Embedding, "/api/embed")?;
    if let Some(upstream) = state
        .registry
        .upstream(&entry, wants_to_wait(headers))
        .await?
    {
        let input = serde_json::to_value(input).unwrap_or_default();
        let answer = upstream
            .embeddings(model_name(model), input, dimensions, None)
            .await?;
        let vectors = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| serde_json::from_value::<Vec<f32>>(d["embedding"].clone()).unwrap_or_default())
            .collect();
        let tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
        log_encoded(state, caller, &entry.id, "ollama_embed", tokens, started);
        return Ok((vectors, tokens));
    }
    let engine = state
        .registry
        .engine(&entry, wants_to_wait(headers))
        .await?;
    let n_embd = engine.info().n_embd;
    if let Some(d) = dimensions.filter(|&d| d > n_embd) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("dimensions {d} is larger than the model's {n_embd}"),
        ));
    }
    let mut inputs = tokenize_inputs(&engine, input).await?;
    if truncate {
        inputs.iter_mut().for_each(|i| engine.truncate_input(i));
    }
    let outputs = engine::EmbedOutputs {
        dense: true,
        sparse: false,
        colbert: false,
    };
    let results = engine.embed(inputs, outputs)?.wait().await?;
    let tokens: u32 = results.iter().map(|r| r.n_tokens).sum();
    let vectors = results
        .into_iter()
        .map(|r| {
            let mut dense = r.dense.unwrap_or_default();
            if let Some(d) = dimensions.filter(|&d| (d as usize) < dense.len()) {
                dense.truncate(d as usize);
                engine::normalize(&mut dense);
            }
            dense
        })
        .collect();
    log_encoded(state, caller, &entry.id, "ollama_embed", tokens, started);
    Ok((vectors, tokens))
}

#[utoipa::path(post, path = "/api/pull", request_body = OllamaShowRequest, responses((status = 200, description = "The model is here already: `{status: \"success\"}` (an NDJSON line unless `stream: false`)"), (status = 400, description = "No model named: `{error}`"), (status = 404, description = "Not here: `{error}` says where models come from (`llmservice pull` and the dashboard download from the Hub)")))]
pub async fn pull(
    State(state): State<AppState>,
    body: Result<Json<OllamaShowRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let Json(req) = body?;
    let name = req
        .model
        .or(req.name)
        .ok_or_else(|| ApiError::invalid("model", "model is required"))?;
    // Clients pull before they use a model: one already here is a success.
    if let Err(error) = state.registry.resolve_async(model_name(&name)).await {
        let message = format!(
            "{}; Ollama's library is not served here: download a GGUF from the Hugging Face Hub \
             with `llmservice pull OWNER/REPO:QUANT` or the dashboard's Models page, or put \
             GGUF files in MODELS_DIR (or set {{TIER}}_MODEL_PATH); they are listed by /api/tags",
            ApiError::from(error).message
        );
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::bad_request(message)
        }
        .into());
    }
    let success = json!({"status": "success"});
    Ok(if req.stream.unwrap_or(true) {
        (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            format!("{success}\n"),
        )
            .into_response()
    } else {
        axum::Json(success).into_response()
    })
}

/// Runs a translated request and answers in Ollama's shape; `keep_alive: 0`
/// unloads the model once the answer is whole.
async fn answer(
    state: AppState,
    headers: HeaderMap,
    caller: Caller,
    model: &str,
    mut chat: ChatCompletionRequest,
    is_chat: bool,
    keep_alive: Option<&serde_json::Value>,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    chat.model = model_name(model).to_owned();
    let (job, entry) = check(&state, &chat).await?;
    let head = AnswerHead {
        model: model.to_owned(),
        include_usage: false,
        ..AnswerHead::new("ollama", model, &chat.sampling)
    };
    let answer = OllamaAnswer::new(head, is_chat, started);
    let cache_key = cache_key(&state, &entry, &chat, &job);
    let delivery = Delivery {
        state: state.clone(),
        model_id: entry.id.clone(),
        endpoint: if is_chat {
            "ollama_chat"
        } else {
            "ollama_generate"
        },
        cache_key: cache_key.clone(),
        started,
        keep: None,
        caller,
        ledger: Ledger::current(),
    };
    let response = match cached_events(&state, cache_key.as_ref()).await {
        Some(events) => respond(answer, replayed(events), delivery, Served::FromCache).await?,
        None => {
            let engine = load(&state, &headers, &entry).await?;
            let (events, _) = generate(&state, &entry, &engine, &chat, job, started).await?;
            respond(answer, events, delivery, Served::Generated).await?
        }
    };
    if translate::unloads_now(keep_alive) {
        unload_when_idle(entry);
    }
    Ok(response)
}

/// Unloads `entry` once its requests are done (a streamed answer may still
/// be generating when the response head goes out).
fn unload_when_idle(entry: Arc<ModelEntry>) {
    tokio::spawn(async move {
        while entry.is_busy() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if let Err(error) = entry.unload().await {
            tracing::warn!(model = %entry.id, %error, "keep_alive 0: unload failed");
        }
    });
}

/// `/api/generate` without a prompt: load the model, or with `keep_alive: 0`
/// unload it.
async fn load_or_unload(
    state: AppState,
    headers: HeaderMap,
    model: &str,
    keep_alive: Option<&serde_json::Value>,
    chat: bool,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let entry = text_model(&state, model_name(model)).await?;
    let reason = if translate::unloads_now(keep_alive) {
        entry.unload().await?;
        "unload"
    } else {
        state
            .registry
            .ready(&entry, wants_to_wait(&headers))
            .await?;
        "load"
    };
    let done = OllamaChunk {
        model: model.to_owned(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        message: chat.then(|| OllamaMessage {
            role: "assistant",
            content: String::new(),
            thinking: String::new(),
            tool_calls: Vec::new(),
        }),
        response: (!chat).then(String::new),
        thinking: None,
        done: true,
        stats: Some(OllamaStats {
            done_reason: reason,
            total_duration: started.elapsed().as_nanos() as u64,
            load_duration: started.elapsed().as_nanos() as u64,
            prompt_eval_count: 0,
            prompt_eval_duration: 0,
            eval_count: 0,
            eval_duration: 0,
        }),
    };
    Ok((StatusCode::OK, axum::Json(done)).into_response())
}

fn modified_at(entry: &ModelEntry) -> String {
    chrono::DateTime::from_timestamp(entry.created, 0)
        .unwrap_or_default()
        .to_rfc3339()
}

/// What Ollama's clients show of a model: from the loaded model when it is
/// loaded, from the file name otherwise.
fn details(entry: &ModelEntry) -> OllamaDetails {
    let stem = entry
        .path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    // The last name part that reads like a GGUF type: Q4_K_M, IQ3_S, F16, ...
    let quantization = stem
        .rsplit(['-', '.'])
        .map(str::to_ascii_uppercase)
        .find(|part| {
            let digit_after = |prefix: &str| {
                part.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            };
            digit_after("Q") || digit_after("IQ") || matches!(part.as_str(), "F16" | "BF16" | "F32")
        })
        .unwrap_or_default();
    let (family, parameter_size) = match entry.loaded_engine() {
        Some(engine) => {
            let info = engine.info();
            let params = info.n_params as f64;
            let size = if params >= 1e9 {
                format!("{:.1}B", params / 1e9)
            } else {
                format!("{:.0}M", params / 1e6)
            };
            (info.architecture.clone(), size)
        }
        // Not loaded: what the file's header says.
        None => entry.gguf.as_ref().map_or_else(Default::default, |g| {
            (
                g.architecture.clone(),
                g.size_label.clone().unwrap_or_default(),
            )
        }),
    };
    OllamaDetails {
        parent_model: String::new(),
        format: "gguf",
        families: if family.is_empty() {
            Vec::new()
        } else {
            vec![family.clone()]
        },
        family,
        parameter_size,
        quantization_level: quantization,
    }
}

fn ollama_model(entry: &ModelEntry, loaded: bool) -> OllamaModel {
    let size = std::fs::metadata(&entry.path).map(|m| m.len()).unwrap_or(0);
    // A stable identity without hashing gigabytes: the file's path, size and time.
    let digest = Sha256::digest(format!("{}|{size}|{}", entry.path.display(), entry.created));
    let name = format!("{}:latest", entry.id);
    let expires_at = loaded.then(|| {
        let ahead = entry
            .keep_alive
            .map(|k| k.saturating_sub(entry.idle_for()))
            .unwrap_or(std::time::Duration::from_secs(100 * 365 * 24 * 3600));
        (chrono::Utc::now() + ahead).to_rfc3339()
    });
    let context_length = loaded
        .then(|| entry.loaded_engine().map(|e| e.info().n_ctx))
        .flatten();
    OllamaModel {
        model: name.clone(),
        name,
        modified_at: modified_at(entry),
        size,
        digest: format!("{digest:x}"),
        details: details(entry),
        expires_at,
        size_vram: loaded.then_some(0),
        context_length,
    }
}
