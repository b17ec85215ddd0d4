#!/usr/bin/env python3
"""What an upstream tier costs: llmservice in front of another llmservice
({TIER}_BACKEND=openai) against that server asked directly, in one run.

  1. Added latency: alternating direct / proxied non-streamed chat requests
     (greedy, one token, cache off), p50 and p95 of each and of the difference.
  2. Throughput: scripts/bench/concurrency.py's streaming clients against both
     (interleaved), aggregate tok/s and TTFT.

Both servers are started here on free ports with the model given; the
release binary must be built. Never run in CI.

  .venv/bin/python scripts/bench/proxy.py --model ../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def start(binary: Path, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    full = dict(os.environ, MODELS_DIR=str(workdir / "models"), DATA_DIR=str(workdir / "data"),
                ENABLE_CACHE="false", LOG_LEVEL="warn", **env)
    proc = subprocess.Popen([str(binary), "serve", "--port", "0"], cwd=workdir, env=full,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "stderr.log", "wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        port = (workdir / ".port").read_text().strip() if (workdir / ".port").exists() else ""
        if port.isdigit():
            url = f"http://127.0.0.1:{port}"
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            sys.exit(f"server exited: {(workdir / 'stderr.log').read_text()[-2000:]}")
        time.sleep(0.1)
    sys.exit("server did not start")


def latency(direct: str, proxy: str, n: int) -> dict[str, list[float]]:
    body = {"model": "light", "temperature": 0, "max_tokens": 1,
            "messages": [{"role": "user", "content": "Say yes."}]}
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for url in (direct, proxy):  # load the model, open connections
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
        for i in range(n):
            order = [("direct", direct), ("proxy", proxy)]
            for name, url in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter()
                client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "llmservice")
    p.add_argument("--threads", default="2")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--duration", default="15")
    p.add_argument("--eos-token-id", default="2")
    args = p.parse_args()

    model = args.model.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tier = {"LIGHT_MODEL_PATH": str(model), "LIGHT_N_THREADS": args.threads,
                "LIGHT_PARALLEL": "8", "LIGHT_N_CTX": "8192"}
        upstream, direct = start(args.binary, tmp / "upstream", tier)
        front, proxy = start(args.binary, tmp / "proxy", {
            "LIGHT_MODEL_PATH": str(model), "LIGHT_BACKEND": "openai",
            "LIGHT_BASE_URL": f"{direct}/v1", "LIGHT_UPSTREAM_MODEL": "light"})
        try:
            times = latency(direct, proxy, args.requests)
            added = [p - d for p, d in zip(times["proxy"], times["direct"])]
            print(f"## Added latency ({args.requests} alternating requests, 1 token, non-streamed)\n")
            print("| | p50 ms | p95 ms |\n|---|---|---|")
            for name, values in (*times.items(), ("proxy - direct", added)):
                print(f"| {name} | {statistics.median(values):.2f} | {pct(values, 95):.2f} |")
            print(flush=True)
            subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "concurrency.py"),
                            "--target", f"direct={direct}", "--target", f"proxy={proxy}",
                            "--model", "light", "--concurrency", args.concurrency,
                            "--duration", args.duration, "--skip-prefix", "--temperature", "0",
                            "--eos-token-id", args.eos_token_id, "--max-tokens", "128",
                            "--markdown", str(tmp / "sweep.md")], check=True,
                           stdout=subprocess.DEVNULL)
            print((tmp / "sweep.md").read_text())
        finally:
            for proc in (front, upstream):
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
