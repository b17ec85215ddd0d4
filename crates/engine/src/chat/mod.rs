//! Chat prompts: the model's own Jinja chat template, rendered as Hugging Face
//! `transformers` renders it.

mod pyjson;
mod template;

pub use template::*;
