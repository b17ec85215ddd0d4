#!/usr/bin/env python3
"""The full soak: starts the release binary on SmolLM2 (with the MiniLM
embedding and reranker tiers beside it), drives CLIENTS concurrent clients
for SECONDS with the mix of tests/compat/soak_load.py, samples the server's
RSS every 5 s, and prints a JSON report (the figures RELIABILITY.md quotes).
Exits 1 on any error other than a documented 503, on sequences left behind,
or when RSS in the last fifth is over 10% above its level after warm-up.

    .venv/bin/python scripts/soak.py [--seconds 600] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "compat"))
from soak_load import soak, summary  # noqa: E402

MODELS = ROOT.parent / "shared" / "models"


def start(workdir: Path) -> tuple[subprocess.Popen, str]:
    env = dict(
        os.environ,
        LIGHT_MODEL_PATH=str(MODELS / "SmolLM2-135M-Instruct-Q4_1.gguf"),
        EMBEDDING_MODEL_PATH=str(MODELS / "all-MiniLM-L6-v2-f16.gguf"),
        RERANKER_MODEL_PATH=str(MODELS / "SYNTHETIC-minilm-l6-reranker-f16.gguf"),
        MODELS_DIR=str(workdir / "models"),
        DATA_DIR=str(workdir / "data"),
        LIGHT_N_CTX="2048",
        LIGHT_N_THREADS="2",
        EMBEDDING_N_THREADS="2",
        RERANKER_N_THREADS="2",
    )
    (workdir / "models").mkdir()
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(
        [str(ROOT / "target" / "release" / "llmservice"), "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        port = (workdir / ".port").read_text().strip() if (workdir / ".port").exists() else ""
        if port.isdigit():
            url = f"http://127.0.0.1:{port}"
            try:
                if httpx.get(f"{url}/health", trust_env=False).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start; see {workdir / 'server.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--warm-up", type=float, default=60, help="seconds before RSS counts")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmservice-soak-"))
    proc, url = start(workdir)
    try:
        models = {"chat": "light", "embedding": "embedding", "reranker": "reranker"}
        res, left = asyncio.run(soak(url, proc.pid, args.seconds, args.clients, models))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = summary(res, left, args.seconds)
    after_warm_up = [k for t, k in res.rss if t >= args.warm_up]
    ok = report["errors"] == 0 and left == 0
    if len(after_warm_up) >= 10:
        base = statistics.median(after_warm_up[: len(after_warm_up) // 5])
        last = statistics.median(after_warm_up[-len(after_warm_up) // 5 :])
        report["rss_growth_after_warm_up"] = round(last / base - 1, 3)
        ok = ok and last <= base * 1.10
    report["server_log"] = str(workdir / "server.log")
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
