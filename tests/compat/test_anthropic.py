"""Anthropic's Messages API through the official `anthropic` SDK, unmodified,
on the real SmolLM2."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def claude(server):
    c = anthropic.Anthropic(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)
    yield c
    c.close()


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_text_with_system_and_usage(claude):
    message = claude.messages.create(
        model="light",
        max_tokens=16,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello."}],
        extra_body={"temperature": 0},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert text_of(message)
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 16


def test_stop_sequence_is_named(claude):
    message = claude.messages.create(
        model="light",
        max_tokens=40,
        messages=[{"role": "user", "content": "Describe the weather today."}],
        # The second one: the answer names the sequence by value, not position.
        stop_sequences=["never-written", "e"],
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "stop_sequence", text_of(message)
    assert message.stop_sequence == "e"
    assert "e" not in text_of(message)


def test_max_tokens_stop_reason(claude):
    message = claude.messages.create(
        model="light", max_tokens=3, messages=[{"role": "user", "content": "Tell me a long story."}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_stream_accumulates_to_the_same_text(claude):
    request = dict(
        model="light", max_tokens=24, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Describe the sea."}]
    )
    whole = claude.messages.create(**request)
    with claude.messages.stream(**request) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == text_of(whole)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_forced_tool_use_and_result_round_trip(claude):
    first = claude.messages.create(
        model="light",
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        # Greedy: a sampled city name can ramble past the budget.
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])
    second = claude.messages.create(
        model="light",
        max_tokens=30,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny, 21 C"}]},
        ],
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens > first.usage.input_tokens


def test_streamed_tool_use_any(claude):
    with claude.messages.stream(
        model="light",
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Is it raining in Oslo?"}],
        extra_body={"temperature": 0},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    calls = [b for b in final.content if b.type == "tool_use"]
    assert len(calls) == 1, final.content
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])


def test_count_tokens_matches_usage(claude):
    request = dict(model="light", system="Be brief.", messages=[{"role": "user", "content": "Name a color."}])
    counted = claude.messages.count_tokens(**request).input_tokens
    used = claude.messages.create(max_tokens=4, **request).usage.input_tokens
    assert counted == used > 0
    with_tools = claude.messages.count_tokens(tools=[WEATHER], **request).input_tokens
    assert with_tools > counted


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"model": "light", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
        ({"model": "light", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
        ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
        (
            {"model": "light", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
        ),
        ({"model": "light", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error"),
        (
            {"model": "light", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "maybe"}},
            400,
            "invalid_request_error",
        ),
    ],
)
def test_bad_requests_get_anthropic_errors(http, body, status, kind):
    response = http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01", "x-api-key": "k"})
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == kind, payload
    assert payload["error"]["message"]


def test_malformed_json_gets_an_anthropic_error(http):
    response = http.post("/v1/messages", content=b"{bad", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(claude):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="light", max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_raw_stream_names_every_event(http):
    body = {"model": "light", "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with http.stream("POST", "/v1/messages", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert [p["type"] for p in payloads] == names
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "[DONE]" not in "".join(lines)
