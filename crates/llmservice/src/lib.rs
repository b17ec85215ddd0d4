//! llmservice: local language models behind an OpenAI-compatible HTTP API.
//!
//! Layers (see ARCHITECTURE.md): `api` → `models` → `engine` (a separate crate
//! that knows nothing of HTTP). `config` turns flags and environment into
//! `Settings`; `server` binds and shuts down.

pub mod api;
pub mod bench;
pub mod cache;
pub mod config;
pub mod metrics;
pub mod models;
pub mod server;
