#!/usr/bin/env python3
"""Response-cache latency: a repeated deterministic request (a hit after the first)
against unique requests (misses that run the model), end to end from a client.

Usage: python3 scripts/bench/cache.py --base http://127.0.0.1:8000 [--model light]
Needs httpx. Start the server with ENABLE_CACHE=true (the default).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="light")
    ap.add_argument("--hits", type=int, default=500)
    ap.add_argument("--misses", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4, help="clients for the requests/s runs")
    args = ap.parse_args()
    http = httpx.Client(base_url=args.base, timeout=120, trust_env=False)

    def body(i: int) -> dict:
        return {"model": args.model, "temperature": 0, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": f"Say something about the number {i}."}]}

    def timed(i: int) -> tuple[float, str]:
        t = time.perf_counter()
        r = http.post("/v1/chat/completions", json=body(i))
        r.raise_for_status()
        return (time.perf_counter() - t) * 1000, r.headers.get("x-llmservice-cache", "?")

    timed(-1)  # load the model, fill the cache entry used for hits
    hits = [timed(-1) for _ in range(args.hits)]
    assert all(kind == "hit" for _, kind in hits), "expected cache hits"
    misses = [timed(i) for i in range(args.misses)]
    assert all(kind == "miss" for _, kind in misses), "expected cache misses"

    def rps(ids: list[int]) -> float:
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(timed, ids))
        return len(ids) / (time.perf_counter() - t)

    hit_rps = rps([-1] * args.hits)
    miss_rps = rps(list(range(10_000, 10_000 + args.misses)))
    h = [ms for ms, _ in hits]
    m = [ms for ms, _ in misses]
    print(f"hit  latency ms: p50 {statistics.median(h):.2f}  p99 {pct(h, 0.99):.2f}  ({len(h)} requests)")
    print(f"miss latency ms: p50 {statistics.median(m):.1f}  p99 {pct(m, 0.99):.1f}  ({len(m)} requests, {args.max_tokens} tokens)")
    print(f"requests/s with {args.concurrency} clients: hits {hit_rps:.0f}, misses {miss_rps:.1f}")


if __name__ == "__main__":
    main()
