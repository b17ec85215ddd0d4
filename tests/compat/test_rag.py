"""Retrieval against the release binary: seed 003's requests exactly as its
README sends them (the `requests`-style JSON bodies), and a server killed
with SIGKILL in the middle of an ingest that restarts holding only whole
documents."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

import conftest
from test_lifecycle import start

EMBEDDING = conftest.DEFAULT_MODEL.parent / conftest.EMBEDDING_FILE_NAME


def test_seed_003_requests_as_sent(server):
    base = server.base_url
    # Verbatim from seed 003's README.
    resp = httpx.post(f"{base}/v1/rag/documents", json={
        "texts": [
            "Docker is a containerization platform that packages applications.",
            "Kubernetes orchestrates containerized applications at scale.",
            "FastAPI is a modern Python web framework for building APIs."
        ],
        "metadata": [
            {"source": "docker-docs", "type": "definition"},
            {"source": "k8s-docs", "type": "definition"},
            {"source": "fastapi-docs", "type": "definition"}
        ]
    }, timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{base}/v1/rag/documents", json={"texts": ["Test document content"]},
                      timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text

    response = httpx.post(f"{base}/v1/rag/chat", json={
        "query": "How do Docker and Kubernetes work together?",
        "max_tokens": 256,
        "num_context_docs": 3
    }, timeout=300, trust_env=False)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"].strip()
    # This server also has the (synthetic) reranker tier, so the sources are
    # its picks: up to three of the documents sent, numbered in order.
    assert 1 <= len(body["sources"]) <= 3, body
    sent = {"docker-docs", "k8s-docs", "fastapi-docs", None}
    assert all(s["metadata"].get("source") in sent for s in body["sources"]), body["sources"]
    assert body["usage"]["completion_tokens"] > 0


def documents_are_whole(base: str) -> int:
    """Every listed document's chunks are all there; returns how many documents."""
    listing = httpx.get(f"{base}/v1/rag/documents", params={"limit": 1000},
                        timeout=60, trust_env=False)
    if listing.status_code == 200 and not listing.json()["data"]:
        return 0
    assert listing.status_code == 200, listing.text
    documents = listing.json()["data"]
    for document in documents:
        resp = httpx.get(f"{base}/v1/rag/documents/{document['id']}", timeout=60, trust_env=False)
        assert resp.status_code == 200, resp.text
        chunks = resp.json()["chunks"]
        assert len(chunks) == document["chunks"], document
        assert [c["chunk"] for c in chunks] == list(range(len(chunks)))
    return len(documents)


@pytest.mark.skipif(not EMBEDDING.is_file(), reason="the MiniLM encoder is not beside the test model")
def test_sigkill_during_an_ingest_keeps_only_whole_documents(tmp_path):
    env = dict(EMBEDDING_MODEL_PATH=str(EMBEDDING), EMBEDDING_N_THREADS="2",
               DATA_DIR=str(tmp_path / "data"))
    proc, base = start(tmp_path, **env)
    # Many multi-chunk documents: the ingest writes group after group.
    paragraph = " ".join(f"Line {i} of the harbour log records ships, tides and cargo." for i in range(60))
    texts = [f"Document {d}. {paragraph}" for d in range(200)]
    ids = [f"doc-{d}" for d in range(200)]
    outcome: dict = {}

    def ingest():
        try:
            outcome["response"] = httpx.post(f"{base}/v1/rag/documents", json={"texts": texts, "ids": ids},
                                              timeout=600, trust_env=False)
        except httpx.HTTPError as error:
            outcome["error"] = error

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        # Kill once some documents are in, while the ingest is still going.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listing = httpx.get(f"{base}/v1/rag/documents", params={"limit": 1000},
                                timeout=60, trust_env=False).json()
            if len(listing["data"]) >= 2:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        worker.join(timeout=60)
        assert "error" in outcome, "the ingest finished before the kill: make it longer"
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "models").rmdir()
    (tmp_path / ".port").unlink(missing_ok=True)
    proc, base = start(tmp_path, **env)
    try:
        kept = documents_are_whole(base)
        assert 2 <= kept < 200, kept
        # The store takes writes again, and the interrupted ids can be sent again.
        resp = httpx.post(f"{base}/v1/rag/documents", json={"texts": texts[:3], "ids": ids[:3]},
                          timeout=300, trust_env=False)
        assert resp.status_code == 200, resp.text
        assert documents_are_whole(base) >= kept
        hits = httpx.post(f"{base}/v1/rag/search", json={"query": "ships and tides", "score_threshold": 0},
                          timeout=60, trust_env=False).json()["results"]
        assert hits and all(h["document_id"].startswith("doc-") for h in hits)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=conftest.SHUTDOWN_GRACE_S)
