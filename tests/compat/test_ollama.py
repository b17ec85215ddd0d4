"""Ollama's API through the official `ollama` Python library, unmodified, on
the real SmolLM2."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"],
}


@pytest.fixture(scope="module")
def llama(server):
    return ollama.Client(host=server.base_url, timeout=120)


def test_version_tags_show_and_ps(llama, http):
    assert http.get("/api/version").json()["version"]
    names = [m.model for m in llama.list().models]
    assert "light/SmolLM2-135M-Instruct-Q4_1:latest" in names
    light = next(m for m in llama.list().models if m.model.startswith("light/"))
    assert light.size > 0 and len(light.digest) == 64
    assert light.details.format == "gguf" and light.details.quantization_level == "Q4_1"
    shown = llama.show("light")
    assert "completion" in shown.capabilities
    assert shown.details.family == "llama" and shown.details.parameter_size.endswith("M")
    # Ollama's keys, under the architecture's name, as editors read them.
    assert shown.template and shown.modelinfo["llama.context_length"] > 0
    assert shown.modelinfo["llama.embedding_length"] == 576
    assert any(m.model.startswith("light/") for m in llama.ps().models)


def test_chat_whole_and_streamed_agree(llama):
    request = dict(model="light", messages=[{"role": "user", "content": "Say hi"}], options={"num_predict": 12, "temperature": 0})
    whole = llama.chat(**request)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count > 0 and 0 < whole.eval_count <= 12
    assert whole.total_duration >= whole.eval_duration > 0
    parts = list(llama.chat(stream=True, **request))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_chat_format_schema_gives_valid_json(llama):
    reply = llama.chat(
        model="light:latest",
        messages=[{"role": "user", "content": "Give a city."}],
        format=CITY,
        options={"num_predict": 80, "temperature": 0},
    )
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), CITY)
    as_json = llama.chat(
        model="light", messages=[{"role": "user", "content": "A user as JSON."}], format="json", options={"num_predict": 80, "temperature": 0}
    )
    if as_json.done_reason == "stop":
        assert isinstance(json.loads(as_json.message.content), dict)


def test_chat_tools_round_trip(llama, http):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    # Ollama's API has no tool_choice; the tool history must still render and answer.
    reply = llama.chat(
        model="light",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
        ],
        tools=[tool],
        options={"num_predict": 20, "temperature": 0},
    )
    assert reply.done and reply.prompt_eval_count > 0


def test_generate_and_load(llama):
    reply = llama.generate(model="light", prompt="Name a color.", options={"num_predict": 8, "temperature": 0})
    assert reply.done and reply.response and reply.eval_count <= 8
    streamed = "".join(p.response for p in llama.generate(model="light", prompt="Name a color.", options={"num_predict": 8, "temperature": 0}, stream=True))
    assert streamed == reply.response
    loaded = llama.generate(model="light", prompt="")
    assert loaded.done and loaded.done_reason == "load"
    # Chat without messages loads too, as in Ollama.
    loaded = llama.chat(model="light", messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""


def test_keep_alive_zero_unloads(llama, http):
    llama.generate(model="light", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    import time

    for _ in range(100):
        if not any(m.model.startswith("light/") for m in llama.ps().models):
            break
        time.sleep(0.05)
    assert not any(m.model.startswith("light/") for m in llama.ps().models)
    unloaded = llama.generate(model="light", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/api/chat", {"model": "light", "messages": [{"role": "user", "content": "x"}], "format": 3}, 400),
        ("/api/chat", {"model": "light", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
        ("/api/chat", {"model": "light", "messages": [{"role": "tool", "content": "x"}]}, 400),
        ("/api/chat", {"messages": []}, 400),
        ("/api/generate", {"model": "light", "prompt": "x", "raw": True}, 400),
        ("/api/generate", {"model": "light", "prompt": "def f(", "suffix": "return 1"}, 400),
        ("/api/generate", {"model": "light", "prompt": "x", "images": ["aGk="]}, 400),
        ("/api/generate", {"model": "light", "prompt": "x", "options": {"temperature": -1}}, 400),
        ("/api/show", {"model": "nope"}, 404),
    ],
)
def test_bad_requests_get_ollama_errors(http, path, body, status):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str) and response.json()["error"]


def test_embed_and_legacy_embeddings(llama, client):
    texts = ["The cat sat on the mat.", "A feline rested on the rug."]
    reply = llama.embed(model="embedding", input=texts)
    assert len(reply.embeddings) == 2 and reply.prompt_eval_count > 0
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in reply.embeddings)
    openai_vectors = [d.embedding for d in client.embeddings.create(model="embedding", input=texts).data]
    for ours, theirs in zip(reply.embeddings, openai_vectors):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    short = llama.embed(model="embedding", input="hello", dimensions=64)
    assert len(short.embeddings[0]) == 64
    legacy = llama.embeddings(model="embedding", prompt="hello")
    assert len(legacy.embedding) == len(reply.embeddings[0])


def test_embed_errors(http):
    assert http.post("/api/embed", json={"model": "light", "input": "x"}).status_code == 400
    assert http.post("/api/embed", json={"model": "embedding", "input": [""]}).status_code == 400
    assert http.post("/api/embed", json={"model": "embedding", "input": "x", "dimensions": 100000}).status_code == 400
    response = http.post("/api/embed", json={"model": "nope", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]


def test_pull_succeeds_for_a_model_here_and_says_where_models_come_from(llama):
    assert llama.pull("light").status == "success"
    assert [p.status for p in llama.pull("light:latest", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as raised:
        llama.pull("no-such-model")
    assert raised.value.status_code == 404 and "MODELS_DIR" in raised.value.error
