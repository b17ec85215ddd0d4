"""Constants and assertion helpers shared by the compatibility tests."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx

MODEL_TIER = "light"
MODEL_ID = "light/SmolLM2-135M-Instruct-Q4_1"
MODEL_NAMES = (MODEL_TIER, MODEL_ID)
OWNED_BY = "llmservice-light"
MODEL_STATES = ("available", "loading", "loaded")

# The model is tiny and CPU-only: every generation stays at <= 32 tokens.
REF_MAX_TOKENS = 24

# The prompt of the `json_object` mode tests. Free-form prompts ("Describe a
# cat as JSON.") send a 135M model down a path that finishes or loops depending
# on the CPU's rounding and on which prompt prefix the KV cache reused (that one
# looped for 4 of 30 seeds at temperature 0.7; BENCHMARKS.md, constrained
# output): those tests test the mode, so they ask for a small object, which
# finished for 30 of 30 seeds.
SMALL_OBJECT = "Describe a cat as a JSON object with its name and age."

# Greedy SmolLM2 answers these with prose that runs well past 32 tokens.
PROSE_MESSAGES = [{"role": "user", "content": "Describe the ocean in a few sentences."}]
STORY_MESSAGES = [
    {"role": "user", "content": "Write a long story about a dragon who lives in a castle."}
]
PROSE_PROMPT = "Once upon a time, in a small village by the sea, there lived"

NEVER_STOP = "\u2603\u2603never-generated\u2603\u2603"

_UNSET: Any = object()


def assert_recent_unix_seconds(created: Any, what: str = "created") -> None:
    assert isinstance(created, int) and not isinstance(created, bool), f"{what} must be an int, got {created!r}"
    assert abs(created - time.time()) < 600, f"{what}={created} is not a Unix timestamp in seconds near now"


def assert_usage(usage: Any, *, max_tokens: int | None = None, finish_reason: str | None = None) -> dict:
    """`usage` as a dict (raw JSON) or an SDK object; returns its three token counts.

    `prompt_tokens_details.cached_tokens` is left out: it legitimately differs
    between two identical requests (the second reuses the first's prompt cache).
    """
    if not isinstance(usage, dict):
        assert usage is not None, "usage missing"
        usage = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        assert isinstance(value, int) and not isinstance(value, bool), f"usage.{key} must be an int: {usage}"
        assert value >= 0, f"usage.{key} negative: {usage}"
    usage = {key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage["prompt_tokens"] > 0, f"prompt_tokens must count the prompt: {usage}"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    if max_tokens is not None:
        assert usage["completion_tokens"] <= max_tokens, f"more tokens than max_tokens={max_tokens}: {usage}"
        if finish_reason == "length":
            assert usage["completion_tokens"] == max_tokens, (
                f"finish_reason 'length' but completion_tokens != max_tokens={max_tokens}: {usage}"
            )
    return usage


def assert_openai_error(
    resp: Any,
    status: int,
    *,
    type_: str | None = None,
    param: Any = _UNSET,
    code: Any = _UNSET,
) -> dict:
    """Check an HTTP response (httpx or the SDK's httpx2) carries OpenAI's error shape.

    Returns the inner `error` object.
    """
    assert resp.status_code == status, f"expected HTTP {status}, got {resp.status_code}: {resp.text[:500]}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"error content-type {ctype!r}: {resp.text[:300]}"
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"error body must be {{'error': {{...}}}}: {body}"
    err = body["error"]
    assert isinstance(err, dict), body
    for key in ("message", "type", "param", "code"):
        assert key in err, f"error object lacks {key!r}: {err}"
    assert isinstance(err["message"], str) and err["message"].strip(), f"empty error message: {err}"
    assert isinstance(err["type"], str) and err["type"], f"empty error type: {err}"
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if type_ is not None:
        assert err["type"] == type_, f"error type {err['type']!r} != {type_!r}: {err}"
    if param is not _UNSET:
        assert err["param"] == param, f"error param {err['param']!r} != {param!r}: {err}"
    if code is not _UNSET:
        assert err["code"] == code, f"error code {err['code']!r} != {code!r}: {err}"
    return err


def read_sse(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """POST a streaming request and check the raw Server-Sent Events framing.

    Every event must be exactly one `data: <payload>` line followed by a blank
    line (SSE comment lines such as keep-alives are tolerated); every payload
    but the last is a JSON object; the last is `[DONE]` and nothing follows it.
    Returns the decoded JSON chunks.
    """
    resp = http.post(path, json=body)
    assert resp.status_code == 200, f"POST {path} (stream): HTTP {resp.status_code}: {resp.text[:500]}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("text/event-stream"), f"stream content-type {ctype!r}"
    try:
        text = resp.content.decode("utf-8")
    except UnicodeDecodeError as exc:  # e.g. a multi-byte character split across tokens
        raise AssertionError(f"stream body is not valid UTF-8: {exc}") from None
    text = text.replace("\r\n", "\n")
    assert text.endswith("data: [DONE]\n\n"), f"stream must end with 'data: [DONE]\\n\\n'; tail: {text[-300:]!r}"

    payloads: list[str] = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1, f"each SSE event must be a single 'data: ' line, got {lines!r}"
        line = lines[0]
        assert line.startswith("data: "), f"SSE line without 'data: ' prefix: {line!r}"
        payloads.append(line[len("data: "):])

    assert payloads and payloads[-1] == "[DONE]", f"last event is not [DONE]: {payloads[-3:]!r}"
    assert payloads.count("[DONE]") == 1, "[DONE] sent more than once"
    chunks = []
    for payload in payloads[:-1]:
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"SSE payload is not JSON ({exc}): {payload[:300]!r}") from None
        assert isinstance(chunk, dict), f"SSE payload is not a JSON object: {payload[:300]!r}"
        chunks.append(chunk)
    assert chunks, "stream carried no chunks before [DONE]"
    return chunks


def pick_stop(text: str) -> tuple[str, str]:
    """Choose a stop string from a greedy reference output.

    Returns (stop, expected): `stop` is two consecutive words with the leading
    space (so it spans more than one token and tests partial-match hold-back
    in streams); `expected` is what the same greedy request must return when
    given that stop string: the reference text up to the first occurrence.
    The stop is followed by another word in the reference, so it completes
    before the token limit and the finish reason must be "stop".
    """
    candidates = []
    for match in re.finditer(r" [A-Za-z]+ [A-Za-z]+", text):
        stop = match.group(0)
        idx = text.find(stop)
        if idx <= 0 or not text[:idx].strip():
            continue
        if not re.search(r" [A-Za-z]", text[idx + len(stop):]):
            continue
        candidates.append((stop, text[:idx]))
    # Prefer a stop string some way into the text, so several content chunks
    # stream before it; fall back to the earliest usable one.
    for stop, expected in candidates:
        if len(expected) >= 20:
            return stop, expected
    if candidates:
        return candidates[0]
    raise AssertionError(
        f"precondition: the greedy reference output has no usable two-word stop string: {text!r}"
    )
