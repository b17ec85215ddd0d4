//! Loading a model and the handle the rest of the program holds: the one place
//! that creates llama.cpp models and contexts.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, Semaphore};

use crate::chat::ChatTemplate;
use crate::constraint::{CompiledConstraint, Constraint, ConstraintState};
use crate::embed::{EmbedJob, EmbedModel, EmbedOutputs, PendingEmbeddings, Pooling};
use crate::heads::{HeadError, M3Heads};
use crate::scheduler::{DraftModel, LlamaDecoder, Scheduler, SchedulerStats};
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
    /// Serve the weights from a mapping of the model file instead of a copy
    /// in memory. Off by default except on Metal (whose buffers use the
    /// mapping without a copy): a mapped file that is truncated or rewritten
    /// in place (`cp new.gguf model.gguf`) kills the process with SIGBUS at
    /// the next touch of a dropped page, and the copy costs only its read
    /// (SmolLM2 Q4_1, 98 MB: 0.23 s to the first token instead of 0.19 s, same
    /// decode speed and resident memory).
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
    /// Serve a generative (decoder) model as an embedding model: its
    /// hidden states mean-pooled and normalized (`{TIER}_EMBEDDING_MODE`).
    pub embedding_mode: bool,
    /// How greedy sequences guess ahead (`{TIER}_SPECULATIVE`).
    pub speculation: crate::Speculation,
    /// The smaller model of the same vocabulary that guesses for
    /// [`crate::Speculation::Draft`] (`{TIER}_DRAFT_MODEL_PATH`).
    pub draft_model: Option<PathBuf>,
    /// Bytes of prompt KV kept in host memory for prompts that return after
    /// their slot was reused (`{TIER}_PROMPT_CACHE_RAM`, in MiB; 0 turns it off).
    pub host_cache_bytes: usize,
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
            use_mmap: cfg!(feature = "metal"),
            use_mlock: false,
            parallel: 4,
            max_queue: 64,
            queue_timeout: std::time::Duration::from_secs(300),
            chat_template: None,
            embedding_mode: false,
            speculation: crate::Speculation::default(),
            host_cache_bytes: 1024 << 20,
            draft_model: None,
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
    /// Hidden size (the width of an embedding).
    pub n_embd: u32,
    /// How embeddings are pooled (embedding and reranker models only).
    pub pooling: Option<Pooling>,
    /// Most tokens one embedding or rerank input may have.
    pub max_input_tokens: u32,
    /// BGE-M3 heads found beside the model.
    pub has_sparse_head: bool,
    pub has_colbert_head: bool,
    add_bos: bool,
    add_eos: bool,
    add_sep: bool,
    bos: TokenId,
    eos: TokenId,
    sep: TokenId,
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

/// The engine thread's inbox: generation models take sequences, embedding and
/// reranker models take embedding jobs.
enum Queue {
    Generate(mpsc::Sender<Vec<Sequence>>),
    Embed(mpsc::Sender<EmbedJob>),
}

/// A loaded model with its scheduler thread. Dropping it stops accepting work,
/// lets accepted requests finish, and joins the thread.
pub struct Engine {
    info: Arc<ModelInfo>,
    model: Arc<LlamaModel>,
    grammars: crate::constraint::Grammars,
    /// Where requests go; `None` once the engine is shutting down.
    queue: Option<Queue>,
    queue_timeout: std::time::Duration,
    speculation: crate::Speculation,
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

/// The receiving end of an engine's queue, owned by its thread.
enum Inbox {
    Generate(mpsc::Receiver<Vec<Sequence>>),
    Embed(mpsc::Receiver<EmbedJob>),
}

/// What an engine's thread starts from: it loads the model, reports on
/// `ready` (the model and its info, or why it could not), then serves its
/// queue until the queue closes.
struct ThreadStart {
    backend: &'static LlamaBackend,
    path: PathBuf,
    config: EngineConfig,
    summary: crate::GgufSummary,
    ready: std::sync::mpsc::SyncSender<Ready>,
    stats: Arc<SchedulerStats>,
}

impl ThreadStart {
    fn run(self, inbox: Inbox) {
        let model = match load_model(self.backend, &self.path, &self.config) {
            Ok(model) => Arc::new(model),
            Err(e) => {
                let _ = self.ready.send(Err(e));
                return;
            }
        };
        match inbox {
            Inbox::Generate(requests) => self.serve_generation(&model, requests),
            Inbox::Embed(jobs) => self.serve_embeddings(&model, jobs),
        }
    }

    /// Reports a load that failed after the model was read.
    fn fail(&self, reason: String) {
        let _ = self.ready.send(Err(EngineError::LoadFailed {
            path: self.path.clone(),
            reason,
        }));
    }

    /// A decoder's context and the continuous-batching scheduler over it.
    fn serve_generation(self, model: &Arc<LlamaModel>, requests: mpsc::Receiver<Vec<Sequence>>) {
        let config = &self.config;
        let parallel = config.parallel.max(1);
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
        let ctx = match model.new_context(self.backend, ctx_params.clone()) {
            Ok(ctx) => ctx,
            Err(e) => return self.fail(format!("cannot create a context: {e}")),
        };
        let draft_model = match self.draft_model(model) {
            Ok(draft) => draft,
            Err(reason) => return self.fail(reason),
        };
        let draft = match &draft_model {
            Some(draft) => match draft.new_context(self.backend, ctx_params) {
                Ok(ctx) => Some(DraftModel::new(draft, ctx, parallel as usize)),
                Err(e) => {
                    return self.fail(format!("cannot create the draft model's context: {e}"))
                }
            },
            None => None,
        };
        let info = model_info(model, &self.path, config, ctx.n_ctx(), self.summary.clone());
        if self.ready.send(Ok((model.clone(), info))).is_err() {
            return;
        }
        let stats = self.stats.clone();
        let host_bytes = config.host_cache_bytes;
        let run = std::panic::AssertUnwindSafe(|| {
            let decoder = LlamaDecoder::new(model, ctx, draft);
            Scheduler::new(decoder, parallel as usize, host_bytes, self.stats).run(requests)
        });
        if std::panic::catch_unwind(run).is_err() {
            // The receiver is gone with the scheduler, so the handle sees the
            // engine as dead and the registry replaces it on the next request.
            tracing::error!("the engine's scheduler panicked; the model will be reloaded");
            stats.active.store(0, std::sync::atomic::Ordering::Relaxed);
            stats.waiting.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The draft model that `{TIER}_SPECULATIVE=draft` guesses with, checked
    /// to write every token as `model` does.
    fn draft_model(&self, model: &LlamaModel) -> Result<Option<LlamaModel>, String> {
        if self.config.speculation != crate::Speculation::Draft {
            return Ok(None);
        }
        let Some(path) = &self.config.draft_model else {
            return Err("draft speculation needs a draft model ({TIER}_DRAFT_MODEL_PATH)".into());
        };
        let draft = load_model(self.backend, path, &self.config).map_err(|e| e.to_string())?;
        if draft.is_recurrent() || draft.is_hybrid() {
            // Its state cannot drop rejected guesses: every guess would
            // recompute the whole sequence.
            return Err(format!(
                "the draft model {} is recurrent, and cannot drop the guesses the model rejects",
                path.display()
            ));
        }
        crate::scheduler::same_vocabulary(model, &draft).map_err(|difference| {
            format!(
                "the draft model {} does not share the model's vocabulary: {difference}",
                path.display()
            )
        })?;
        tracing::info!(path = %path.display(), "draft model loaded");
        Ok(Some(draft))
    }

    /// An encoder's context (embeddings or reranking) and the worker that
    /// packs jobs into its batches.
    fn serve_embeddings(self, model: &Arc<LlamaModel>, jobs: mpsc::Receiver<EmbedJob>) {
        let config = &self.config;
        let embed = match embed_model(model, &self.path, config, &self.summary) {
            Ok(embed) => embed,
            Err(error) => return self.fail(error.to_string()),
        };
        let n_batch = embed.n_batch as u32;
        let pooling = if embed.pooling == Pooling::Rank {
            LlamaPoolingType::Rank
        } else {
            // Per-token rows: pooled here, and BGE-M3's heads need them.
            LlamaPoolingType::None
        };
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_batch))
            .with_n_batch(n_batch)
            // Non-causal models must see a whole batch in one ubatch
            // (llama.cpp aborts otherwise): the worker never exceeds it.
            .with_n_ubatch(n_batch)
            .with_n_seq_max(embed.n_seq_max as u32)
            .with_kv_unified(true)
            .with_embeddings(true)
            .with_pooling_type(pooling)
            .with_n_threads(config.n_threads)
            .with_n_threads_batch(config.n_threads_batch);
        let ctx = match model.new_context(self.backend, ctx_params) {
            Ok(ctx) => ctx,
            Err(e) => return self.fail(format!("cannot create a context: {e}")),
        };
        let mut info = model_info(model, &self.path, config, ctx.n_ctx(), self.summary.clone());
        info.pooling = Some(embed.pooling);
        info.max_input_tokens = embed.max_input as u32;
        info.n_ctx = embed.max_input as u32;
        info.has_sparse_head = embed.heads.as_ref().is_some_and(|h| h.sparse.is_some());
        info.has_colbert_head = embed.heads.as_ref().is_some_and(|h| h.colbert.is_some());
        if self.ready.send(Ok((model.clone(), info))).is_err() {
            return;
        }
        let run =
            std::panic::AssertUnwindSafe(|| crate::embed::run(ctx, &embed, jobs, &self.stats));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!("the embedding worker panicked; the model will be reloaded");
            self.stats
                .active
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

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
        let mut summary = summary;
        if config.embedding_mode && summary.kind == ModelKind::Chat {
            summary.kind = ModelKind::Embedding;
        }
        let mut config = config;
        if let Some(train) = summary.context_length {
            // Past its training context a model degrades silently: never go beyond it.
            config.n_ctx = config.n_ctx.min(u32::try_from(train).unwrap_or(u32::MAX));
        }
        let parallel = config.parallel.max(1);
        let queue_timeout = config.queue_timeout;
        let speculation = config.speculation;
        let capacity_total = parallel as usize + config.max_queue;
        let (queue, inbox) = if summary.kind == ModelKind::Chat {
            let (tx, rx) = mpsc::channel(capacity_total);
            (Queue::Generate(tx), Inbox::Generate(rx))
        } else {
            let (tx, rx) = mpsc::channel(capacity_total);
            (Queue::Embed(tx), Inbox::Embed(rx))
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Ready>(1);
        let stats = Arc::new(SchedulerStats::default());
        let start = ThreadStart {
            backend: shared_backend()?,
            path: path.to_owned(),
            config,
            summary,
            ready: ready_tx,
            stats: stats.clone(),
        };
        let name = format!(
            "engine-{}",
            path.file_stem().unwrap_or_default().to_string_lossy()
        );
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || start.run(inbox))
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
            grammars: crate::constraint::Grammars::new(model.clone()),
            model,
            queue: Some(queue),
            queue_timeout,
            speculation,
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
        match &self.queue {
            Some(Queue::Generate(q)) => !q.is_closed(),
            Some(Queue::Embed(q)) => !q.is_closed(),
            None => false,
        }
    }

    /// Sequences that may be running or waiting at once.
    pub fn capacity(&self) -> usize {
        self.capacity_total
    }

    /// Requests accepted and not yet finished (queued, running, or streaming to a
    /// client that still holds its stream).
    pub fn in_flight(&self) -> usize {
        self.capacity_total - self.capacity.available_permits()
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

    /// The id of `text` when it is one control token of the vocabulary (such
    /// as `[TOOL_CALLS]`): a grammar must name such tokens by id, since their
    /// text is not what ordinary tokens spell.
    pub fn control_token(&self, text: &str) -> Option<TokenId> {
        let tokens = self.tokenize(text, false, true);
        let [token] = tokens[..] else {
            return None;
        };
        let plain = self
            .model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None);
        plain.is_empty().then_some(token)
    }

    /// Compiles a JSON schema or grammar for [`GenerateRequest::constraint`].
    /// A constraint this model cannot follow is [`EngineError::InvalidGrammar`].
    /// Blocking: the first call builds the vocabulary trie (a few hundred ms).
    pub fn compile_constraint(
        &self,
        constraint: &Constraint,
    ) -> Result<CompiledConstraint, EngineError> {
        if self.info.kind != ModelKind::Chat {
            return Err(EngineError::Unsupported(format!(
                "this is a {} model: it cannot generate text",
                self.info.kind.as_str()
            )));
        }
        self.grammars.compile(constraint)
    }

    /// Queues a request. Fails at once when the prompt cannot fit or the queue is full.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, EngineError> {
        Ok(self.submit_n(request, 1)?.remove(0))
    }

    /// What a generation request must satisfy before it is queued: a prompt
    /// of this vocabulary that leaves room in the context, and `n` choices
    /// the model's parallel slots can hold.
    fn check_request(&self, request: &GenerateRequest, n: u32) -> Result<(), EngineError> {
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
        Ok(())
    }

    /// Choice `choice` of `n` for `request`, as the scheduler runs it: its own
    /// sampler (seeded one past the previous choice), its event channel and
    /// its token budget.
    fn choice(
        &self,
        request: &GenerateRequest,
        choice: u32,
        n: u32,
        first_arrival: u64,
        events: mpsc::Sender<crate::Event>,
        max_tokens: u32,
    ) -> Sequence {
        let tokens: Vec<LlamaToken> = request.prompt.iter().map(|&t| LlamaToken(t)).collect();
        let mut sampling = request.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice));
        let (sampler, penalties) = sampling::build(&sampling, self.info.n_vocab as i32);
        let mut seq = Sequence::new(
            tokens,
            max_tokens,
            request.stop.clone(),
            sampler,
            events,
            request.span.clone(),
            first_arrival + u64::from(choice),
        );
        seq.penalties = penalties;
        seq.ignore_eos = request.ignore_eos;
        seq.special_text = request.special_text;
        seq.finish_within_budget = request.finish_within_budget;
        seq.thought = request.thought.map(crate::chat::ReasoningStream::new);
        seq.logprobs = request.logprobs;
        seq.reuse_prefix = request.sampling.seed.is_none();
        let greedy = request.sampling.temperature <= 0.0;
        let guessing =
            self.speculation != crate::Speculation::Off || !request.prediction.is_empty();
        if greedy && request.speculative && guessing {
            let prediction = request.prediction.iter().map(|&t| LlamaToken(t)).collect();
            seq.drafter = Some(crate::speculation::Drafter::with_prediction(prediction));
        }
        if n > 1 {
            seq.group = Some(crate::sequence::Group {
                id: first_arrival,
                leader: choice == 0,
            });
        }
        seq
    }

    /// Queues `n` independent choices for one prompt. The prompt is computed once
    /// and its KV copied to the other choices; each samples with its own chain
    /// (seeded requests use seed, seed+1, ...). One stream per choice.
    pub fn submit_n(
        &self,
        request: GenerateRequest,
        n: u32,
    ) -> Result<Vec<EventStream>, EngineError> {
        let sender = match &self.queue {
            Some(Queue::Generate(sender)) => sender,
            Some(Queue::Embed(_)) => {
                return Err(EngineError::Unsupported(format!(
                    "this is a {} model: it cannot generate text",
                    self.info.kind.as_str()
                )))
            }
            None => return Err(EngineError::ShutDown),
        };
        self.check_request(&request, n)?;
        let n_ctx = self.info.n_ctx;
        let prompt = request.prompt.len() as u32;
        let mut constraints = Vec::with_capacity(n as usize);
        if let Some(compiled) = &request.constraint {
            for _ in 0..n {
                constraints.push(ConstraintState::start(&self.model, compiled)?);
            }
        }
        let mut constraints = constraints.into_iter();
        let mut permits = Some(
            self.capacity
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| EngineError::QueueFull {
                    capacity: self.capacity_total,
                })?,
        );
        let max_tokens = request.max_tokens.clamp(1, n_ctx - prompt);
        let first_arrival = self
            .arrivals
            .fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + self.queue_timeout;
        let mut streams = Vec::with_capacity(n as usize);
        let mut group = Vec::with_capacity(n as usize);
        for choice in 0..n {
            let (events, rx) = mpsc::channel(max_tokens as usize + 2);
            let mut seq = self.choice(&request, choice, n, first_arrival, events, max_tokens);
            seq.constraint = constraints.next();
            seq.deadline = Some(deadline);
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

impl Engine {
    /// Queues inputs (token ids, specials included) of an embedding or reranker
    /// model. Inputs from concurrent requests share decodes. Fails at once when
    /// an input is too long, an output needs a head the model lacks, or the queue
    /// is full.
    pub fn embed(
        &self,
        inputs: Vec<Vec<TokenId>>,
        outputs: EmbedOutputs,
    ) -> Result<PendingEmbeddings, EngineError> {
        let sender = match &self.queue {
            Some(Queue::Embed(sender)) => sender,
            Some(Queue::Generate(_)) => {
                return Err(EngineError::Unsupported(format!(
                    "this is a {} model: it does not compute embeddings",
                    self.info.kind.as_str()
                )))
            }
            None => return Err(EngineError::ShutDown),
        };
        let reranker = self.info.pooling == Some(Pooling::Rank);
        if (outputs.sparse || outputs.colbert) && reranker {
            return Err(EngineError::Unsupported(
                "a reranker computes scores, not sparse or ColBERT embeddings".to_owned(),
            ));
        }
        if outputs.sparse && !self.info.has_sparse_head {
            return Err(EngineError::Unsupported(
                "sparse embeddings need BGE-M3's sparse_linear head (sparse_linear.pt or \
                 .safetensors) beside the model file, and this model has none"
                    .to_owned(),
            ));
        }
        if outputs.colbert && !self.info.has_colbert_head {
            return Err(EngineError::Unsupported(
                "ColBERT embeddings need BGE-M3's colbert_linear head (colbert_linear.pt or \
                 .safetensors) beside the model file, and this model has none"
                    .to_owned(),
            ));
        }
        if inputs.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.info.max_input_tokens;
        for (index, input) in inputs.iter().enumerate() {
            if input.is_empty() {
                return Err(EngineError::EmptyInput { index });
            }
            if input.len() > limit as usize {
                return Err(EngineError::InputTooLong {
                    index,
                    tokens: input.len(),
                    limit,
                });
            }
            self.check_tokens(input)?;
        }
        let permit =
            self.capacity
                .clone()
                .try_acquire_owned()
                .map_err(|_| EngineError::QueueFull {
                    capacity: self.capacity_total,
                })?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = EmbedJob {
            inputs: inputs
                .into_iter()
                .map(|i| i.into_iter().map(LlamaToken).collect())
                .collect(),
            outputs,
            reply,
            span: tracing::Span::current(),
        };
        sender.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull {
                capacity: self.capacity_total,
            },
            mpsc::error::TrySendError::Closed(_) => EngineError::ShutDown,
        })?;
        Ok(PendingEmbeddings {
            rx,
            _permit: permit,
        })
    }

    /// Tokenizes text for embedding: with the model's special tokens (`[CLS] … [SEP]`).
    pub fn tokenize_input(&self, text: &str) -> Vec<TokenId> {
        let mut tokens = self.tokenize(text, false, false);
        if self.info.add_bos && self.info.bos >= 0 {
            tokens.insert(0, self.info.bos);
        }
        if self.info.add_eos && self.info.eos >= 0 {
            tokens.push(self.info.eos);
        }
        tokens
    }

    /// Cuts an input to the model's limit, keeping the closing special token.
    pub fn truncate_input(&self, tokens: &mut Vec<TokenId>) {
        let limit = self.info.max_input_tokens as usize;
        if tokens.len() <= limit {
            return;
        }
        let closing =
            (self.info.add_eos && tokens.last() == Some(&self.info.eos)).then_some(self.info.eos);
        tokens.truncate(limit - usize::from(closing.is_some()));
        tokens.extend(closing);
    }

    /// A reranker's input for one (query, document) pair, laid out as llama.cpp's
    /// server does: `[BOS] query [EOS] [SEP] document [EOS]`, each special where
    /// the vocabulary asks for it (BERT: `[CLS] q [SEP] d [SEP]`).
    pub fn rerank_pair(&self, query: &[TokenId], document: &[TokenId]) -> Vec<TokenId> {
        let info = &self.info;
        let eos = if info.eos >= 0 { info.eos } else { info.sep };
        let mut pair = Vec::with_capacity(query.len() + document.len() + 4);
        if info.add_bos && info.bos >= 0 {
            pair.push(info.bos);
        }
        pair.extend_from_slice(query);
        if info.add_eos && eos >= 0 {
            pair.push(eos);
        }
        if info.add_sep && info.sep >= 0 {
            pair.push(info.sep);
        }
        pair.extend_from_slice(document);
        if info.add_eos && eos >= 0 {
            pair.push(eos);
        }
        pair
    }
}

/// How an encoder model is run: its pooling, heads and batch budget.
fn embed_model(
    model: &LlamaModel,
    path: &Path,
    config: &EngineConfig,
    summary: &crate::GgufSummary,
) -> Result<EmbedModel, HeadError> {
    let n_embd = model.n_embd().max(0) as usize;
    let heads = if summary.kind == ModelKind::Embedding {
        M3Heads::find(path, n_embd)?.map(Arc::new)
    } else {
        None
    };
    let pooling = match (summary.kind, summary.pooling_type) {
        // Converted rerankers carry no pooling type: their head needs RANK.
        (ModelKind::Reranker, _) => Pooling::Rank,
        // BGE-M3 defines its dense vector as the normalized CLS row.
        _ if heads.is_some() => Pooling::Cls,
        (_, Some(2)) => Pooling::Cls,
        (_, Some(3)) => Pooling::Last,
        _ => Pooling::Mean,
    };
    let train = model.n_ctx_train().max(1);
    // Past its training context an encoder has no position embeddings.
    let max_input = config.n_ctx.min(train).max(1);
    // One input must fit one decode, whatever `n_batch` says.
    let n_batch = config.n_batch.max(max_input) as usize;
    let max_input = max_input as usize;
    let vocab = model.vocab();
    let mut sparse_excluded: Vec<TokenId> = [vocab.bos(), vocab.eos(), vocab.sep(), vocab.pad()]
        .iter()
        .map(|t| t.0)
        .chain(summary.unknown_token_id.map(|t| t as TokenId))
        .filter(|&t| t >= 0)
        .collect();
    sparse_excluded.sort_unstable();
    sparse_excluded.dedup();
    tracing::info!(
        path = %path.display(),
        pooling = pooling.as_str(),
        sparse_head = heads.as_ref().is_some_and(|h| h.sparse.is_some()),
        colbert_head = heads.as_ref().is_some_and(|h| h.colbert.is_some()),
        "encoder model"
    );
    Ok(EmbedModel {
        pooling,
        n_embd,
        heads,
        sparse_excluded,
        n_batch,
        max_input,
        // llama.cpp allows at most 256 sequences in one context.
        n_seq_max: n_batch.min(128),
    })
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel tells the scheduler to finish accepted work and exit.
        self.queue.take();
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
    LlamaModel::load_from_file(backend, path, &params).map_err(|_| EngineError::LoadFailed {
        path: path.to_owned(),
        // llama.cpp returns no reason, only logs it (at error level, in the
        // server's log): a file cut short, damaged, or of an unknown architecture.
        reason: "llama.cpp could not read the weights (a file that is incomplete or \
                 damaged, or an architecture this build does not know; the server's \
                 log names the reason)"
            .to_owned(),
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
        n_embd: model.n_embd().max(0) as u32,
        pooling: None,
        max_input_tokens: n_ctx,
        has_sparse_head: false,
        has_colbert_head: false,
        add_bos: vocab.should_add_bos(),
        add_eos: vocab.should_add_eos(),
        add_sep: vocab.should_add_sep(),
        bos: vocab.bos().0,
        eos: vocab.eos().0,
        sep: vocab.sep().0,
    }
}
