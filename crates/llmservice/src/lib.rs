//! llmservice: local language models behind an OpenAI-compatible HTTP API.
//!
//! Layers (see ARCHITECTURE.md), each depending only on those below it:
//! - `api`: the router, thin handlers, answers, SSE, the cache at the edge;
//! - `chat`, `generation`: what a request means, apart from HTTP;
//! - `wire`: the serde shapes of requests and answers;
//! - `models` (registry), `cache` (the response cache), `response_store`
//!   (the Responses API's stored answers), `keys` (who may call), `telemetry`;
//! - `retrieval` (the rag crate over our engines), `extract` (uploaded files to
//!   text, HTML and PDF in a child process);
//! - `engine`, a separate crate that knows nothing of HTTP.
//!
//! `cli` and `settings` turn flags and environment into `Settings`; `state`
//! is what handlers share; `server` binds and shuts down.

pub mod analytics;
pub mod api;
pub mod backoff;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod downloads;
pub mod error;
pub mod extract;
pub mod generation;
pub mod hub;
pub mod keys;
pub mod models;
pub mod pull;
pub mod response_store;
pub mod retrieval;
pub mod server;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub use ::wire;
