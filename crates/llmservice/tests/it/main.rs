//! Integration tests: the whole server on the real SmolLM2-135M model.
//! One test binary (each links llama.cpp statically).

mod batching;
mod cache;
mod common;
mod errors;
mod generation;
mod models;
mod streaming;
