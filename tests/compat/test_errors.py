"""OpenAI error shape and typed SDK errors: unknown model, invalid parameters,
malformed bodies."""

from __future__ import annotations

import openai
import pytest

from compat_helpers import (
    MODEL_TIER,
    STORY_MESSAGES,
    PROSE_PROMPT,
    assert_openai_error,
    assert_usage,
)

UNKNOWN_MODEL = "no-such-model-xyz"
HI = [{"role": "user", "content": "Hi"}]


def _check_sdk_error(exc: openai.APIStatusError, status: int, **expected) -> dict:
    """The SDK's typed error and the raw body behind it."""
    assert exc.status_code == status
    assert isinstance(exc.body, dict), f"SDK could not parse the error body: {exc.body!r}"
    for key in ("message", "type", "param", "code"):
        assert key in exc.body, f"error object lacks {key!r}: {exc.body}"
    err = assert_openai_error(exc.response, status, **expected)
    assert exc.body == err, "the SDK exposes the inner error object"
    assert exc.type == err["type"] and exc.param == err["param"] and exc.code == err["code"]
    return err


# ---------------------------------------------------------------- unknown model


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_unknown_model_chat(client, stream):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=UNKNOWN_MODEL, messages=HI, max_tokens=1, stream=stream)
    _check_sdk_error(info.value, 404, code="model_not_found")


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_unknown_model_completions(client, stream):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model=UNKNOWN_MODEL, prompt="Hi", max_tokens=1, stream=stream)
    _check_sdk_error(info.value, 404, code="model_not_found")


def test_unknown_model_with_known_tier_prefix(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="light/not-a-real-model", messages=HI, max_tokens=1)
    _check_sdk_error(info.value, 404, code="model_not_found")


# ---------------------------------------------------------------- invalid values (chat)


@pytest.mark.parametrize("temperature", [-0.1, 2.1, 10])
def test_chat_temperature_out_of_range(client, temperature):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_TIER, messages=HI, temperature=temperature, max_tokens=1)
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="temperature")


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_chat_max_tokens_below_one(client, max_tokens):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_TIER, messages=HI, max_tokens=max_tokens)
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="max_tokens")


def test_chat_empty_messages(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_TIER, messages=[], max_tokens=1)
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="messages")


def test_missing_messages_is_named_as_openai_names_it(http):
    response = http.post("/v1/chat/completions", json={"model": MODEL_TIER})
    assert_openai_error(response, 400, param="messages", code="missing_required_parameter")


def test_audio_output_is_refused_not_answered_in_text(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_TIER, messages=HI, max_tokens=1, modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"},
        )
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="modalities")


def test_invalid_stream_request_fails_before_streaming(client):
    # Validation happens before the SSE response starts: a plain 400, no stream.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_TIER, messages=HI, temperature=3, max_tokens=1, stream=True
        )
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="temperature")


@pytest.mark.parametrize("temperature", [0, 2])
def test_chat_temperature_bounds_are_accepted(client, temperature):
    resp = client.chat.completions.create(
        model=MODEL_TIER, messages=STORY_MESSAGES, temperature=temperature, max_tokens=2
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert_usage(resp.usage, max_tokens=2, finish_reason=resp.choices[0].finish_reason)


# ---------------------------------------------------------------- invalid values (completions)


@pytest.mark.parametrize("temperature", [-1, 2.5])
def test_completions_temperature_out_of_range(client, temperature):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_TIER, prompt=PROSE_PROMPT, temperature=temperature, max_tokens=1)
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="temperature")


def test_completions_max_tokens_below_one(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_TIER, prompt=PROSE_PROMPT, max_tokens=0)
    _check_sdk_error(info.value, 400, type_="invalid_request_error", param="max_tokens")


# ---------------------------------------------------------------- malformed bodies (raw HTTP)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_json_body(http, path):
    resp = http.post(
        path,
        content=b'{"model": "light", "messages": [{"role": "user", "content": "Hi"}',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(resp, 400, type_="invalid_request_error")


def test_missing_messages_field(http):
    # Valid JSON that is not a valid request: still 400 in OpenAI's shape
    # (not a framework default such as a plain-text 422).
    resp = http.post("/v1/chat/completions", json={"model": MODEL_TIER, "max_tokens": 1})
    assert_openai_error(resp, 400, type_="invalid_request_error")
