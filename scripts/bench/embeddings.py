#!/usr/bin/env python3
"""Side-by-side embedding throughput of OpenAI-compatible servers.

Each target is started by this script (--launch NAME='command', with {port} in
the command), and only the one being measured runs: the others are paused with
SIGSTOP so they take no CPU. Rounds alternate between targets so both see the
same machine noise. In each round, --clients closed-loop clients send
POST /v1/embeddings requests of --batch short sentences back to back for
--duration seconds. Reported: inputs/s (median over rounds), request latency
p50/p95, and the cosine between the targets' vectors for the same sentences
(so both are known to do the same work).

Only the standard library and httpx.

Example:
  python3 scripts/bench/embeddings.py \\
    --launch "llmservice=EMBEDDING_MODEL_PATH=m.gguf EMBEDDING_N_THREADS=2 ENABLE_CACHE=false target/release/llmservice serve --port {port}" \\
    --launch "llama-cpp-python=python -m llama_cpp.server --model m.gguf --embedding true --n_threads 2 --n_threads_batch 2 --port {port}"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

WORDS = (
    "river stone cloud market engine garden letter window silver forest "
    "harbor winter music paper bridge lantern orchard signal copper meadow"
).split()


def sentence(i: int) -> str:
    w = [WORDS[(i * k + k * k) % len(WORDS)] for k in range(1, 8)]
    return f"The {w[0]} near the {w[1]} had {w[2]} and {w[3]}, said sentence {i} about {w[4]}."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, name: str, command: str):
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(
            command.format(port=self.port),
            shell=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.rounds: list[dict] = []

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_ready(self, model: str) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                r = httpx.post(
                    f"{self.url}/v1/embeddings",
                    json={"model": model, "input": "warm up"},
                    timeout=30,
                )
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not become ready")


async def measure(target: Target, model: str, clients: int, batch: int, duration: float) -> dict:
    latencies: list[float] = []
    inputs = 0
    errors = 0
    stop = time.perf_counter() + duration

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal inputs, errors
        n = 0
        while time.perf_counter() < stop:
            base = (c * 100_003 + n * 977) * batch
            texts = [sentence(base + j) for j in range(batch)]
            t0 = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"model": model, "input": texts})
            if r.status_code == 200 and len(r.json()["data"]) == batch:
                latencies.append(time.perf_counter() - t0)
                inputs += batch
            else:
                errors += 1
            n += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=target.url, timeout=300) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else math.nan
    return {
        "inputs_per_s": inputs / elapsed,
        "p50_ms": q(0.5) * 1000,
        "p95_ms": q(0.95) * 1000,
        "requests": len(latencies),
        "errors": errors,
    }


def vectors(target: Target, model: str, texts: list[str]) -> list[list[float]]:
    r = httpx.post(f"{target.url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60)
    r.raise_for_status()
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", action="append", required=True, help="NAME=command with {port}")
    ap.add_argument("--model", default="embedding", help="model name sent in requests")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    targets = [Target(*spec.split("=", 1)) for spec in args.launch]
    try:
        for t in targets:
            t.wait_ready(args.model)
            t.signal(signal.SIGSTOP)
        probe = [sentence(i) for i in range(8)]
        for t in targets:
            t.signal(signal.SIGCONT)
            t.probe = vectors(t, args.model, probe)
            t.signal(signal.SIGSTOP)
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                t.signal(signal.SIGCONT)
                time.sleep(0.5)
                result = asyncio.run(measure(t, args.model, args.clients, args.batch, args.duration))
                t.signal(signal.SIGSTOP)
                t.rounds.append(result)
                print(f"round {r + 1} {t.name}: {result}", file=sys.stderr)
    finally:
        for t in targets:
            t.signal(signal.SIGCONT)
            t.signal(signal.SIGTERM)
        for t in targets:
            try:
                t.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                t.signal(signal.SIGKILL)

    print(f"# Embedding throughput, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores")
    print(f"{args.clients} clients x {args.batch} sentences per request, {args.duration:.0f} s x {args.rounds} rounds (median)\n")
    print("| server | inputs/s | request p50 ms | request p95 ms | errors |")
    print("|---|---|---|---|---|")
    med = {}
    for t in targets:
        m = lambda k: statistics.median(r[k] for r in t.rounds)
        med[t.name] = m("inputs_per_s")
        errors = sum(r["errors"] for r in t.rounds)
        print(f"| {t.name} | {med[t.name]:.1f} | {m('p50_ms'):.0f} | {m('p95_ms'):.0f} | {errors} |")
    if len(targets) == 2:
        a, b = targets
        print(f"\nratio {a.name}/{b.name}: {med[a.name] / med[b.name]:.2f}")
        cos = min(cosine(x, y) for x, y in zip(a.probe, b.probe))
        print(f"min cosine between the two servers' vectors (8 sentences): {cos:.6f}")


if __name__ == "__main__":
    main()
