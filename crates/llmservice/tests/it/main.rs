//! Integration tests: the whole server on the real SmolLM2-135M model (and the
//! MiniLM encoder for embeddings and reranking).
//! One test binary (each links llama.cpp statically).

mod batching;
mod cache;
mod common;
mod embeddings;
mod errors;
mod generation;
mod models;
mod streaming;
mod structured;
