//! Chat prompts: the model's own Jinja chat template, rendered as Hugging Face
//! `transformers` renders it.

mod pyjson;
mod reasoning;
mod template;
mod tool_calls;

pub use reasoning::*;
pub use template::*;
pub use tool_calls::*;
