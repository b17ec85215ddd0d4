"""Legacy /v1/completions through the official openai SDK and raw HTTP."""

from __future__ import annotations

import pytest

from compat_helpers import (
    MODEL_ID,
    MODEL_TIER,
    NEVER_STOP,
    PROSE_PROMPT,
    REF_MAX_TOKENS,
    assert_recent_unix_seconds,
    assert_usage,
    pick_stop,
    read_sse,
)

COMPLETIONS_PATH = "/v1/completions"


@pytest.fixture(scope="module")
def reference(client):
    """Greedy, non-streamed completion of PROSE_PROMPT."""
    resp = client.completions.create(
        model=MODEL_TIER, prompt=PROSE_PROMPT, temperature=0, max_tokens=REF_MAX_TOKENS
    )
    text = resp.choices[0].text
    assert isinstance(text, str) and text.strip(), f"empty greedy completion: {resp}"
    return resp


def _stream_chunks(client, **kwargs):
    return list(client.completions.create(stream=True, **kwargs))


def test_raw_response_shape(http):
    max_tokens = 8
    resp = http.post(
        COMPLETIONS_PATH,
        json={"model": MODEL_TIER, "prompt": PROSE_PROMPT, "temperature": 0, "max_tokens": max_tokens},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("content-type", "").startswith("application/json")
    body = resp.json()
    assert isinstance(body["id"], str) and body["id"], body
    assert body["object"] == "text_completion", body
    assert_recent_unix_seconds(body["created"])
    assert isinstance(body["model"], str) and body["model"], body
    assert isinstance(body["choices"], list) and len(body["choices"]) == 1, body
    choice = body["choices"][0]
    for key in ("text", "index", "logprobs", "finish_reason"):
        assert key in choice, f"legacy choice lacks {key!r}: {choice}"
    assert choice["index"] == 0, choice
    assert choice["logprobs"] is None, choice
    assert isinstance(choice["text"], str) and choice["text"], choice
    assert "message" not in choice, "legacy completions carry text, not a chat message"
    assert choice["finish_reason"] in ("stop", "length"), choice
    assert_usage(body["usage"], max_tokens=max_tokens, finish_reason=choice["finish_reason"])


def test_sdk_response(reference):
    assert reference.object == "text_completion"
    assert reference.id
    assert_recent_unix_seconds(reference.created)
    assert len(reference.choices) == 1
    choice = reference.choices[0]
    assert choice.index == 0
    assert choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert_usage(reference.usage, max_tokens=REF_MAX_TOKENS, finish_reason=choice.finish_reason)


def test_greedy_is_deterministic_across_model_names(client, reference):
    for model in (MODEL_TIER, MODEL_ID):
        again = client.completions.create(
            model=model, prompt=PROSE_PROMPT, temperature=0, max_tokens=REF_MAX_TOKENS
        )
        assert again.choices[0].text == reference.choices[0].text, f"model={model!r}"
        assert again.choices[0].finish_reason == reference.choices[0].finish_reason, f"model={model!r}"
        assert assert_usage(again.usage) == assert_usage(reference.usage), f"model={model!r}"


def test_length_limit(client):
    resp = client.completions.create(model=MODEL_TIER, prompt=PROSE_PROMPT, temperature=0, max_tokens=5)
    choice = resp.choices[0]
    assert choice.finish_reason == "length", resp
    assert choice.text
    assert assert_usage(resp.usage, max_tokens=5, finish_reason="length")["completion_tokens"] == 5


def test_prompt_tokens_are_real_token_counts(client, reference):
    # A raw prompt is tokenized as is (no template). Counted offline with the
    # GGUF's vocabulary and merges: PROSE_PROMPT is 15 tokens, "apple" and
    # " apple" one token each. A server that forces a BOS token adds one.
    def prompt_tokens(n_words: int) -> int:
        resp = client.completions.create(
            model=MODEL_TIER, prompt=" ".join(["apple"] * n_words), temperature=0, max_tokens=1
        )
        return assert_usage(resp.usage, max_tokens=1)["prompt_tokens"]

    bos = assert_usage(reference.usage)["prompt_tokens"] - 15
    assert bos in (0, 1), f"PROSE_PROMPT is 15 tokens, usage says {reference.usage}"
    assert prompt_tokens(10) == 10 + bos
    assert prompt_tokens(30) == 30 + bos


def test_unknown_extra_fields_are_ignored(client, reference):
    resp = client.completions.create(
        model=MODEL_TIER,
        prompt=PROSE_PROMPT,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
        extra_body={"foo": 1, "bar": {"nested": [1, "two", None]}},
    )
    assert resp.choices[0].text == reference.choices[0].text


def test_stream_sdk(client, reference):
    chunks = _stream_chunks(
        client, model=MODEL_TIER, prompt=PROSE_PROMPT, temperature=0, max_tokens=REF_MAX_TOKENS
    )
    assert chunks
    first = chunks[0]
    for chunk in chunks:
        assert chunk.object == "text_completion", chunk
        assert chunk.id == first.id and chunk.id
        assert chunk.created == first.created
        assert len(chunk.choices) == 1 and chunk.choices[0].index == 0, chunk
    for chunk in chunks[:-1]:
        assert chunk.choices[0].finish_reason is None, f"finish_reason before the last chunk: {chunk}"
    assert chunks[-1].choices[0].finish_reason == reference.choices[0].finish_reason
    assert "".join(c.choices[0].text or "" for c in chunks) == reference.choices[0].text


def test_stream_raw_sse(http, reference):
    chunks = read_sse(
        http,
        COMPLETIONS_PATH,
        {
            "model": MODEL_TIER,
            "prompt": PROSE_PROMPT,
            "temperature": 0,
            "max_tokens": REF_MAX_TOKENS,
            "stream": True,
        },
    )
    for chunk in chunks:
        assert chunk["object"] == "text_completion", chunk
        assert chunk["id"] == chunks[0]["id"] and chunk["created"] == chunks[0]["created"], chunk
        assert len(chunk["choices"]) == 1, chunk
        choice = chunk["choices"][0]
        for key in ("text", "index", "logprobs", "finish_reason"):
            assert key in choice, f"legacy stream choice lacks {key!r}: {chunk}"
        assert chunk.get("usage") is None, f"usage without stream_options.include_usage: {chunk}"
    assert chunks[-1]["choices"][0]["finish_reason"] == reference.choices[0].finish_reason
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference.choices[0].text


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_stop_sequence(client, reference, stream):
    stop, expected = pick_stop(reference.choices[0].text)
    kwargs = dict(
        model=MODEL_TIER,
        prompt=PROSE_PROMPT,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
        stop=[NEVER_STOP, stop],
    )
    if stream:
        chunks = _stream_chunks(client, **kwargs)
        text = "".join(c.choices[0].text or "" for c in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        resp = client.completions.create(**kwargs)
        text = resp.choices[0].text
        finish_reason = resp.choices[0].finish_reason
    assert stop not in text, f"stop string {stop!r} leaked into the output: {text!r}"
    assert text == expected, f"output must be the greedy text up to the stop string {stop!r}"
    assert finish_reason == "stop"
