"""A corpus of bad input sent to every route that takes a body: malformed and
deeply nested JSON, wrong types, invalid UTF-8, NUL bytes, a million-character
string, extreme numbers, path-like and odd model names, bodies over the limit.
Every answer must be a 4xx in the error shape of the route's API, and the
server must stay up after each one."""

from __future__ import annotations

import json

import pytest

# Route → the API whose error shape it answers in.
ROUTES = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/responses": "openai",
    "/v1/embeddings": "openai",
    "/v1/rerank": "openai",
    "/tokenize": "openai",
    "/detokenize": "openai",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
    "/api/chat": "ollama",
    "/api/generate": "ollama",
    "/api/embed": "ollama",
    "/api/embeddings": "ollama",
    "/api/show": "ollama",
    "/api/pull": "ollama",
    "/v1/rag/documents": "openai",
    "/v1/rag/search": "openai",
    "/v1/rag/chat": "openai",
}

MILLION = "x" * 1_000_000
NESTED = ("[" * 100_000 + "]" * 100_000).encode()

# Raw bodies no route can accept.
RAW = {
    "empty": b"",
    "truncated": b'{"model": "light", "messages": [',
    "not_an_object": b"[1, 2, 3]",
    "null": b"null",
    "bare_string": b'"light"',
    "invalid_utf8": b'{"model": "light\xff\xfe", "prompt": "\xc3\x28"}',
    "nul_in_key": b'{"mo\x00del": "light"}',
    "deeply_nested": NESTED,
    "nested_object": ('{"model": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}").encode(),
    "trailing_garbage": b'{"model": "light"} {"model": "light"}',
    "lone_surrogate": b'{"model": "\\ud800", "prompt": "\\udfff"}',
}

# Parsed bodies with fields of the wrong type or out of range, per route
# family; every one of them is the client's mistake.
BAD_MODELS = ["../../etc/passwd", "/etc/passwd", "light/../../../etc/shadow", "", " ", "\u0000", "模型\u202e", MILLION[:5000]]


def bodies_for(route: str) -> dict[str, dict]:
    if route.startswith("/v1/chat"):
        base = {"model": "light", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        bad = {
            "messages_string": {"messages": "hi"},
            "role_number": {"messages": [{"role": 5, "content": "hi"}]},
            "n_huge": {"n": 1_000_000_000},
            "max_tokens_negative": {"max_tokens": -1},
            "max_tokens_huge": {"max_tokens": 2**64},
            "top_logprobs_huge": {"logprobs": True, "top_logprobs": 100_000},
            "temperature_infinite": {"temperature": 1e400},
            "context_overflow": {"messages": [{"role": "user", "content": MILLION}]},
            "schema_garbage": {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}},
            "tools_garbage": {"tools": [{"type": "function", "function": {"name": 5}}]},
        }
    elif route == "/v1/completions":
        base = {"model": "light", "max_tokens": 1, "prompt": "hi"}
        bad = {
            "prompt_object": {"prompt": {"a": 1}},
            "token_out_of_vocab": {"prompt": [10**12]},
            "n_huge": {"n": 10**9},
            "logprobs_huge": {"logprobs": 10**6},
            "context_overflow": {"prompt": MILLION},
            "stop_number": {"stop": 5},
        }
    elif route == "/v1/responses":
        base = {"model": "light", "max_output_tokens": 1, "input": "hi"}
        bad = {
            "input_number": {"input": 5},
            "item_garbage": {"input": [{"type": "mystery"}]},
            "max_output_negative": {"max_output_tokens": -5},
            "previous_unknown": {"previous_response_id": "../../etc/passwd"},
            "context_overflow": {"input": MILLION},
        }
    elif route in ("/v1/embeddings", "/api/embed"):
        base = {"model": "embedding", "input": "hi"}
        bad = {
            "input_number": {"input": 5},
            "empty_text": {"input": [""]},
            "too_many": {"input": ["x"] * 5000},
            "dimensions_huge": {"dimensions": 10**9},
            "token_out_of_vocab": {"input": [[10**12]]},
        }
    elif route == "/v1/rerank":
        base = {"model": "reranker", "query": "q", "documents": ["a"]}
        bad = {"documents_string": {"documents": "a"}, "no_documents": {"documents": []}, "query_number": {"query": 5}}
    elif route == "/tokenize":
        base = {"model": "light", "content": "hi"}
        bad = {"content_number": {"content": 5}, "messages_garbage": {"content": None, "messages": 5}}
    elif route == "/detokenize":
        base = {"model": "light", "tokens": [1]}
        bad = {"tokens_garbage": {"tokens": ["a", 1]}, "token_out_of_vocab": {"tokens": [10**12]}, "negative": {"tokens": [-1]}}
    elif route.startswith("/v1/messages"):
        base = {"model": "light", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        bad = {
            "max_tokens_missing": {"max_tokens": None},
            "block_garbage": {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "system_number": {"system": 5},
            "tool_choice_garbage": {"tool_choice": {"type": "maybe"}},
            "context_overflow": {"messages": [{"role": "user", "content": MILLION}]},
        }
        if route.endswith("count_tokens"):
            # Counting needs no max_tokens, and counts past the context.
            del bad["max_tokens_missing"], bad["context_overflow"]
    elif route == "/api/chat":
        base = {"model": "light", "stream": False, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 1}}
        bad = {
            "options_string": {"options": "fast"},
            "messages_number": {"messages": 5},
            "format_garbage": {"format": 5},
            "context_overflow": {"messages": [{"role": "user", "content": MILLION}]},
        }
    elif route == "/api/generate":
        base = {"model": "light", "stream": False, "prompt": "hi", "options": {"num_predict": 1}}
        bad = {
            "options_string": {"options": "fast"},
            "prompt_number": {"prompt": 5},
            "format_garbage": {"format": 5},
            "raw": {"raw": True},
            "context_overflow": {"prompt": MILLION},
        }
    elif route == "/v1/rag/documents":
        base = {"texts": ["hi"]}
        bad = {
            "texts_string": {"texts": "hi"},
            "texts_empty": {"texts": []},
            "text_blank": {"texts": [" \n"]},
            "metadata_mismatch": {"metadata": [{}, {}]},
            "metadata_number": {"metadata": [5]},
            "ids_number": {"ids": [5]},
            "ids_control": {"ids": ["a\u0000b"]},
            "too_many": {"texts": ["x"] * 3000},
            "markdown_string": {"markdown": "yes"},
        }
    elif route == "/v1/rag/search":
        base = {"query": "hi"}
        bad = {
            "query_number": {"query": 5},
            "query_empty": {"query": ""},
            "top_k_huge": {"top_k": 10**9},
            "top_k_negative": {"top_k": -1},
            "threshold_string": {"score_threshold": "high"},
            "mode_garbage": {"mode": "psychic"},
            "filter_nested": {"filter": {"a": {"b": 1}}},
            "filter_string": {"filter": "source=x"},
            "filter_path": {"filter": {"../x": "y"}},
            "rerank_string": {"rerank": "yes"},
        }
    elif route == "/v1/rag/chat":
        base = {"query": "hi", "max_tokens": 1}
        bad = {
            "query_empty": {"query": " "},
            "messages_tool": {"messages": [{"role": "tool", "content": "x"}]},
            "num_context_docs_huge": {"num_context_docs": 10**9},
            "max_tokens_negative": {"max_tokens": -1},
            "temperature_infinite": {"temperature": 1e400},
            "model_unknown": {"model": "../../etc/passwd"},
        }
    else:  # Ollama's show, pull and legacy embeddings
        base = {"model": "embedding", "prompt": "hi"}
        bad = {"model_number": {"model": 5, "name": 5, "prompt": 5}}
    cases = {name: {**base, **change} for name, change in bad.items()}
    cases = {name: {k: v for k, v in body.items() if v is not None} for name, body in cases.items()}
    for i, model in enumerate(BAD_MODELS):
        if route.startswith("/v1/rag/"):
            # Retrieval names collections: the same hostile names go there.
            cases[f"collection_{i}"] = {**base, "collection": model}
        else:
            cases[f"model_{i}"] = {**base, "model": model, "name": model}
    return cases


def check_shape(api: str, body) -> None:
    if api == "openai":
        error = body["error"]
        assert isinstance(error, dict) and error["message"] and "type" in error, body
    elif api == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"], body
    else:
        assert isinstance(body["error"], str) and body["error"], body


def assert_refused(http, route: str, content: bytes, what: str) -> None:
    response = http.post(route, content=content, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, f"{route} {what}: {response.status_code} {response.text[:300]}"
    check_shape(ROUTES[route], response.json())
    # No server path or internals in what the client is told.
    assert "/work/" not in response.text and "panicked" not in response.text, response.text[:300]
    assert http.get("/health").status_code == 200, f"server down after {route} {what}"


@pytest.mark.parametrize("route", ROUTES)
def test_malformed_bodies_are_refused(http, route):
    for name, content in RAW.items():
        assert_refused(http, route, content, name)


@pytest.mark.parametrize("route", ROUTES)
def test_bad_fields_and_models_are_refused(http, route):
    for name, body in bodies_for(route).items():
        assert_refused(http, route, json.dumps(body).encode(), name)


def test_bodies_over_the_limit_are_413(http):
    huge = b'{"model": "light", "prompt": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    for route in ("/v1/completions", "/v1/messages", "/api/generate"):
        response = http.post(route, content=huge, headers={"content-type": "application/json"})
        assert response.status_code == 413, route
        # The rest of the body is unread, so the connection closes: said, so a
        # pooled client does not send its next request into it.
        assert response.headers.get("connection") == "close", route
        check_shape(ROUTES[route], response.json())
    assert http.get("/health").status_code == 200


def test_unknown_fields_are_ignored(http):
    body = {"model": "light", "max_tokens": 1, "messages": [{"role": "user", "content": "hi", "mystery": 1}],
            "mystery": {"deep": [1, 2]}, "x-extension": None}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
