//! Built-in function rounds: generate, run the built-in functions the model
//! calls, append their results and generate again, until the model answers
//! (or calls something the client must run).

use std::sync::Arc;
use std::time::Instant;

use engine::chat::{
    normalize_messages, OutputParser, ReasoningStream, StreamDelta, ToolCall, ToolCallFormat,
    ToolCallStream,
};
use engine::{CompiledConstraint, Engine, FinishReason, TokenLogprob, Usage};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};

use super::constraints::triggered_calls;
use super::tools::{ToolChoice, ToolPlan};
use super::{builtins, ChatPrompt, Prompt};
use crate::error::RequestError;
use crate::generation::{self, Choice, ChoiceEvent, ChoiceRecord};
use crate::settings::GenerationDefaults;
use crate::telemetry::Metrics;
use crate::wire::SamplingFields;

/// Most rounds a request with built-in functions runs before answering with
/// whatever the model said last.
const MAX_BUILTIN_ROUNDS: usize = 5;

/// What the rounds need that outlives the handler.
pub struct Rounds {
    pub metrics: Arc<Metrics>,
    /// The model's id, for its metrics.
    pub model_id: String,
    pub defaults: GenerationDefaults,
    pub engine: Arc<Engine>,
    pub format: ToolCallFormat,
    /// A thinking model's reasoning goes apart from its answer.
    pub reasoning: bool,
    pub plan: ToolPlan,
    pub extra: Option<Map<String, Value>>,
    pub sampling: SamplingFields,
    pub logprobs: Option<u32>,
    pub started: Instant,
}

/// What one round said: reasoning and content already went out; calls are
/// held.
struct Round {
    reasoning: String,
    content: String,
    held: Vec<StreamDelta>,
    finish: FinishReason,
}

impl Rounds {
    /// The rounds as one choice's events. Content streams out as it is
    /// generated in every round (rounds after the first are set off by a blank
    /// line); calls are held to the end of their round, and only the last
    /// round's reach the client. `Done` carries the usage of every round.
    /// `prompt` is the first round's, rendered from `messages`.
    pub fn run(
        mut self,
        mut messages: Vec<Value>,
        prompt: Prompt,
        mut constraint: Option<CompiledConstraint>,
    ) -> impl Stream<Item = Result<ChoiceEvent, RequestError>> + Send {
        async_stream::try_stream! {
            let mut total = Usage::default();
            let mut pending: Vec<TokenLogprob> = Vec::new();
            let (mut said, mut thought_said) = (false, false);
            let mut first = Some(prompt);
            for round in 0..MAX_BUILTIN_ROUNDS {
                let prompt = match first.take() {
                    Some(prompt) => prompt,
                    None => self.prompt(&messages)?,
                };
                let open = prompt.thinking_open;
                if round > 0 {
                    // Later rounds answer freely, but a call they open is made valid.
                    constraint = triggered_calls(&self.engine, &self.plan, self.format).await?;
                }
                let choice = self.submit(prompt, constraint.take()).await?;
                let parser = OutputParser {
                    reasoning: self.reasoning.then(|| ReasoningStream::new(open)),
                    calls: Some(ToolCallStream::new(self.format)),
                };
                let mut events = Box::pin(choice.events(parser));
                let mut this = Round {
                    reasoning: String::new(),
                    content: String::new(),
                    held: Vec::new(),
                    finish: FinishReason::Stop,
                };
                let (mut set_off, mut set_off_thought) = (said, thought_said);
                while let Some(event) = events.next().await {
                    match event? {
                        ChoiceEvent::Delta(StreamDelta::Content(text), logprobs) if !text.is_empty() => {
                            pending.extend(logprobs);
                            this.content.push_str(&text);
                            let text = if std::mem::take(&mut set_off) { format!("\n\n{text}") } else { text };
                            said = true;
                            yield ChoiceEvent::Delta(StreamDelta::Content(text), std::mem::take(&mut pending));
                        }
                        // Every round's reasoning goes out as it comes, set off as content is.
                        ChoiceEvent::Delta(StreamDelta::Reasoning(text), logprobs) => {
                            pending.extend(logprobs);
                            this.reasoning.push_str(&text);
                            let text = if std::mem::take(&mut set_off_thought) { format!("\n\n{text}") } else { text };
                            thought_said = true;
                            yield ChoiceEvent::Delta(StreamDelta::Reasoning(text), std::mem::take(&mut pending));
                        }
                        ChoiceEvent::Delta(delta, logprobs) => {
                            pending.extend(logprobs);
                            if !matches!(delta, StreamDelta::Content(_)) {
                                this.held.push(delta);
                            }
                        }
                        ChoiceEvent::Done(finish, usage) => {
                            total.prompt_tokens += usage.prompt_tokens;
                            total.completion_tokens += usage.completion_tokens;
                            total.cached_tokens += usage.cached_tokens;
                            this.finish = finish;
                        }
                    }
                }
                let calls = calls_of(&this.held);
                let last_round = round + 1 == MAX_BUILTIN_ROUNDS;
                if calls.is_empty() || last_round || !calls.iter().all(|c| self.plan.builtin(&c.name).is_some()) {
                    for delta in this.held {
                        yield ChoiceEvent::Delta(delta, std::mem::take(&mut pending));
                    }
                    if !pending.is_empty() {
                        yield ChoiceEvent::Delta(StreamDelta::Content(String::new()), std::mem::take(&mut pending));
                    }
                    yield ChoiceEvent::Done(this.finish, total);
                    return;
                }
                tracing::debug!(round, calls = calls.len(), "running built-in functions");
                self.run_calls(&mut messages, this, &calls);
            }
        }
    }

    /// Renders the conversation so far.
    fn prompt(&self, messages: &[Value]) -> Result<Prompt, RequestError> {
        let info = self.engine.info();
        let template = info
            .chat_template
            .as_ref()
            .ok_or_else(|| RequestError::invalid("model", "the model has no chat template"))?;
        let prompt = ChatPrompt {
            template,
            extra: self.extra.as_ref(),
        };
        prompt.tokens(&self.engine, messages, Some(&self.plan))
    }

    /// Starts one round's generation.
    async fn submit(
        &self,
        prompt: Prompt,
        constraint: Option<CompiledConstraint>,
    ) -> Result<Choice, RequestError> {
        let prompt_open = prompt.thinking_open;
        let mut request = generation::build_request(
            &self.sampling,
            &self.defaults,
            &self.engine,
            prompt.tokens,
            self.logprobs,
        )?;
        request.constraint = constraint;
        request.special_text = true;
        request.finish_within_budget = true;
        request.thought = self.reasoning.then_some(prompt_open);
        let streams = self.engine.submit_n(request, 1)?;
        let mut choices =
            generation::start(streams, &self.metrics, &self.model_id, self.started).await?;
        Ok(choices.remove(0))
    }

    /// Runs the round's calls and appends them and their results to the
    /// conversation. The call the client insisted on has been made: from now
    /// on the model answers freely.
    fn run_calls(&mut self, messages: &mut Vec<Value>, round: Round, calls: &[ToolCall]) {
        let wire_calls: Vec<crate::wire::ToolCall> = calls.iter().map(Into::into).collect();
        let mut turn = json!({
            "role": "assistant",
            "content": round.content,
            "tool_calls": wire_calls,
        });
        // Thinking templates show a tool loop's thoughts to its next round.
        if !round.reasoning.is_empty() {
            turn["reasoning_content"] = round.reasoning.into();
        }
        messages.push(turn);
        for call in calls {
            let builtin = self
                .plan
                .builtin(&call.name)
                .expect("only built-ins are run");
            let result = builtins::execute(builtin, &call.arguments);
            messages.push(json!({
                "role": "tool",
                "tool_call_id": call.id,
                "name": call.name,
                "content": result.to_string(),
            }));
        }
        normalize_messages(messages);
        if self.plan.forced() {
            self.plan.choice = ToolChoice::Auto;
        }
    }
}

/// The calls a round's held pieces spell out.
fn calls_of(held: &[StreamDelta]) -> Vec<ToolCall> {
    let mut record = ChoiceRecord::default();
    for delta in held {
        record.record(delta, &[]);
    }
    record.output.tool_calls
}
