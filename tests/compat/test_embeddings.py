"""Embeddings and reranking through the OpenAI SDK, LangChain and plain HTTP."""

from __future__ import annotations

import base64
import math
import struct

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


def test_sdk_default_base64(client):
    # The SDK asks for base64 by default and decodes it itself.
    resp = client.embeddings.create(model="embedding", input="The quick brown fox")
    assert resp.object == "list"
    assert len(resp.data) == 1
    vec = resp.data[0].embedding
    assert len(vec) == 384
    assert abs(_norm(vec) - 1.0) < 1e-4
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 2


def test_sdk_float_matches_base64(client, http):
    text = "Embeddings should survive the wire unchanged."
    floats = client.embeddings.create(
        model="embedding", input=text, encoding_format="float"
    ).data[0].embedding
    raw = http.post(
        "/v1/embeddings",
        json={"model": "embedding", "input": text, "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    decoded = list(struct.unpack(f"<{len(floats)}f", base64.b64decode(raw)))
    assert decoded == pytest.approx(floats, abs=1e-7)


def test_sdk_dimensions_and_batches(client):
    texts = ["first sentence", "a second, longer sentence about cats", "third"]
    resp = client.embeddings.create(model="embedding", input=texts, dimensions=128)
    assert [d.index for d in resp.data] == [0, 1, 2]
    for d in resp.data:
        assert len(d.embedding) == 128
        assert abs(_norm(d.embedding) - 1.0) < 1e-4
    full = client.embeddings.create(model="embedding", input=texts[1]).data[0].embedding
    head = full[:128]
    assert _cos(resp.data[1].embedding, head) > 0.9999


def test_sdk_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="embedding", input="x", dimensions=4096)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="embedding", input="word " * 700)
    assert err.value.body["code"] == "context_length_exceeded"


def test_langchain_openai_embeddings(server):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model="embedding",
        base_url=f"{server.base_url}/v1",
        api_key="not-needed",
        # Token counting would download tiktoken's tables; the server counts tokens itself.
        check_embedding_ctx_length=False,
    )
    docs = emb.embed_documents(["Paris is in France.", "Bananas are yellow."])
    query = emb.embed_query("Which city is in France?")
    assert len(docs) == 2 and all(len(d) == 384 for d in docs)
    assert _cos(query, docs[0]) > _cos(query, docs[1])


def test_rerank_both_shapes(http):
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany."]
    seed = http.post(
        "/v1/rerank",
        json={"model": "reranker", "query": "capital of France", "documents": docs, "top_k": 2},
    ).json()
    assert [set(r) for r in seed["data"]] == [{"index", "score", "document"}] * 2
    assert seed["data"][0]["score"] >= seed["data"][1]["score"]
    cohere = http.post(
        "/rerank",
        json={"query": "capital of France", "documents": docs, "top_n": 3},
    ).json()
    results = cohere["results"]
    assert [r["index"] for r in results][:2] == [r["index"] for r in seed["data"]]
    for r in results:
        assert 0.0 < r["relevance_score"] < 1.0
        assert r["document"]["text"] == docs[r["index"]]
    top = next(r for r in results if r["index"] == seed["data"][0]["index"])
    assert top["relevance_score"] == pytest.approx(
        1 / (1 + math.exp(-seed["data"][0]["score"])), abs=1e-6
    )
