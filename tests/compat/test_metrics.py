"""/metrics in the Prometheus text format, read with the official client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from compat_helpers import MODEL_ID


def test_metrics_parse_and_count(http, client):
    client.chat.completions.create(
        model="light", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    resp = http.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    for name in (
        "llmservice_http_requests",
        "llmservice_completion_tokens",
        "llmservice_time_to_first_token_seconds",
        "llmservice_inter_token_latency_seconds",
        "llmservice_sequences",
        "llmservice_model_loaded",
        "llmservice_response_cache",
    ):
        assert name in families, f"{name} missing; have {sorted(families)}"
    chat_ok = [
        s
        for s in families["llmservice_http_requests"].samples
        if s.labels.get("route") == "/v1/chat/completions" and s.labels.get("status") == "200"
    ]
    assert chat_ok and chat_ok[0].value >= 1
    generated = [
        s.value
        for s in families["llmservice_completion_tokens"].samples
        if s.labels.get("model") == MODEL_ID and s.name.endswith("_total")
    ]
    assert generated and generated[0] >= 1
    assert families["llmservice_time_to_first_token_seconds"].type == "histogram"
