"""Secrets stay secret: the operator's key, a named key, a wrong key and an
upstream's key never appear in the server's log (at its default level) or
in any answer, the settings page included."""

from __future__ import annotations

import httpx

import conftest
from test_lifecycle import start

OPERATOR = "sk-operator-4f9c2a7e51d8"
UPSTREAM = "sk-upstream-b83e0c6d92aa"
WRONG = "sk-wrong-71c0d5e3f4b2"


def test_keys_never_reach_the_log_or_an_answer(tmp_path):
    proc, base = start(
        tmp_path,
        API_KEY=OPERATOR,
        ENABLE_CACHE="true",
        # A tier served by an upstream that is not there: its key is configured
        # and used (and the upstream's failure logged), never shown.
        MEDIUM_BACKEND="openai",
        MEDIUM_BASE_URL="http://127.0.0.1:9/v1",
        MEDIUM_API_KEY=UPSTREAM,
        MEDIUM_UPSTREAM_MODEL="remote",
    )
    answers: list[str] = []
    try:
        def send(method: str, path: str, key: str | None, body: dict | None = None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = httpx.request(method, f"{base}{path}", json=body, headers=headers,
                                 timeout=60, trust_env=False)
            answers.append(resp.text)
            return resp

        created = send("POST", "/admin/api/keys", OPERATOR, {"name": "app"})
        assert created.status_code == 201, created.text
        named = created.json()["key"]
        answers.pop()  # the one answer that carries the new key, by design
        chat = {"model": "light", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        assert send("POST", "/v1/chat/completions", named, chat).status_code == 200
        assert send("POST", "/v1/chat/completions", WRONG, chat).status_code == 200  # loopback is open
        assert send("GET", "/admin/api/keys", WRONG).status_code == 401
        assert send("GET", "/admin/api/keys", named).status_code == 403
        assert send("POST", "/v1/chat/completions", OPERATOR, dict(chat, model="medium")).status_code >= 500
        for path in ("/admin/api/settings", "/admin/api/status", "/admin/api/keys", "/v1/models", "/metrics"):
            assert send("GET", path, OPERATOR).status_code == 200, path
    finally:
        conftest._stop(proc)
    log = (tmp_path / "server.stderr.log").read_text(errors="replace")
    assert "remote" in log or "medium" in log  # the upstream's failure was logged
    for secret in (OPERATOR, UPSTREAM, WRONG, named):
        assert secret not in log, f"a key in the log: {secret[:10]}..."
        for answer in answers:
            assert secret not in answer, f"a key in an answer: {answer[:300]}"
