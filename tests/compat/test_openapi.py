"""/openapi.json is a valid OpenAPI 3 document describing the real routes; /docs serves its UI."""

from __future__ import annotations

from openapi_spec_validator import validate


def test_openapi_document_validates_and_covers_the_api(http):
    resp = http.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    spec = resp.json()
    validate(spec)  # raises on any violation of the OpenAPI 3.x schema
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/tokenize", "/metrics"):
        assert path in spec["paths"], f"{path} missing from {sorted(spec['paths'])}"
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in chat and "200" in chat["responses"] and "400" in chat["responses"]
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    # The shared sampling fields are flattened in, which utoipa writes as allOf.
    parts = request.get("allOf", [request])
    required = {field for part in parts for field in part.get("required", [])}
    assert {"model", "messages"} <= required


def test_docs_page_is_served(http):
    resp = http.get("/docs/")
    assert resp.status_code == 200
    assert "text/html" in resp.headers["content-type"]
    assert "swagger" in resp.text.lower()
    # Seed 002 documents FastAPI's second page too.
    resp = http.get("/redoc")
    assert resp.status_code == 200
    assert "text/html" in resp.headers["content-type"]
    assert "redoc" in resp.text.lower()
