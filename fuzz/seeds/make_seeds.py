"""Writes the fuzz targets' starting inputs into corpus/<target>/ (each input
is the target's selector bytes followed by the real bytes: requests as
clients send them, the chat-template cases, tool-call outputs of each model
family, BGE-M3's head files from ../shared/models)."""

import json
import pathlib
import sys

here = pathlib.Path(__file__).resolve().parent
root = here.parent.parent
shared = root.parent / "shared"
out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "corpus"


def seed(target: str, name: str, data: bytes) -> None:
    folder = out / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
requests = [  # in the order of request_body.rs's SHAPES
    {"model": "light", "messages": messages, "max_tokens": 16, "temperature": 0.7, "stream": True,
     "tools": tools, "tool_choice": "auto", "response_format": {"type": "json_object"},
     "logprobs": True, "top_logprobs": 2, "n": 2, "stop": ["\n"], "seed": 1},
    {"model": "light", "prompt": ["Once", "upon"], "max_tokens": 8, "echo": True, "logprobs": 1,
     "suffix": "end", "stop": "x"},
    {"model": "embed", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 4},
    {"model": "rerank", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1},
    {"model": "light", "content": "Hello", "add_special": True},
    {"model": "light", "tokens": [1, 2, 3]},
    {"model": "light", "max_tokens": 32, "system": [{"type": "text", "text": "s"}],
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
     "tools": [{"name": "t", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"}},
    {"model": "light", "messages": [{"role": "user", "content": "Hi"}]},
    {"model": "light", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
     "instructions": "Be brief.", "max_output_tokens": 16, "text": {"format": {"type": "json_object"}}},
    {"model": "light", "messages": messages, "stream": False, "format": "json",
     "options": {"temperature": 0, "num_predict": 8}},
    {"model": "light", "prompt": "Hi", "system": "s", "raw": False, "options": {"stop": ["x"]}},
    {"model": "light"},
    {"model": "embed", "input": ["a", "b"], "truncate": True},
    {"model": "embed", "prompt": "a"},
    {"texts": ["Docker is a containerization platform."], "metadata": [{"source": "docs"}],
     "collection": "default"},
    {"query": "docker", "top_k": 3, "filter": {"source": "docs"}},
    {"query": "How do Docker and Kubernetes work together?", "max_tokens": 256,
     "num_context_docs": 3, "stream": True},
]
for i, body in enumerate(requests):
    seed("request_body", f"{i}", bytes([i]) + json.dumps(body).encode())

cases = json.loads((shared / "templates" / "cases.json").read_text())
for pick in range(6):
    for name, case in cases.items():
        seed("chat_template", f"{pick}-{name}", bytes([pick | 0x80]) + json.dumps(case).encode())

outputs = [  # (format index as in tool_calls.rs, text)
    (0, 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (0, '<think>plan</think><tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}</tool_call>'),
    (1, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (1, '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"q": "\\"x\\""}}'),
    (2, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]'),
    (3, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    (4, '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'),
    (4, 'Plain text with { braces } and no call.'),
    # Top bits: the reasoning split off (0x80), the block opened by the prompt (0x40).
    (0x80, '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'),
    (0xC4, 'Counting: 1, 2 </th</think>\n\nThree.'),
]
for i, (fmt, text) in enumerate(outputs):
    seed("tool_calls", f"{i}", bytes([fmt, 0x55]) + text.encode())

heads = shared / "models" / "m3-heads"
for path in sorted(heads.rglob("*_linear.*")):
    if path.stat().st_size <= 8192:
        kind = 1 if path.suffix == ".safetensors" else 0
        seed("heads", f"{path.parent.name}-{path.name}", bytes([kind]) + path.read_bytes())

chat_answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "light",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                                             "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]}],
                                "refusal": None},
                   "finish_reason": "tool_calls"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
text_answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "light",
               "choices": [{"text": "Once upon", "index": 0, "finish_reason": "length",
                            "logprobs": {"tokens": ["Once", " upon"], "token_logprobs": [-0.5, -0.2],
                                         "top_logprobs": [{"Once": -0.5}, {" upon": -0.2}],
                                         "text_offset": [0, 4]}}],
               "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
               "system_fingerprint": None}
seed("cached_answer", "chat", bytes([0]) + json.dumps(chat_answer).encode())
seed("cached_answer", "text", bytes([1]) + json.dumps(text_answer).encode())
seed("gbnf_guard", "json", b'root ::= object\nobject ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws\n'
     b'value ::= object | [0-9]+ | string\nstring ::= "\\"" ( [^"\\\\] | "\\\\" ["\\\\/bfnrt] )* "\\""  # (\nws ::= [ \\t\\n]*\n')
seed("sse_framer", "openai", b'\x07data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n: ping\r\n\r\nevent: message\ndata: a\ndata: b\n\ndata: [DONE]\n\n')
seed("detok", "stops", b"\x03\x02</s>\nUser:\nHello there</s> User: more \xe2\x82\xac\xf0\x9f\x98\x80 end")
