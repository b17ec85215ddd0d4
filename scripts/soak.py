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
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "compat"))
import conftest  # noqa: E402
from soak_load import soak, summary  # noqa: E402
from test_lifecycle import start  # noqa: E402

MODELS = conftest.DEFAULT_MODEL.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--warm-up", type=float, default=60, help="seconds before RSS counts")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmservice-soak-"))
    # The suite's launcher (its light tier on SmolLM2), with the encoder tiers
    # and the cache on unless the environment says otherwise.
    proc, url = start(
        workdir,
        ENABLE_CACHE=os.environ.get("ENABLE_CACHE", "true"),
        EMBEDDING_MODEL_PATH=str(MODELS / conftest.EMBEDDING_FILE_NAME),
        RERANKER_MODEL_PATH=str(MODELS / conftest.RERANKER_FILE_NAME),
        EMBEDDING_N_THREADS="2",
        RERANKER_N_THREADS="2",
        DATA_DIR=str(workdir / "data"),
    )
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
    report["server_log"] = str(workdir / "server.stderr.log")
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
