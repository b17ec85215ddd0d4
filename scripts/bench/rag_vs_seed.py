"""Retrieval side by side with the seeds' stack: llama-cpp-python embeddings
(one text per call, as seed 003 embeds) and qdrant-client's local mode
(`QDRANT_USE_MEMORY=true`, seed 003's default), on the same MiniLM model, the
same chunks and the same machine.

    python scripts/bench/rag_vs_seed.py http://127.0.0.1:8000 MODEL.gguf
    python scripts/bench/rag_vs_seed.py --store-only    # part 3 alone

Run it with a Python that has `llama-cpp-python`, `qdrant-client` and numpy
(`--store-only` needs only the last two). It
needs the `pydoc` collection that `scripts/bench/rag_quality.py` ingests (it
reads that collection's chunks, so both stacks index the very same texts),
and reports:
  1. ingest: the seeds' stack embedding and upserting those chunks, chunks/s;
  2. search end to end (embed the question, search, top 3) over the
     quality set's questions, p50 / p95 ms;
  3. the store alone at 10k and 100k synthetic 384-d vectors: qdrant-client's
     local mode query time (compare with the `store_bench` example).
"""

import json
import os
import statistics
import sys
import time
import urllib.request

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client.models import Distance, PointStruct, VectorParams

sys.path.insert(0, os.path.dirname(__file__))
from rag_quality import QUESTIONS  # noqa: E402


def call(base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round((len(values) - 1) * p)))]


def main():
    if sys.argv[1:] == ["--store-only"]:
        store_alone()
        return
    from llama_cpp import Llama

    base, model = sys.argv[1].rstrip("/"), sys.argv[2]
    chunks = []
    offset = None
    while True:
        path = "/v1/rag/documents?collection=pydoc&limit=1000" + (f"&offset={offset}" if offset else "")
        page = call(base, path)
        for document in page["data"]:
            detail = call(base, f"/v1/rag/documents/{document['id']}?collection=pydoc")
            chunks.extend((document["id"], c["text"]) for c in detail["chunks"])
        offset = page["next_offset"]
        if not offset:
            break
    print(f"{len(chunks)} chunks of the pydoc collection")

    llm = Llama(model_path=model, embedding=True, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
    client = QdrantClient(":memory:")
    client.create_collection("pydoc", vectors_config=VectorParams(size=384, distance=Distance.COSINE))
    started = time.perf_counter()
    points = []
    for i, (document, text) in enumerate(chunks):
        vector = llm.create_embedding(text)["data"][0]["embedding"]
        points.append(PointStruct(id=i, vector=vector, payload={"document_id": document, "text": text}))
    client.upsert("pydoc", points)
    elapsed = time.perf_counter() - started
    print(f"seeds' stack ingest: {len(chunks) / elapsed:.1f} chunks/s ({elapsed:.1f} s)")

    theirs, ours_dense, ours_hybrid = [], [], []
    for question, _ in QUESTIONS:
        t0 = time.perf_counter()
        vector = llm.create_embedding(question)["data"][0]["embedding"]
        client.query_points("pydoc", query=vector, limit=3)
        theirs.append((time.perf_counter() - t0) * 1000)
        for mode, times in (("dense", ours_dense), ("hybrid", ours_hybrid)):
            t0 = time.perf_counter()
            call(base, "/v1/rag/search", {"query": question, "collection": "pydoc", "mode": mode,
                                          "top_k": 3, "score_threshold": -1.0, "rerank": False})
            times.append((time.perf_counter() - t0) * 1000)
    print("\n| search, end to end (676-chunk collection) | p50 ms | p95 ms |")
    print("|---|---|---|")
    for name, times in (("seeds' stack (llama-cpp-python + qdrant-client local)", theirs),
                        ("llmservice, dense", ours_dense), ("llmservice, hybrid", ours_hybrid)):
        print(f"| {name} | {statistics.median(times):.1f} | {pct(times, 0.95):.1f} |")

    store_alone()


def store_alone():
    print("\n| qdrant-client local mode, synthetic 384-d | query p50 ms | p95 ms | RSS added MiB |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(7)
    for n in (10_000, 100_000):
        before = rss_mib()
        store = QdrantClient(":memory:")
        store.create_collection("s", vectors_config=VectorParams(size=384, distance=Distance.COSINE))
        vectors = rng.standard_normal((n, 384)).astype(np.float32)
        for start in range(0, n, 5000):
            store.upsert("s", [PointStruct(id=start + i, vector=v.tolist(), payload={"i": start + i})
                               for i, v in enumerate(vectors[start:start + 5000])])
        added = rss_mib() - before
        times = []
        for q in rng.standard_normal((50, 384)).astype(np.float32):
            t0 = time.perf_counter()
            store.query_points("s", query=q.tolist(), limit=3)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"| {n} | {statistics.median(times):.2f} | {pct(times, 0.95):.2f} | {added:.0f} |")
        del store


if __name__ == "__main__":
    main()
