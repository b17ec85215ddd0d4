"""/health and /v1/models."""

from __future__ import annotations

from compat_helpers import MODEL_ID, MODEL_STATES, OWNED_BY


def test_health(http):
    resp = http.get("/health")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body, dict) and body.get("status") == "healthy", body


def test_models_list_raw(http):
    resp = http.get("/v1/models")
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("content-type", "").startswith("application/json")
    body = resp.json()
    assert body.get("object") == "list", body
    data = body.get("data")
    assert isinstance(data, list) and data, body
    for item in data:
        for key in ("id", "object", "created", "owned_by", "state"):
            assert key in item, f"model item lacks {key!r}: {item}"
        assert isinstance(item["id"], str) and item["id"], item
        assert item["object"] == "model", item
        assert isinstance(item["created"], int) and not isinstance(item["created"], bool), item
        assert item["created"] >= 0, item
        assert isinstance(item["owned_by"], str) and item["owned_by"], item
        assert item["state"] in MODEL_STATES, item
    ids = [item["id"] for item in data]
    assert len(ids) == len(set(ids)), f"duplicate model ids: {ids}"
    light = [item for item in data if item["id"] == MODEL_ID]
    assert light, f"{MODEL_ID!r} not listed: {ids}"
    assert light[0]["owned_by"] == OWNED_BY, light[0]


def test_models_list_sdk(client):
    models = list(client.models.list())
    by_id = {m.id: m for m in models}
    assert MODEL_ID in by_id, sorted(by_id)
    light = by_id[MODEL_ID]
    assert light.object == "model"
    assert light.owned_by == OWNED_BY
    assert isinstance(light.created, int)
    assert getattr(light, "state", None) in MODEL_STATES, light


def test_tier_model_is_loaded_after_use(client, http):
    # After a successful generation the tier model is resident.
    resp = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=1
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
    data = http.get("/v1/models").json()["data"]
    light = next(item for item in data if item["id"] == MODEL_ID)
    assert light["state"] == "loaded", light
