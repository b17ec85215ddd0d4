//! Rendering a conversation into prompt tokens with the model's chat template.

use engine::chat::{ChatTemplate, RenderInput};
use serde_json::{Map, Value};

use super::tools::{self, ToolPlan};
use crate::error::RequestError;

/// What rendering a conversation needs besides its messages.
pub struct ChatPrompt<'a> {
    pub template: &'a ChatTemplate,
    /// Extra template variables (`chat_template_kwargs`).
    pub extra: Option<&'a Map<String, Value>>,
}

/// A rendered conversation.
pub struct Prompt {
    pub tokens: Vec<engine::TokenId>,
    /// The prompt opened the model's `<think>` block: its output starts inside.
    pub thinking_open: bool,
    /// The prompt closed the block itself: the model answers without one.
    pub thinking_closed: bool,
}

impl ChatPrompt<'_> {
    /// The prompt tokens for `messages`, tools shown the way the template can.
    pub fn tokens(
        &self,
        engine: &engine::Engine,
        messages: &[Value],
        plan: Option<&ToolPlan>,
    ) -> Result<Prompt, RequestError> {
        let plan = plan.filter(|p| p.active());
        let tools = plan.map(ToolPlan::template_tools);
        let mut messages = messages.to_vec();
        let show_tools = self.template.supports_tools();
        if !show_tools {
            tools::adapt_for_generic(&mut messages, plan);
        }
        let prompt = self
            .template
            .render(&RenderInput {
                messages: &messages,
                tools: tools.as_deref().filter(|_| show_tools),
                add_generation_prompt: true,
                extra: self.extra,
            })
            .map_err(|e| RequestError::invalid("messages", e.to_string()))?;
        Ok(Prompt {
            tokens: engine.tokenize_chat_prompt(&prompt),
            thinking_open: engine::chat::prompt_opens_thinking(&prompt),
            thinking_closed: engine::chat::prompt_closes_thinking(&prompt),
        })
    }
}
