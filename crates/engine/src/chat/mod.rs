//! Chat prompts: the model's own Jinja chat template, rendered as Hugging Face
//! `transformers` renders it.

mod pyjson;
mod template;
mod tool_calls;

pub use template::*;
pub use tool_calls::*;
