"""/v1/chat/completions through the official openai SDK (and raw HTTP where the
SDK would hide a wire-level detail)."""

from __future__ import annotations

import pytest

from compat_helpers import (
    MODEL_ID,
    MODEL_TIER,
    NEVER_STOP,
    PROSE_MESSAGES,
    REF_MAX_TOKENS,
    STORY_MESSAGES,
    assert_recent_unix_seconds,
    assert_usage,
    pick_stop,
    read_sse,
)

CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def reference(client):
    """The greedy, non-streamed reply to PROSE_MESSAGES (the baseline for
    determinism, stream equality, extra-field and stop tests)."""
    resp = client.chat.completions.create(
        model=MODEL_TIER,
        messages=PROSE_MESSAGES,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
    )
    content = resp.choices[0].message.content
    assert isinstance(content, str) and content.strip(), f"empty greedy reply: {resp}"
    return resp


def _stream_chunks(client, **kwargs):
    stream = client.chat.completions.create(stream=True, **kwargs)
    return list(stream)


def _choice_chunks(chunks):
    return [c for c in chunks if c.choices]


def _streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in _choice_chunks(chunks))


# ---------------------------------------------------------------- non-stream


def test_raw_response_shape(http):
    max_tokens = 8
    resp = http.post(
        CHAT_PATH,
        json={"model": MODEL_TIER, "messages": PROSE_MESSAGES, "temperature": 0, "max_tokens": max_tokens},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("content-type", "").startswith("application/json")
    body = resp.json()
    assert isinstance(body["id"], str) and body["id"], body
    assert body["object"] == "chat.completion", body
    assert_recent_unix_seconds(body["created"])
    assert isinstance(body["model"], str) and body["model"], body
    assert isinstance(body["choices"], list) and len(body["choices"]) == 1, body
    choice = body["choices"][0]
    assert choice["index"] == 0, choice
    assert choice["message"]["role"] == "assistant", choice
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"], choice
    assert choice["finish_reason"] in ("stop", "length"), choice
    assert_usage(body["usage"], max_tokens=max_tokens, finish_reason=choice["finish_reason"])


def test_sdk_response(reference):
    assert reference.object == "chat.completion"
    assert reference.id
    assert_recent_unix_seconds(reference.created)
    assert len(reference.choices) == 1
    choice = reference.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert_usage(reference.usage, max_tokens=REF_MAX_TOKENS, finish_reason=choice.finish_reason)


def test_greedy_is_deterministic(client, reference):
    again = client.chat.completions.create(
        model=MODEL_TIER, messages=PROSE_MESSAGES, temperature=0, max_tokens=REF_MAX_TOKENS
    )
    assert again.choices[0].message.content == reference.choices[0].message.content
    assert again.choices[0].finish_reason == reference.choices[0].finish_reason
    assert assert_usage(again.usage) == assert_usage(reference.usage)
    assert again.id != reference.id, "every completion needs its own id"


def test_exact_model_id_is_the_tier_model(client, reference):
    resp = client.chat.completions.create(
        model=MODEL_ID, messages=PROSE_MESSAGES, temperature=0, max_tokens=REF_MAX_TOKENS
    )
    assert resp.choices[0].message.content == reference.choices[0].message.content
    assert assert_usage(resp.usage) == assert_usage(reference.usage)


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_length_limit(client, max_tokens):
    resp = client.chat.completions.create(
        model=MODEL_TIER, messages=STORY_MESSAGES, temperature=0, max_tokens=max_tokens
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length", f"a long story cannot finish in {max_tokens} tokens: {resp}"
    assert choice.message.content, "the generated tokens must be returned"
    usage = assert_usage(resp.usage, max_tokens=max_tokens, finish_reason="length")
    assert usage["completion_tokens"] == max_tokens


def test_prompt_tokens_are_real_token_counts(client):
    # Computed offline from the GGUF's own vocabulary, merges and chat template:
    # the template around a lone user message (default system prompt, role
    # markers, <|im_start|>/<|im_end|> as single special tokens) is 30 tokens,
    # and "apple" / " apple" are one token each. A server that forces a BOS
    # token adds one more (the same for every request).
    template_tokens = 30

    def prompt_tokens(n_words: int) -> int:
        resp = client.chat.completions.create(
            model=MODEL_TIER,
            messages=[{"role": "user", "content": " ".join(["apple"] * n_words)}],
            temperature=0,
            max_tokens=1,
        )
        return assert_usage(resp.usage, max_tokens=1)["prompt_tokens"]

    counts = {n: prompt_tokens(n) for n in (20, 40)}
    bos = counts[20] - (template_tokens + 20)
    assert bos in (0, 1), f"prompt_tokens {counts} are not the template + message token counts"
    assert counts[40] == template_tokens + 40 + bos, counts


def test_multi_turn_conversation_uses_all_messages(client):
    last_user = {"role": "user", "content": "And what is the capital of Italy?"}
    conversation = [
        {
            "role": "system",
            "content": "You are a geography tutor. You answer questions about capital cities "
            "of European countries with one short, precise sentence and nothing else.",
        },
        {"role": "user", "content": "What is the capital of France? Please answer in one sentence."},
        {"role": "assistant", "content": "The capital of France is Paris, which lies on the Seine."},
        last_user,
    ]
    full = client.chat.completions.create(model=MODEL_TIER, messages=conversation, temperature=0, max_tokens=8)
    alone = client.chat.completions.create(model=MODEL_TIER, messages=[last_user], temperature=0, max_tokens=8)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content
    p_full = assert_usage(full.usage, max_tokens=8)["prompt_tokens"]
    p_alone = assert_usage(alone.usage, max_tokens=8)["prompt_tokens"]
    # Counted offline with the GGUF's vocabulary, merges and chat template:
    # 85 tokens for the conversation, 38 for the last user message alone (which
    # gets the template's default system prompt); a forced BOS cancels out.
    assert p_full - p_alone == 85 - 38, (
        f"every turn must be rendered through the chat template ({p_full} vs {p_alone})"
    )


def test_unknown_extra_fields_are_ignored(client, reference):
    resp = client.chat.completions.create(
        model=MODEL_TIER,
        messages=PROSE_MESSAGES,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
        extra_body={"foo": 1, "bar": {"nested": [1, "two", None]}},
    )
    assert resp.choices[0].message.content == reference.choices[0].message.content


# ---------------------------------------------------------------- streaming


def test_stream_chunk_rules(client, reference):
    chunks = _stream_chunks(
        client, model=MODEL_TIER, messages=PROSE_MESSAGES, temperature=0, max_tokens=REF_MAX_TOKENS
    )
    assert len(chunks) >= 3, f"expected role, content and finish chunks, got {len(chunks)}"
    first = chunks[0]
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk", chunk
        assert chunk.id == first.id and chunk.id, "all chunks share one id"
        assert chunk.created == first.created, "all chunks share one created"
        assert chunk.usage is None, f"usage sent without stream_options.include_usage: {chunk}"
        assert len(chunk.choices) == 1, f"without include_usage every chunk carries the choice: {chunk}"
        assert chunk.choices[0].index == 0
    assert_recent_unix_seconds(first.created)

    assert first.choices[0].delta.role == "assistant", first
    assert first.choices[0].delta.content in (None, ""), "the role chunk carries no generated text"
    for chunk in chunks[1:]:
        assert chunk.choices[0].delta.role is None, f"role repeated after the first chunk: {chunk}"

    last = chunks[-1]
    for chunk in chunks[:-1]:
        assert chunk.choices[0].finish_reason is None, f"finish_reason before the last chunk: {chunk}"
    assert last.choices[0].finish_reason == reference.choices[0].finish_reason
    assert last.choices[0].delta.content in (None, ""), "the finish chunk has an empty delta"

    assert _streamed_text(chunks) == reference.choices[0].message.content


def test_stream_include_usage(client, reference):
    chunks = _stream_chunks(
        client,
        model=MODEL_TIER,
        messages=PROSE_MESSAGES,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
        stream_options={"include_usage": True},
    )
    final = chunks[-1]
    assert final.choices == [], f"the usage chunk has no choices: {final}"
    assert final.object == "chat.completion.chunk"
    assert final.id == chunks[0].id and final.created == chunks[0].created
    assert assert_usage(final.usage) == assert_usage(reference.usage), "streamed usage != non-streamed usage"
    for chunk in chunks[:-1]:
        assert chunk.choices, f"only the final chunk may have empty choices: {chunk}"
        assert chunk.usage is None, f"usage before the final chunk: {chunk}"
    assert chunks[-2].choices[0].finish_reason == reference.choices[0].finish_reason
    assert _streamed_text(chunks) == reference.choices[0].message.content


def test_stream_raw_sse(http, reference):
    chunks = read_sse(
        http,
        CHAT_PATH,
        {
            "model": MODEL_TIER,
            "messages": PROSE_MESSAGES,
            "temperature": 0,
            "max_tokens": REF_MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    first = chunks[0]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk", chunk
        assert chunk["id"] == first["id"], chunk
        assert chunk["created"] == first["created"], chunk
        assert isinstance(chunk["model"], str) and chunk["model"], chunk

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [], usage_chunk
    assert assert_usage(usage_chunk["usage"]) == assert_usage(reference.usage)
    assert choice_chunks, "no choice chunks"
    for chunk in choice_chunks:
        assert chunk.get("usage") is None, f"usage before the final chunk: {chunk}"
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0, chunk
        assert isinstance(chunk["choices"][0]["delta"], dict), chunk

    assert choice_chunks[0]["choices"][0]["delta"].get("role") == "assistant", choice_chunks[0]
    for chunk in choice_chunks[1:]:
        assert chunk["choices"][0]["delta"].get("role") is None, f"role after the first chunk: {chunk}"
    for chunk in choice_chunks[:-1]:
        assert chunk["choices"][0].get("finish_reason") is None, chunk
    finish = choice_chunks[-1]["choices"][0]
    assert finish["delta"] == {}, f"the finish chunk's delta must be {{}}: {finish}"
    assert finish["finish_reason"] == reference.choices[0].finish_reason, finish

    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
    assert text == reference.choices[0].message.content


# ---------------------------------------------------------------- stop


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_stop_sequence(client, reference, stream):
    stop, expected = pick_stop(reference.choices[0].message.content)
    kwargs = dict(
        model=MODEL_TIER,
        messages=PROSE_MESSAGES,
        temperature=0,
        max_tokens=REF_MAX_TOKENS,
        stop=[NEVER_STOP, stop],
    )
    if stream:
        chunks = _stream_chunks(client, **kwargs)
        text = _streamed_text(chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        resp = client.chat.completions.create(**kwargs)
        text = resp.choices[0].message.content
        finish_reason = resp.choices[0].finish_reason
        usage = assert_usage(resp.usage, max_tokens=REF_MAX_TOKENS)
        assert usage["completion_tokens"] < assert_usage(reference.usage)["completion_tokens"]
    assert stop not in text, f"stop string {stop!r} leaked into the output: {text!r}"
    assert text == expected, f"output must be the greedy text up to the stop string {stop!r}"
    assert finish_reason == "stop"
