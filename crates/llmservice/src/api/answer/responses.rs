//! Responses API answers: a `response` object whose output is a list of
//! items (a thinking model's `reasoning`, a `message` with `output_text`,
//! `function_call`s), streamed as
//! typed, numbered events: the response created and in progress, each item
//! added, filled by deltas and done, then the response completed (or
//! incomplete, when `max_output_tokens` cut it).

use axum::response::sse::Event as SseEvent;
use engine::chat::StreamDelta;
use serde_json::json;

use super::{Answer, AnswerHead};
use crate::api::error::ApiError;
use crate::api::sse::wire_json;
use crate::error::RequestError;
use crate::generation::{ChoiceEvent, ChoiceRecord};
use crate::wire::{
    ContentPart, IncompleteDetails, InputTokensDetails, OutputItem, OutputText,
    OutputTokensDetails, ReasoningText, ResponseObject, ResponseStatus, ResponsesEvent,
    ResponsesEventPayload as Payload, ResponsesRequest, ResponsesUsage,
};

pub struct ResponsesAnswer {
    head: AnswerHead,
    records: [ChoiceRecord; 1],
    /// The response object before any output: the request's settings echoed.
    skeleton: ResponseObject,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// Output items opened so far on the stream; the last one may be open.
    items: usize,
    open: Option<OpenItem>,
}

/// The item a stream is filling, with what it holds so far.
enum OpenItem {
    Reasoning {
        text: String,
    },
    Message {
        text: String,
    },
    /// A call, by its index among the answer's calls.
    Call {
        index: usize,
        arguments: String,
    },
}

impl ResponsesAnswer {
    pub fn new(head: AnswerHead, req: &ResponsesRequest) -> Self {
        let skeleton = ResponseObject {
            id: head.id.clone(),
            object: "response".to_owned(),
            created_at: head.created,
            status: ResponseStatus::InProgress,
            error: None,
            incomplete_details: None,
            instructions: req.instructions.clone(),
            max_output_tokens: req.max_output_tokens,
            model: head.model.clone(),
            output: Vec::new(),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            previous_response_id: req.previous_response_id.clone(),
            temperature: req.temperature,
            top_p: req.top_p,
            text: req
                .text
                .clone()
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            tools: req.tools.clone().unwrap_or_default(),
            truncation: req.truncation.clone().unwrap_or_else(|| "disabled".into()),
            usage: None,
            metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
            store: req.store.unwrap_or(true),
            user: req.user.clone(),
        };
        Self {
            head,
            records: [ChoiceRecord::default()],
            skeleton,
            sequence: 0,
            items: 0,
            open: None,
        }
    }

    fn record(&self) -> &ChoiceRecord {
        &self.records[0]
    }

    fn event(&mut self, payload: Payload) -> ResponsesEvent {
        let sequence_number = self.sequence;
        self.sequence += 1;
        ResponsesEvent {
            payload,
            sequence_number,
        }
    }

    /// An output item's id: the response's, with the item's kind and place.
    fn item_id(&self, prefix: &str, output_index: usize) -> String {
        let base = self.head.id.trim_start_matches("resp_");
        format!("{prefix}_{base}_{output_index}")
    }

    fn status(&self) -> ResponseStatus {
        match self.record().finish {
            None => ResponseStatus::InProgress,
            Some(_) => self.done_status(),
        }
    }

    /// The status of an item that is done: incomplete only when the length
    /// limit cut the answer.
    fn done_status(&self) -> ResponseStatus {
        match self.record().finish {
            Some(engine::FinishReason::Length) => ResponseStatus::Incomplete,
            _ => ResponseStatus::Completed,
        }
    }

    fn reasoning_item(&self, output_index: usize, text: String) -> OutputItem {
        OutputItem::Reasoning {
            id: self.item_id("rs", output_index),
            status: self.done_status(),
            summary: Vec::new(),
            content: vec![ReasoningText::new(text)],
        }
    }

    fn message_item(&self, output_index: usize, text: String) -> OutputItem {
        OutputItem::Message {
            id: self.item_id("msg", output_index),
            status: self.done_status(),
            role: "assistant".to_owned(),
            content: vec![OutputText::new(text)],
        }
    }

    fn call_item(
        &self,
        output_index: usize,
        call: usize,
        arguments: String,
        status: ResponseStatus,
    ) -> OutputItem {
        let (call_id, name) = self
            .record()
            .output
            .tool_calls
            .get(call)
            .map(|c| (c.id.clone(), c.name.clone()))
            .unwrap_or_default();
        OutputItem::FunctionCall {
            id: self.item_id("fc", output_index),
            status,
            call_id,
            name,
            arguments,
        }
    }

    /// The response object with `output`, as it stands.
    fn response(&self, output: Vec<OutputItem>) -> Box<ResponseObject> {
        let status = self.status();
        let done = self.record().finish.is_some();
        let usage = self.record().usage;
        Box::new(ResponseObject {
            status,
            incomplete_details: (status == ResponseStatus::Incomplete).then(|| IncompleteDetails {
                reason: "max_output_tokens".to_owned(),
            }),
            output,
            usage: done.then(|| ResponsesUsage {
                input_tokens: usage.prompt_tokens,
                input_tokens_details: InputTokensDetails {
                    cached_tokens: usage.cached_tokens,
                    cache_write_tokens: 0,
                },
                output_tokens: usage.completion_tokens,
                output_tokens_details: OutputTokensDetails::default(),
                total_tokens: usage.prompt_tokens + usage.completion_tokens,
            }),
            ..self.skeleton.clone()
        })
    }

    /// Closes the open item, if any: its last events, done.
    fn close(&mut self, events: &mut Vec<ResponsesEvent>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let output_index = self.items - 1;
        let item = match open {
            OpenItem::Reasoning { text } => {
                let item_id = self.item_id("rs", output_index);
                let done = Payload::ReasoningTextDone {
                    item_id: item_id.clone(),
                    output_index,
                    content_index: 0,
                    text: text.clone(),
                };
                events.push(self.event(done));
                let part = Payload::ContentPartDone {
                    item_id,
                    output_index,
                    content_index: 0,
                    part: ContentPart::Reasoning(ReasoningText::new(text.clone())),
                };
                events.push(self.event(part));
                self.reasoning_item(output_index, text)
            }
            OpenItem::Message { text } => {
                let item_id = self.item_id("msg", output_index);
                let part = OutputText::new(text.clone());
                let done = Payload::OutputTextDone {
                    item_id: item_id.clone(),
                    output_index,
                    content_index: 0,
                    text: text.clone(),
                    logprobs: Vec::new(),
                };
                events.push(self.event(done));
                let part = Payload::ContentPartDone {
                    item_id,
                    output_index,
                    content_index: 0,
                    part: ContentPart::Text(part),
                };
                events.push(self.event(part));
                self.message_item(output_index, text)
            }
            OpenItem::Call { index, arguments } => {
                let status = self.done_status();
                let item = self.call_item(output_index, index, arguments.clone(), status);
                let OutputItem::FunctionCall { id, name, .. } = &item else {
                    unreachable!("call_item makes calls");
                };
                let done = Payload::FunctionCallArgumentsDone {
                    item_id: id.clone(),
                    output_index,
                    name: name.clone(),
                    arguments,
                };
                events.push(self.event(done));
                item
            }
        };
        let done = Payload::OutputItemDone { output_index, item };
        events.push(self.event(done));
    }

    /// Adds `text` to the open reasoning item (`reasoning`) or message,
    /// opening one first when another kind is open; returns its output index.
    fn extend_text(
        &mut self,
        reasoning: bool,
        text: &str,
        events: &mut Vec<ResponsesEvent>,
    ) -> usize {
        let same = match &self.open {
            Some(OpenItem::Reasoning { .. }) => reasoning,
            Some(OpenItem::Message { .. }) => !reasoning,
            _ => false,
        };
        if !same {
            let text = String::new();
            let open = if reasoning {
                OpenItem::Reasoning { text }
            } else {
                OpenItem::Message { text }
            };
            self.open(open, events);
        }
        if let Some(OpenItem::Reasoning { text: so_far } | OpenItem::Message { text: so_far }) =
            &mut self.open
        {
            so_far.push_str(text);
        }
        self.items - 1
    }

    /// Opens the next item, closing the one before.
    fn open(&mut self, open: OpenItem, events: &mut Vec<ResponsesEvent>) {
        self.close(events);
        let output_index = self.items;
        self.items += 1;
        let item = match &open {
            OpenItem::Reasoning { .. } => OutputItem::Reasoning {
                id: self.item_id("rs", output_index),
                status: ResponseStatus::InProgress,
                summary: Vec::new(),
                content: Vec::new(),
            },
            OpenItem::Message { .. } => OutputItem::Message {
                id: self.item_id("msg", output_index),
                status: ResponseStatus::InProgress,
                role: "assistant".to_owned(),
                content: Vec::new(),
            },
            OpenItem::Call { index, .. } => self.call_item(
                output_index,
                *index,
                String::new(),
                ResponseStatus::InProgress,
            ),
        };
        let added = Payload::OutputItemAdded { output_index, item };
        events.push(self.event(added));
        let part = match open {
            OpenItem::Message { .. } => {
                Some(("msg", ContentPart::Text(OutputText::new(String::new()))))
            }
            OpenItem::Reasoning { .. } => Some((
                "rs",
                ContentPart::Reasoning(ReasoningText::new(String::new())),
            )),
            OpenItem::Call { .. } => None,
        };
        if let Some((prefix, part)) = part {
            let part = Payload::ContentPartAdded {
                item_id: self.item_id(prefix, output_index),
                output_index,
                content_index: 0,
                part,
            };
            events.push(self.event(part));
        }
        self.open = Some(open);
    }
}

impl Answer for ResponsesAnswer {
    type Chunk = ResponsesEvent;
    type Whole = ResponseObject;

    fn head(&self) -> &AnswerHead {
        &self.head
    }

    fn records(&self) -> &[ChoiceRecord] {
        &self.records
    }

    fn records_mut(&mut self) -> &mut [ChoiceRecord] {
        &mut self.records
    }

    fn opening(&mut self) -> Vec<ResponsesEvent> {
        let created = Payload::Created {
            response: self.response(Vec::new()),
        };
        let in_progress = Payload::InProgress {
            response: self.response(Vec::new()),
        };
        vec![self.event(created), self.event(in_progress)]
    }

    fn piece_chunks(&mut self, _index: u32, event: &ChoiceEvent) -> Vec<ResponsesEvent> {
        let mut events = Vec::new();
        let ChoiceEvent::Delta(delta, _) = event else {
            return events;
        };
        match delta {
            StreamDelta::Reasoning(text) => {
                let output_index = self.extend_text(true, text, &mut events);
                let delta = Payload::ReasoningTextDelta {
                    item_id: self.item_id("rs", output_index),
                    output_index,
                    content_index: 0,
                    delta: text.clone(),
                };
                events.push(self.event(delta));
            }
            StreamDelta::Content(text) if text.is_empty() => {}
            StreamDelta::Content(text) => {
                let output_index = self.extend_text(false, text, &mut events);
                let delta = Payload::OutputTextDelta {
                    item_id: self.item_id("msg", output_index),
                    output_index,
                    content_index: 0,
                    delta: text.clone(),
                    logprobs: Vec::new(),
                };
                events.push(self.event(delta));
            }
            StreamDelta::ToolCallStart { index, .. } => {
                let open = OpenItem::Call {
                    index: *index,
                    arguments: String::new(),
                };
                self.open(open, &mut events);
            }
            StreamDelta::ToolCallArguments { index, fragment } => {
                let Some(OpenItem::Call {
                    index: open,
                    arguments,
                }) = &mut self.open
                else {
                    return events;
                };
                if open != index || fragment.is_empty() {
                    return events;
                }
                arguments.push_str(fragment);
                let output_index = self.items - 1;
                let delta = Payload::FunctionCallArgumentsDelta {
                    item_id: self.item_id("fc", output_index),
                    output_index,
                    delta: fragment.clone(),
                };
                events.push(self.event(delta));
            }
        }
        events
    }

    fn finish_chunks(&mut self, _index: u32) -> Vec<ResponsesEvent> {
        let mut events = Vec::new();
        self.close(&mut events);
        let response = self.response(self.whole().output);
        let last = match response.status {
            ResponseStatus::Incomplete => Payload::Incomplete { response },
            _ => Payload::Completed { response },
        };
        events.push(self.event(last));
        events
    }

    fn error_chunk(&mut self, error: RequestError) -> Result<ResponsesEvent, RequestError> {
        let error = ApiError::from(error);
        let payload = Payload::Error {
            code: error.code.map(str::to_owned),
            message: error.message,
            param: error.param,
        };
        Ok(self.event(payload))
    }

    fn cache_body(&self) -> serde_json::Value {
        super::ChatAnswer::cache_body_of(&self.records)
    }

    /// The output in stream order: the reasoning, the text as one message,
    /// then the calls.
    fn whole(&self) -> ResponseObject {
        let output = &self.record().output;
        let mut items = Vec::new();
        if !output.reasoning.is_empty() {
            items.push(self.reasoning_item(items.len(), output.reasoning.clone()));
        }
        if !output.content.is_empty() {
            items.push(self.message_item(items.len(), output.content.clone()));
        }
        for (call, tool_call) in output.tool_calls.iter().enumerate() {
            let status = self.done_status();
            items.push(self.call_item(items.len(), call, tool_call.arguments.clone(), status));
        }
        *self.response(items)
    }

    fn sse_event(chunk: &ResponsesEvent) -> SseEvent {
        SseEvent::default()
            .event(chunk.payload.name())
            .data(wire_json(chunk))
    }

    fn sse_close() -> Option<SseEvent> {
        None
    }
}
