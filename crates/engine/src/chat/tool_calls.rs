//! Tool calls in a chat model's raw output, turned into OpenAI `tool_calls`.
//!
//! Each model family writes calls in the syntax its chat template teaches it
//! (see the templates' own renderings of an assistant turn with calls):
//!
//! - Hermes (Qwen 2.5, Qwen 3): `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`,
//!   possibly several, possibly after text or after a leading `<think>` block.
//! - Llama 3.1 / 3.3: a bare `{"name": .., "parameters": {..}}` object, maybe
//!   after `<|python_tag|>`, several separated by `;` or newlines.
//! - Mistral Nemo: `[TOOL_CALLS][{"name": .., "arguments": {..}, "id": ..}, ..]`.
//! - Mistral Small 3.2 (tokenizer v11): `[TOOL_CALLS]name[CALL_ID]id[ARGS]{..}`
//!   per call; the template writes `[CALL_ID]id`, which the model may omit.
//! - Generic JSON, for templates that know no tools: an output that is a
//!   `{"tool_calls": [..]}` or `{"name": .., "arguments": ..}` object, maybe
//!   inside a ```` ```json ```` fence.
//!
//! There is one parser, the streaming one: [`parse`] feeds it the whole text
//! at once, so streamed and non-streamed responses cannot disagree. The parser
//! only ever decides from text it has seen in full (holding back a possible
//! marker start, or a call until its JSON closes), which makes its output
//! independent of how the text was cut into fragments.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use self::syntax::{attempt_bare, attempt_hermes, attempt_mistral, partial_suffix, Attempt, Scan};

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
const MISTRAL_ARGS: &str = "[ARGS]";
use super::reasoning::{THINK_CLOSE, THINK_OPEN};
const FENCE: &str = "```";

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3,
    MistralNemo,
    MistralV11,
    GenericJson,
}

impl ToolCallFormat {
    /// Pick the format from a chat template's source.
    pub fn detect(template_source: &str) -> Self {
        let has = |needle: &str| template_source.contains(needle);
        // Mistral's markers are special tokens no other family's template
        // prints, so they win over a `<tool_call>` mentioned in prose.
        if has(MISTRAL_CALLS) {
            if has(MISTRAL_ARGS) {
                Self::MistralV11
            } else {
                Self::MistralNemo
            }
        } else if has(HERMES_OPEN) {
            Self::Hermes
        } else if has(PYTHON_TAG) || has("ipython") {
            Self::Llama3
        } else {
            Self::GenericJson
        }
    }

    /// The special text that can open a call anywhere in the output.
    fn marker(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some(HERMES_OPEN),
            Self::Llama3 => Some(PYTHON_TAG),
            Self::MistralNemo | Self::MistralV11 => Some(MISTRAL_CALLS),
            Self::GenericJson => None,
        }
    }

    /// Formats whose call is a bare JSON object, recognised only at the start
    /// of the output (after other calls): anywhere else `{` is just text.
    fn bare(self) -> bool {
        matches!(self, Self::Llama3 | Self::GenericJson)
    }
}

/// One call, as OpenAI's `tool_calls[i]` carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments object, as OpenAI sends it
    pub arguments: String,
}

/// A whole output split into message content and tool calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedOutput {
    /// A thinking model's reasoning, apart from the answer (see
    /// [`super::ReasoningStream`]); empty for other models.
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// Whole-output parse (non-streaming). Text that is not a tool call stays in
/// `content`; a block whose JSON is malformed stays there verbatim, markers
/// included, so nothing the model wrote is lost.
pub fn parse(format: ToolCallFormat, text: &str) -> ParsedOutput {
    parse_with_ids(format, text, move || new_call_id(format))
}

/// [`parse`] with call ids taken from `ids` (deterministic ids for tests).
pub fn parse_with_ids(
    format: ToolCallFormat,
    text: &str,
    ids: impl FnMut() -> String + Send + 'static,
) -> ParsedOutput {
    let mut stream = ToolCallStream::with_id_source(format, ids);
    let mut deltas = stream.push(text);
    deltas.extend(stream.finish());
    collect(deltas)
}

/// What one [`ToolCallStream::push`] adds to the response.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamDelta {
    /// More of a thinking model's reasoning (never from this parser: see
    /// [`super::ReasoningStream`]).
    Reasoning(String),
    Content(String),
    /// first fragment of call `index`
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// more of call `index`'s arguments: all fragments of a call, joined, are
    /// its compact arguments JSON
    ToolCallArguments {
        index: usize,
        fragment: String,
    },
}

/// Incremental parser for streaming. Feed text fragments as generated; get
/// back deltas. A call is emitted whole (start, then all its arguments) once
/// its JSON is complete, because until then it may still turn out malformed
/// and have to go out as content.
pub struct ToolCallStream {
    format: ToolCallFormat,
    next_id: Box<dyn FnMut() -> String + Send>,
    /// Text received and not yet emitted or consumed.
    buf: String,
    /// Whitespace (and `;` between Llama calls) cut off the end of what was
    /// classified so far: it belongs to the content only if content follows,
    /// and is dropped next to a call.
    held: String,
    mode: Mode,
    /// Progress through the JSON value that starts a pending call.
    scan: Option<Scan>,
    calls: usize,
    /// Nothing but whitespace went out since the last call, so whitespace at
    /// the very end trails the calls and is not content.
    after_call: bool,
    finished: bool,
}

impl std::fmt::Debug for ToolCallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolCallStream")
            .field("format", &self.format)
            .field("mode", &self.mode)
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing but whitespace yet: a `<think>` block may open.
    Start,
    /// Inside the leading `<think>` block, where calls are only being
    /// considered, not made.
    Think,
    /// Content, scanned for the format's marker.
    Text,
    /// Where a bare-JSON call may start: output start, or right after a call.
    Bare,
    /// After a call whose block may end with this closing tag.
    Close(&'static str),
}

impl ToolCallStream {
    pub fn new(format: ToolCallFormat) -> Self {
        Self::with_id_source(format, move || new_call_id(format))
    }

    /// A stream whose call ids come from `ids` instead of random ones.
    pub fn with_id_source(
        format: ToolCallFormat,
        ids: impl FnMut() -> String + Send + 'static,
    ) -> Self {
        Self {
            format,
            next_id: Box::new(ids),
            buf: String::new(),
            held: String::new(),
            mode: Mode::Start,
            scan: None,
            calls: 0,
            after_call: false,
            finished: false,
        }
    }

    pub fn push(&mut self, fragment: &str) -> Vec<StreamDelta> {
        self.buf.push_str(fragment);
        let mut out = Vec::new();
        self.run(&mut out);
        out
    }

    /// End of output: whatever is still held back is resolved (an unfinished
    /// call becomes content).
    pub fn finish(&mut self) -> Vec<StreamDelta> {
        self.finished = true;
        let mut out = Vec::new();
        self.run(&mut out);
        let held = std::mem::take(&mut self.held);
        if !self.after_call {
            push_content(&mut out, held);
        }
        out
    }

    fn run(&mut self, out: &mut Vec<StreamDelta>) {
        let last = self.finished;
        while match self.mode {
            Mode::Start => self.start(last, out),
            Mode::Think => self.think(last, out),
            Mode::Text => self.text(last, out),
            Mode::Bare => self.bare(last, out),
            Mode::Close(tag) => self.close(tag, last),
        } {}
    }

    /// Where content continues after a call (or the leading think block).
    fn body_mode(&self) -> Mode {
        if self.format.bare() {
            Mode::Bare
        } else {
            Mode::Text
        }
    }

    // Each state handler returns whether to go on (the state changed) or to
    // wait for more text.

    fn start(&mut self, last: bool, out: &mut Vec<StreamDelta>) -> bool {
        self.hold_leading(char::is_whitespace);
        if self.buf.starts_with(THINK_OPEN) {
            self.emit_buf(THINK_OPEN.len(), out);
            self.mode = Mode::Think;
            return true;
        }
        if !last && THINK_OPEN.starts_with(self.buf.as_str()) {
            return false;
        }
        self.mode = self.body_mode();
        true
    }

    fn think(&mut self, last: bool, out: &mut Vec<StreamDelta>) -> bool {
        if let Some(i) = self.buf.find(THINK_CLOSE) {
            self.emit_buf(i + THINK_CLOSE.len(), out);
            self.mode = self.body_mode();
            return true;
        }
        let keep = if last {
            0
        } else {
            partial_suffix(&self.buf, THINK_CLOSE)
        };
        self.emit_buf(self.buf.len() - keep, out);
        false
    }

    fn text(&mut self, last: bool, out: &mut Vec<StreamDelta>) -> bool {
        let Some(marker) = self.format.marker() else {
            self.emit_buf(self.buf.len(), out);
            return false;
        };
        let Some(at) = self.buf.find(marker) else {
            let keep = if last {
                0
            } else {
                partial_suffix(&self.buf, marker)
            };
            self.emit_buf(self.buf.len() - keep, out);
            return false;
        };
        self.emit_buf(at, out);
        self.attempt(last, out)
    }

    fn bare(&mut self, last: bool, out: &mut Vec<StreamDelta>) -> bool {
        let between_calls = self.calls > 0;
        self.hold_leading(|c: char| c.is_whitespace() || (between_calls && c == ';'));
        if self.buf.is_empty() {
            return false;
        }
        let opener = if self.format == ToolCallFormat::Llama3 {
            PYTHON_TAG
        } else {
            FENCE
        };
        if self.buf.starts_with('{') || self.buf.starts_with(opener) {
            return self.attempt(last, out);
        }
        if !last && opener.starts_with(self.buf.as_str()) {
            return false;
        }
        self.mode = Mode::Text;
        true
    }

    fn close(&mut self, tag: &'static str, last: bool) -> bool {
        let ws = self.buf.len() - self.buf.trim_start().len();
        let rest = &self.buf[ws..];
        if rest.starts_with(tag) {
            self.buf.drain(..ws + tag.len());
        } else if !last && tag.starts_with(rest) {
            return false;
        }
        // Without its closing tag the call still stands; what follows is
        // simply the text after it.
        self.mode = self.body_mode();
        true
    }

    /// Tries to read calls at the start of `buf`.
    fn attempt(&mut self, last: bool, out: &mut Vec<StreamDelta>) -> bool {
        let attempt = match self.format {
            ToolCallFormat::Hermes => attempt_hermes(&self.buf, &mut self.scan),
            ToolCallFormat::MistralNemo | ToolCallFormat::MistralV11 => {
                attempt_mistral(&self.buf, &mut self.scan)
            }
            ToolCallFormat::Llama3 | ToolCallFormat::GenericJson => {
                attempt_bare(self.format, &self.buf, &mut self.scan)
            }
        };
        match attempt {
            Attempt::NeedMore if !last => false,
            Attempt::NeedMore | Attempt::Fail => {
                self.scan = None;
                // The marker goes out as text so the search resumes after it;
                // without one, Text mode will not take `{` for a call again.
                let literal = match self.format.marker() {
                    Some(marker) if self.buf.starts_with(marker) => marker.len(),
                    _ => 0,
                };
                self.emit_buf(literal, out);
                self.mode = Mode::Text;
                true
            }
            Attempt::Found {
                calls,
                consumed,
                close,
            } => {
                self.scan = None;
                self.buf.drain(..consumed);
                self.held.clear();
                for (name, arguments) in calls {
                    let index = self.calls;
                    self.calls += 1;
                    let id = (self.next_id)();
                    out.push(StreamDelta::ToolCallStart { index, id, name });
                    out.push(StreamDelta::ToolCallArguments {
                        index,
                        fragment: arguments,
                    });
                }
                self.after_call = true;
                self.mode = close.map_or(self.body_mode(), Mode::Close);
                true
            }
        }
    }

    /// Moves the leading run of `pred` characters from `buf` to `held`.
    fn hold_leading(&mut self, pred: impl Fn(char) -> bool) {
        let n = self.buf.len() - self.buf.trim_start_matches(pred).len();
        self.held.push_str(&self.buf[..n]);
        self.buf.drain(..n);
    }

    /// Emits the first `n` bytes of `buf` as content, holding back their
    /// trailing whitespace until we know whether a call follows it.
    fn emit_buf(&mut self, n: usize, out: &mut Vec<StreamDelta>) {
        let text: String = self.buf.drain(..n).collect();
        let body = text.trim_end();
        if body.is_empty() {
            self.held.push_str(&text);
            return;
        }
        let mut content = std::mem::take(&mut self.held);
        content.push_str(body);
        self.held.push_str(&text[body.len()..]);
        self.after_call = false;
        push_content(out, content);
    }
}

fn push_content(out: &mut Vec<StreamDelta>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(StreamDelta::Content(last)) = out.last_mut() {
        last.push_str(&text);
    } else {
        out.push(StreamDelta::Content(text));
    }
}

fn collect(deltas: Vec<StreamDelta>) -> ParsedOutput {
    let mut parsed = ParsedOutput::default();
    for delta in deltas {
        match delta {
            StreamDelta::Reasoning(text) => parsed.reasoning.push_str(&text),
            StreamDelta::Content(text) => parsed.content.push_str(&text),
            StreamDelta::ToolCallStart { id, name, .. } => parsed.tool_calls.push(ToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            StreamDelta::ToolCallArguments { index, fragment } => {
                if let Some(call) = parsed.tool_calls.get_mut(index) {
                    call.arguments.push_str(&fragment);
                }
            }
        }
    }
    parsed
}

/// A fresh id for a call in `format`: Mistral's templates reject anything but
/// 9 alphanumerics; everyone else gets OpenAI's shape.
pub fn new_call_id(format: ToolCallFormat) -> String {
    let id = random_id();
    match format {
        ToolCallFormat::MistralNemo | ToolCallFormat::MistralV11 => id[id.len() - 9..].to_owned(),
        _ => id,
    }
}

/// `call_` and 24 alphanumerics, like OpenAI's ids.
fn random_id() -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is keyed randomly per process, so ids are unpredictable
    // without another crate; the counter keeps them distinct.
    let state = RandomState::new();
    let mut id = String::from("call_");
    id.extend((0..24u64).map(|i| char::from(ALPHABET[(state.hash_one((n, i)) % 62) as usize])));
    id
}

mod syntax;
#[cfg(test)]
mod tests;
