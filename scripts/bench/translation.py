"""Added latency of an API translation over `/v1/chat/completions`: the same
short greedy request through each route, interleaved, medians and p90s.

Usage: python scripts/bench/translation.py http://127.0.0.1:8000 [rounds]
(start the server with ENABLE_CACHE=false so every request generates)
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx

PROMPT = "Name three colors."
TOKENS = 8
ROUTES = {
    "chat": ("/v1/chat/completions", {"model": "light", "max_tokens": TOKENS, "temperature": 0,
                                      "messages": [{"role": "user", "content": PROMPT}]}),
    "messages": ("/v1/messages", {"model": "light", "max_tokens": TOKENS, "temperature": 0,
                                  "messages": [{"role": "user", "content": PROMPT}]}),
    "ollama": ("/api/chat", {"model": "light", "stream": False, "options": {"num_predict": TOKENS, "temperature": 0},
                             "messages": [{"role": "user", "content": PROMPT}]}),
    "responses": ("/v1/responses", {"model": "light", "max_output_tokens": TOKENS, "temperature": 0,
                                    "input": PROMPT, "store": False}),
}


def main() -> None:
    base = sys.argv[1].rstrip("/")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    times: dict[str, list[float]] = {name: [] for name in ROUTES}
    with httpx.Client(base_url=base, timeout=120) as client:
        for path, body in ROUTES.values():
            client.post(path, json=body).raise_for_status()  # warm-up
        for _ in range(rounds):
            for name, (path, body) in ROUTES.items():
                started = time.perf_counter()
                client.post(path, json=body).raise_for_status()
                times[name].append((time.perf_counter() - started) * 1000)
    base_p50 = statistics.median(times["chat"])
    for name, values in times.items():
        p50 = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:10s} p50 {p50:7.1f} ms  p90 {p90:7.1f} ms  vs chat {p50 - base_p50:+6.1f} ms")


if __name__ == "__main__":
    main()
