//! A thinking model's reasoning, told apart from its answer.
//!
//! Models whose chat template teaches a `<think>` block (Qwen 3, QwQ,
//! DeepSeek-R1 and its distills) open their answer with one. llama-server
//! (`--reasoning-format deepseek`, its default), vLLM's reasoning parsers and
//! Ollama hand that block to the client apart from the answer, as
//! `reasoning_content` or `thinking`, so that clients show the answer alone
//! and do not send the thoughts back as the answer. Some templates open the
//! block in the prompt itself (the generation prompt ends with `<think>\n`),
//! and then the output starts inside it, with no opening tag.
//!
//! As the tool-call parser does, the stream decides only from text it has seen
//! in full, holding back what may still become a tag, so its pieces joined do
//! not depend on how the text was cut.

use super::{StreamDelta, ToolCallStream};

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// Whether a chat template teaches its model a `<think>` block.
pub fn template_thinks(template_source: &str) -> bool {
    template_source.contains(THINK_CLOSE)
}

/// Whether a rendered prompt leaves a `<think>` block open for the model.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_OPEN)
}

/// Whether a rendered prompt closes the model's `<think>` block itself (Qwen
/// 3 with `enable_thinking: false`): the model answers without one.
pub fn prompt_closes_thinking(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_CLOSE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: a `<think>` block may open.
    Start,
    /// The prompt opened the block, and nothing but whitespace came yet: the
    /// model may write the opening tag again, which is no thought.
    Opened,
    /// Inside the block.
    Thinking,
    /// Just past the block: the whitespace that separates it from the answer.
    Closed,
    /// The answer: everything else is content.
    Answer,
}

/// Splits a thinking model's output, fragment by fragment, into
/// [`StreamDelta::Reasoning`] (the block's text, without its tags and the
/// whitespace around it) and [`StreamDelta::Content`] (everything else).
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    state: State,
    /// Text received and not yet given out.
    buf: String,
    /// Whether any reasoning has been given out (leading whitespace is not).
    said: bool,
}

impl ReasoningStream {
    /// A stream for an output that starts inside the block when `open` (the
    /// prompt opened it, see [`prompt_opens_thinking`]).
    pub fn new(open: bool) -> Self {
        Self {
            state: if open { State::Opened } else { State::Start },
            buf: String::new(),
            said: false,
        }
    }

    /// The pieces that `text`, appended to the output, completes.
    pub fn push(&mut self, text: &str) -> Vec<StreamDelta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.step(false, &mut out);
        out
    }

    /// Whether the block is over, or the output turned out to have none: what
    /// follows is the answer.
    pub fn answering(&self) -> bool {
        matches!(self.state, State::Closed | State::Answer)
    }

    /// The output's end: what was held back, as what it turned out to be (a
    /// block the budget cut is reasoning all the same).
    pub fn finish(&mut self) -> Vec<StreamDelta> {
        let mut out = Vec::new();
        self.step(true, &mut out);
        out
    }

    fn step(&mut self, last: bool, out: &mut Vec<StreamDelta>) {
        loop {
            match self.state {
                State::Start => {
                    let text = self.buf.trim_start();
                    if let Some(rest) = text.strip_prefix(THINK_OPEN) {
                        self.buf = rest.to_owned();
                        self.state = State::Thinking;
                    } else if !last && THINK_OPEN.starts_with(text) {
                        return;
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Opened => {
                    let text = self.buf.trim_start();
                    if let Some(rest) = text.strip_prefix(THINK_OPEN) {
                        self.buf = rest.to_owned();
                    } else if !last && THINK_OPEN.starts_with(text) {
                        return;
                    }
                    self.state = State::Thinking;
                }
                State::Thinking => {
                    if let Some(i) = self.buf.find(THINK_CLOSE) {
                        let rest = self.buf.split_off(i + THINK_CLOSE.len());
                        self.buf.truncate(i);
                        let text = std::mem::replace(&mut self.buf, rest);
                        self.reason(text.trim_end(), out);
                        self.state = State::Closed;
                        continue;
                    }
                    // Hold back what may yet be the closing tag, and trailing
                    // whitespace, which the tag would make the block's end.
                    let keep = if last {
                        self.buf.len() - self.buf.trim_end().len()
                    } else {
                        let tag = partial_close(&self.buf);
                        let body = &self.buf[..self.buf.len() - tag];
                        self.buf.len() - body.trim_end().len()
                    };
                    let rest = self.buf.split_off(self.buf.len() - keep);
                    let text = std::mem::replace(&mut self.buf, rest);
                    self.reason(&text, out);
                    if last {
                        self.buf.clear();
                    }
                    return;
                }
                State::Closed => {
                    let text = self.buf.trim_start();
                    if text.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    self.buf = text.to_owned();
                    self.state = State::Answer;
                }
                State::Answer => {
                    if !self.buf.is_empty() {
                        out.push(StreamDelta::Content(std::mem::take(&mut self.buf)));
                    }
                    return;
                }
            }
        }
    }

    fn reason(&mut self, text: &str, out: &mut Vec<StreamDelta>) {
        let text = if self.said { text } else { text.trim_start() };
        if !text.is_empty() {
            self.said = true;
            out.push(StreamDelta::Reasoning(text.to_owned()));
        }
    }
}

/// Length of the longest proper prefix of `</think>` that `text` ends with.
fn partial_close(text: &str) -> usize {
    (1..THINK_CLOSE.len())
        .rev()
        .find(|&n| text.ends_with(&THINK_CLOSE[..n]))
        .unwrap_or(0)
}

/// How a choice's generated text becomes the pieces of its answer: the
/// reasoning split off first (thinking models), then the rest through the
/// tool-call parser (when tools were offered). Without either, text is content.
#[derive(Default)]
pub struct OutputParser {
    pub reasoning: Option<ReasoningStream>,
    pub calls: Option<ToolCallStream>,
}

impl OutputParser {
    pub fn push(&mut self, text: &str) -> Vec<StreamDelta> {
        let pieces = match &mut self.reasoning {
            Some(reasoning) => reasoning.push(text),
            None => vec![StreamDelta::Content(text.to_owned())],
        };
        self.route(pieces)
    }

    pub fn finish(&mut self) -> Vec<StreamDelta> {
        let pieces = self
            .reasoning
            .as_mut()
            .map(ReasoningStream::finish)
            .unwrap_or_default();
        let mut out = self.route(pieces);
        out.extend(
            self.calls
                .as_mut()
                .map(ToolCallStream::finish)
                .unwrap_or_default(),
        );
        out
    }

    fn route(&mut self, pieces: Vec<StreamDelta>) -> Vec<StreamDelta> {
        let Some(calls) = &mut self.calls else {
            return pieces;
        };
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                StreamDelta::Content(text) => out.extend(calls.push(&text)),
                other => out.push(other),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCallFormat;

    /// The reasoning and the content that `fragments` become.
    fn split(open: bool, fragments: &[&str]) -> (String, String) {
        let mut stream = ReasoningStream::new(open);
        let mut pieces = Vec::new();
        for fragment in fragments {
            pieces.extend(stream.push(fragment));
        }
        pieces.extend(stream.finish());
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces {
            match piece {
                StreamDelta::Reasoning(text) => {
                    assert!(!text.is_empty());
                    reasoning += &text
                }
                StreamDelta::Content(text) => content += &text,
                other => panic!("unexpected {other:?}"),
            }
        }
        (reasoning, content)
    }

    /// Every way of cutting `text` in two, and one character at a time.
    fn every_cut(open: bool, text: &str) -> (String, String) {
        let whole = split(open, &[text]);
        for (i, _) in text.char_indices().skip(1) {
            assert_eq!(split(open, &[&text[..i], &text[i..]]), whole, "cut at {i}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(open, &chars), whole, "char by char");
        whole
    }

    #[test]
    fn a_block_is_reasoning_and_the_rest_the_answer() {
        let text = "<think>\nThe user greets me.\n\nI greet back.\n</think>\n\nHello!";
        assert_eq!(
            every_cut(false, text),
            (
                "The user greets me.\n\nI greet back.".to_owned(),
                "Hello!".to_owned()
            )
        );
    }

    #[test]
    fn an_answer_without_a_block_is_untouched() {
        for text in ["Hello <think> there", "  Hi", "<thinking is hard", "<", ""] {
            assert_eq!(every_cut(false, text), (String::new(), text.to_owned()));
        }
    }

    #[test]
    fn a_block_the_prompt_opened_needs_no_opening_tag() {
        let text = "Let me see.</think>Four.";
        assert_eq!(
            every_cut(true, text),
            ("Let me see.".to_owned(), "Four.".to_owned())
        );
    }

    #[test]
    fn an_opening_tag_the_prompt_already_wrote_is_no_thought() {
        assert_eq!(
            every_cut(true, "\n<think>\nLet me see.</think>Four."),
            ("Let me see.".to_owned(), "Four.".to_owned())
        );
        assert_eq!(
            every_cut(true, "<think><think>a</think>b"),
            ("<think>a".to_owned(), "b".to_owned())
        );
        assert_eq!(every_cut(true, "<thi"), ("<thi".to_owned(), String::new()));
    }

    #[test]
    fn a_block_cut_by_the_budget_is_reasoning() {
        assert_eq!(
            every_cut(false, "<think>I should count: 1, 2, </th"),
            ("I should count: 1, 2, </th".to_owned(), String::new())
        );
        assert_eq!(
            every_cut(true, "Hmm  \n"),
            ("Hmm".to_owned(), String::new())
        );
    }

    #[test]
    fn an_empty_block_gives_no_reasoning() {
        assert_eq!(
            every_cut(false, "<think>\n\n</think>\n\nSure."),
            (String::new(), "Sure.".to_owned())
        );
    }

    #[test]
    fn only_the_first_block_is_reasoning() {
        assert_eq!(
            every_cut(false, "<think>a</think>b <think>c</think>"),
            ("a".to_owned(), "b <think>c</think>".to_owned())
        );
    }

    #[test]
    fn calls_after_the_block_are_calls() {
        let mut parser = OutputParser {
            reasoning: Some(ReasoningStream::new(false)),
            calls: Some(ToolCallStream::with_id_source(
                ToolCallFormat::Hermes,
                || "call_1".into(),
            )),
        };
        let text = "<think>Weather needs a call.</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let mut pieces = Vec::new();
        for c in text.chars() {
            pieces.extend(parser.push(&c.to_string()));
        }
        pieces.extend(parser.finish());
        let reasoning: String = pieces
            .iter()
            .filter_map(|p| match p {
                StreamDelta::Reasoning(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reasoning, "Weather needs a call.");
        assert!(pieces.iter().any(|p| matches!(
            p,
            StreamDelta::ToolCallStart { name, .. } if name == "get_weather"
        )));
        assert!(!pieces
            .iter()
            .any(|p| matches!(p, StreamDelta::Content(t) if !t.trim().is_empty())));
    }

    #[test]
    fn thinking_templates_and_open_prompts_are_recognised() {
        assert!(template_thinks(
            "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}"
        ));
        assert!(!template_thinks("{{ message.content }}"));
        assert!(prompt_opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(prompt_closes_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
    }
}
