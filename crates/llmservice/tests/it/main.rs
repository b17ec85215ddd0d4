//! Integration tests: the whole server on the real SmolLM2-135M model (and the
//! MiniLM encoder for embeddings and reranking).
//! One test binary (each links llama.cpp statically).

// A test reads top to bottom as one scenario; the length limit is for the server's code.
#![allow(clippy::too_many_lines)]

mod auth;
mod batching;
mod cache;
mod common;
mod console;
mod embeddings;
mod errors;
mod generation;
mod hub;
mod models;
mod rag;
mod rag_files;
mod rag_qdrant;
mod seeds;
mod speculation;
mod streaming;
mod structured;
mod thinking;
mod upstream;
