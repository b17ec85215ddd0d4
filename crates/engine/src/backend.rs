//! Loading a model and the handle the rest of the program holds: the one place
//! that creates llama.cpp models and contexts.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, Semaphore};

use crate::chat::ChatTemplate;
use crate::scheduler::{Scheduler, SchedulerStats};
use crate::sequence::Sequence;
use crate::{sampling, EngineError, EventStream, GenerateRequest, ModelKind, TokenId};

/// How to load and run one model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// KV cache cells shared by all sequences; also the most one sequence may use.
    pub n_ctx: u32,
    /// Token budget of one decode step (prompt chunks + one token per stream).
    pub n_batch: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    /// Layers to offload to a GPU; negative means all.
    pub n_gpu_layers: i32,
    pub use_mmap: bool,
    pub use_mlock: bool,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Requests that may wait for a free sequence beyond the running ones.
    pub max_queue: usize,
    /// How long a request may wait for its first admission before failing.
    pub queue_timeout: std::time::Duration,
    /// Jinja chat template to use instead of the GGUF's own (required for models without one).
    pub chat_template: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: threads,
            n_threads_batch: threads,
            n_gpu_layers: 0,
            use_mmap: true,
            use_mlock: false,
            parallel: 4,
            max_queue: 64,
            queue_timeout: std::time::Duration::from_secs(300),
            chat_template: None,
        }
    }
}

/// What the server needs to know about a loaded model.
#[derive(Debug)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub kind: ModelKind,
    pub architecture: String,
    /// Context size in effect (KV cells), after capping by the model's training context.
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    pub n_vocab: u32,
    pub size_bytes: u64,
    pub n_params: u64,
    pub parallel: u32,
    pub chat_template: Option<ChatTemplate>,
    /// Why there is no chat template, when there is none.
    pub chat_template_error: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    add_bos: bool,
}

pub(crate) fn shared_backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Inference(format!("llama.cpp backend: {e}")))
}

/// A loaded model with its scheduler thread. Dropping it stops accepting work,
/// lets accepted requests finish, and joins the thread.
pub struct Engine {
    info: Arc<ModelInfo>,
    model: Arc<LlamaModel>,
    requests: Option<mpsc::Sender<Vec<Sequence>>>,
    queue_timeout: std::time::Duration,
    capacity: Arc<Semaphore>,
    capacity_total: usize,
    stats: Arc<SchedulerStats>,
    arrivals: std::sync::atomic::AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.info.path)
            .finish()
    }
}

type Ready = Result<(Arc<LlamaModel>, ModelInfo), EngineError>;

impl Engine {
    /// Loads the model on a new thread and returns once it can take requests.
    /// Blocking: call it from a blocking-friendly thread.
    pub fn load(path: &Path, config: EngineConfig) -> Result<Self, EngineError> {
        if !path.is_file() {
            return Err(EngineError::ModelNotFound(path.to_owned()));
        }
        let summary = crate::inspect(path).ok_or_else(|| EngineError::LoadFailed {
            path: path.to_owned(),
            reason: "not a readable GGUF file".to_owned(),
        })?;
        let backend = shared_backend()?;
        let mut config = config;
        if let Some(train) = summary.context_length {
            // Past its training context a model degrades silently: never go beyond it.
            config.n_ctx = config.n_ctx.min(u32::try_from(train).unwrap_or(u32::MAX));
        }
        let parallel = config.parallel.max(1);
        let queue_timeout = config.queue_timeout;
        let capacity_total = parallel as usize + config.max_queue;
        let (requests, request_rx) = mpsc::channel(capacity_total);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Ready>(1);
        let stats = Arc::new(SchedulerStats::default());
        let thread_stats = stats.clone();
        let thread_path = path.to_owned();
        let name = format!(
            "engine-{}",
            path.file_stem().unwrap_or_default().to_string_lossy()
        );
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let model = match load_model(backend, &thread_path, &config) {
                    Ok(model) => Arc::new(model),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let ctx_params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(config.n_ctx.max(16)))
                    .with_n_batch(config.n_batch)
                    .with_n_ubatch(config.n_batch)
                    .with_n_seq_max(parallel)
                    // Unified KV lets one sequence use the whole cache and makes partial
                    // sequence copies safe (they abort the process otherwise).
                    .with_kv_unified(true)
                    .with_n_threads(config.n_threads)
                    .with_n_threads_batch(config.n_threads_batch);
                let ctx = match model.new_context(backend, ctx_params) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EngineError::LoadFailed {
                            path: thread_path,
                            reason: format!("cannot create a context: {e}"),
                        }));
                        return;
                    }
                };
                let info = model_info(&model, &thread_path, &config, ctx.n_ctx(), summary);
                if ready_tx.send(Ok((model.clone(), info))).is_err() {
                    return;
                }
                let stats = thread_stats.clone();
                let run = std::panic::AssertUnwindSafe(|| {
                    Scheduler::new(&model, ctx, parallel as usize, thread_stats).run(request_rx)
                });
                if std::panic::catch_unwind(run).is_err() {
                    // The receiver is gone with the scheduler, so the handle sees the
                    // engine as dead and the registry replaces it on the next request.
                    tracing::error!("the engine's scheduler panicked; the model will be reloaded");
                    stats.active.store(0, std::sync::atomic::Ordering::Relaxed);
                    stats.waiting.store(0, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .map_err(|e| EngineError::Inference(format!("cannot spawn engine thread: {e}")))?;
        let (model, info) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(EngineError::LoadFailed {
                    path: path.to_owned(),
                    reason: "the engine thread died while loading".to_owned(),
                });
            }
        };
        tracing::info!(
            path = %path.display(),
            n_ctx = info.n_ctx,
            parallel,
            kind = info.kind.as_str(),
            chat_template = info.chat_template.is_some(),
            "model loaded"
        );
        Ok(Self {
            info: Arc::new(info),
            model,
            requests: Some(requests),
            queue_timeout,
            capacity: Arc::new(Semaphore::new(capacity_total)),
            capacity_total,
            stats,
            arrivals: Default::default(),
            thread: Some(thread),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// False once the scheduler thread has stopped (it panicked): the engine can
    /// take no more requests and should be replaced.
    pub fn is_alive(&self) -> bool {
        self.requests.as_ref().is_some_and(|r| !r.is_closed())
    }

    /// Sequences that may be running or waiting at once.
    pub fn capacity(&self) -> usize {
        self.capacity_total
    }

    /// Text to tokens. `add_special` adds BOS when the model wants one;
    /// `parse_special` turns special-token text (`<|im_start|>`) into its token.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let add_bos = add_special && self.info.add_bos;
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Tokenizes a rendered chat prompt: the template already wrote BOS when the
    /// model uses one, so it is added only if the template did not.
    pub fn tokenize_chat_prompt(&self, prompt: &str) -> Vec<TokenId> {
        let template_wrote_bos =
            !self.info.bos_token.is_empty() && prompt.starts_with(&self.info.bos_token);
        self.tokenize(prompt, !template_wrote_bos, true)
    }

    /// Tokens to text (special tokens rendered as text when `special`).
    pub fn detokenize(&self, tokens: &[TokenId], special: bool) -> Result<String, EngineError> {
        self.check_tokens(tokens)?;
        let tokens: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t)).collect();
        let bytes = self.model.vocab().detokenize(&tokens, false, special);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn check_tokens(&self, tokens: &[TokenId]) -> Result<(), EngineError> {
        let n_vocab = self.info.n_vocab;
        match tokens.iter().find(|&&t| t < 0 || t as u32 >= n_vocab) {
            Some(&token) => Err(EngineError::InvalidToken {
                token: token.into(),
                n_vocab,
            }),
            None => Ok(()),
        }
    }

    /// Queues a request. Fails at once when the prompt cannot fit or the queue is full.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, EngineError> {
        Ok(self.submit_n(request, 1)?.remove(0))
    }

    /// Queues `n` independent choices for one prompt. The prompt is computed once
    /// and its KV copied to the other choices; each samples with its own chain
    /// (seeded requests use seed, seed+1, ...). One stream per choice.
    pub fn submit_n(
        &self,
        request: GenerateRequest,
        n: u32,
    ) -> Result<Vec<EventStream>, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let parallel = self.info.parallel;
        if n == 0 || n > parallel {
            return Err(EngineError::TooManyChoices {
                requested: n,
                parallel,
            });
        }
        self.check_tokens(&request.prompt)?;
        self.check_tokens(
            &request
                .sampling
                .logit_bias
                .iter()
                .map(|b| b.0)
                .collect::<Vec<_>>(),
        )?;
        let n_ctx = self.info.n_ctx;
        let prompt = request.prompt.len() as u32;
        if prompt >= n_ctx {
            return Err(EngineError::ContextLengthExceeded {
                n_ctx,
                requested: prompt + 1,
                prompt,
                completion: 1,
            });
        }
        let mut permits = Some(
            self.capacity
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| EngineError::QueueFull {
                    capacity: self.capacity_total,
                })?,
        );
        let sender = self.requests.as_ref().ok_or(EngineError::ShutDown)?;
        let max_tokens = request.max_tokens.clamp(1, n_ctx - prompt);
        let tokens: Vec<LlamaToken> = request.prompt.iter().map(|&t| LlamaToken(t)).collect();
        let first_arrival = self
            .arrivals
            .fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + self.queue_timeout;
        let mut streams = Vec::with_capacity(n as usize);
        let mut group = Vec::with_capacity(n as usize);
        for choice in 0..n {
            let (events, rx) = mpsc::channel(max_tokens as usize + 2);
            let mut sampling = request.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice));
            let sampler = sampling::build_chain(&sampling, self.info.n_vocab as i32);
            let mut seq = Sequence::new(
                tokens.clone(),
                max_tokens,
                request.stop.clone(),
                sampler,
                events,
                request.span.clone(),
                first_arrival + u64::from(choice),
            );
            seq.ignore_eos = request.ignore_eos;
            seq.logprobs = request.logprobs;
            seq.reuse_prefix = request.sampling.seed.is_none();
            seq.deadline = Some(deadline);
            if n > 1 {
                seq.group = Some(crate::sequence::Group {
                    id: first_arrival,
                    leader: choice == 0,
                });
            }
            group.push(seq);
            let permit = if choice + 1 == n {
                permits.take()
            } else {
                permits.as_mut().and_then(|p| p.split(1))
            };
            streams.push(EventStream {
                rx,
                _permit: permit.expect("one permit per choice"),
            });
        }
        // One message, so the scheduler sees the choices together and admits them at once.
        sender.try_send(group).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull {
                capacity: self.capacity_total,
            },
            mpsc::error::TrySendError::Closed(_) => EngineError::ShutDown,
        })?;
        Ok(streams)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel tells the scheduler to finish accepted work and exit.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn load_model(
    backend: &LlamaBackend,
    path: &Path,
    config: &EngineConfig,
) -> Result<LlamaModel, EngineError> {
    let gpu_layers = if config.n_gpu_layers < 0 {
        i32::MAX as u32
    } else {
        config.n_gpu_layers as u32
    };
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
        .with_use_mmap(config.use_mmap)
        .with_use_mlock(config.use_mlock);
    LlamaModel::load_from_file(backend, path, &params).map_err(|e| EngineError::LoadFailed {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn model_info(
    model: &LlamaModel,
    path: &Path,
    config: &EngineConfig,
    n_ctx: u32,
    summary: crate::GgufSummary,
) -> ModelInfo {
    let vocab = model.vocab();
    let special_text = |token: LlamaToken| {
        if token.0 < 0 {
            return String::new();
        }
        String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
    };
    let bos_token = special_text(vocab.bos());
    let eos_token = special_text(vocab.eos());
    let source = match &config.chat_template {
        Some(source) => Some(source.clone()),
        None => model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
    };
    let (chat_template, chat_template_error) = match source {
        Some(source) => match ChatTemplate::new(&source, &bos_token, &eos_token) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (
            None,
            Some(
                "the model has no chat template; configure one with {TIER}_CHAT_TEMPLATE"
                    .to_owned(),
            ),
        ),
    };
    ModelInfo {
        path: path.to_owned(),
        kind: summary.kind,
        architecture: summary.architecture,
        n_ctx,
        n_ctx_train: model.n_ctx_train(),
        n_vocab: model.n_vocab().max(0) as u32,
        size_bytes: model.size(),
        n_params: model.n_params(),
        parallel: config.parallel.max(1),
        chat_template,
        chat_template_error,
        bos_token,
        eos_token,
        add_bos: vocab.should_add_bos(),
    }
}
