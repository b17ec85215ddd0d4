"""Soak load: many concurrent clients sending a mix of streaming chat and
completions, embeddings, rerank and cached requests, some of which hang up
mid-stream, while the server's memory is sampled. Used by the one-minute CI
test (test_soak.py) and by scripts/soak.py for the full run.

A request counts as an error when it gets anything but a 200, or a
documented 503 (queue_full, a queue timeout) with `Retry-After`; a stream
counts as an error when it carries an error event, or ends without its
closing `[DONE]` although we did not hang up.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = (
    "river mountain lantern copper violet engine harbor meadow signal quartz "
    "window thunder pepper marble orchard cobalt falcon ember glacier saddle"
).split()
CACHED_PROMPTS = [f"Name one {w}." for w in WORDS[:6]]
DOCUMENTED_503 = {"queue_full", "queue_timeout"}


@dataclass
class Results:
    started: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    busy: int = 0  # documented 503s
    disconnects: int = 0
    cache_hits: int = 0
    ttft: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, KiB)
    cache: dict[str, float] = field(default_factory=dict)  # the response cache at the end

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def error(self, kind: str, what: str) -> None:
        self.errors.append(f"{kind}: {what[:300]}")


def rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else None


def prompt(rng: random.Random) -> str:
    return "Write about " + " ".join(rng.choices(WORDS, k=rng.randint(2, 12))) + "."


def is_documented_busy(response: httpx.Response, body: bytes) -> bool:
    if response.status_code != 503 or "retry-after" not in response.headers:
        return False
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return error.get("code") in DOCUMENTED_503


async def stream(http: httpx.AsyncClient, res: Results, kind: str, path: str, body: dict,
                 hang_up_after: int | None) -> None:
    sent = time.monotonic()
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raw = await response.aread()
            if is_documented_busy(response, raw):
                res.busy += 1
            else:
                res.error(kind, f"{response.status_code} {raw[:200]!r}")
            return
        events, done = 0, False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            if "error" in payload:
                res.error(kind, f"error event {data[:200]}")
                return
            if events == 0:
                res.ttft.append(time.monotonic() - sent)
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                res.disconnects += 1
                return  # leaving the block closes the connection mid-stream
        if not done:
            res.error(kind, f"stream ended after {events} events without [DONE]")


async def plain(http: httpx.AsyncClient, res: Results, kind: str, path: str, body: dict) -> None:
    response = await http.post(path, json=body)
    if response.status_code == 200:
        if response.headers.get("x-llmservice-cache") == "hit":
            res.cache_hits += 1
        return
    if is_documented_busy(response, response.content):
        res.busy += 1
    else:
        res.error(kind, f"{response.status_code} {response.text[:200]}")


async def one_request(http: httpx.AsyncClient, res: Results, rng: random.Random,
                      models: dict[str, str]) -> None:
    roll = rng.random()
    hang_up = rng.randint(1, 4) if rng.random() < 0.15 else None
    if roll < 0.35:
        kind = "chat_stream"
        body = {"model": models["chat"], "stream": True, "max_tokens": rng.randint(8, 48),
                "temperature": 0.8, "messages": [{"role": "user", "content": prompt(rng)}]}
        await stream(http, res, kind, "/v1/chat/completions", body, hang_up)
    elif roll < 0.55:
        kind = "completion_stream"
        body = {"model": models["chat"], "stream": True, "max_tokens": rng.randint(8, 48),
                "temperature": 0.8, "prompt": prompt(rng)}
        await stream(http, res, kind, "/v1/completions", body, hang_up)
    elif roll < 0.70 and "embedding" in models:
        kind = "embeddings"
        body = {"model": models["embedding"],
                "input": [prompt(rng) for _ in range(rng.randint(1, 8))]}
        await plain(http, res, kind, "/v1/embeddings", body)
    elif roll < 0.75 and "reranker" in models:
        kind = "rerank"
        body = {"model": models["reranker"], "query": prompt(rng),
                "documents": [prompt(rng) for _ in range(rng.randint(2, 6))]}
        await plain(http, res, kind, "/v1/rerank", body)
    else:
        kind = "chat_cached"
        body = {"model": models["chat"], "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": rng.choice(CACHED_PROMPTS)}]}
        await plain(http, res, kind, "/v1/chat/completions", body)
    res.count(kind)


async def client(http: httpx.AsyncClient, res: Results, seed: int, deadline: float,
                 models: dict[str, str]) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            await one_request(http, res, rng, models)
        except (httpx.HTTPError, ValueError) as exc:
            res.error("transport", repr(exc))
            await asyncio.sleep(0.1)


async def sample_rss(pid: int, res: Results, deadline: float, every: float) -> None:
    while time.monotonic() < deadline:
        kib = rss_kib(pid)
        if kib is not None:
            res.rss.append((time.monotonic() - res.started, kib))
        await asyncio.sleep(every)


def active_sequences(metrics: str) -> int:
    total = 0
    for line in metrics.splitlines():
        if line.startswith("llmservice_sequences{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def wait_idle(http: httpx.AsyncClient, timeout: float = 60.0) -> int:
    """Active plus waiting sequences once the server settles (0 when none leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        left = active_sequences((await http.get("/metrics")).text)
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def soak(base_url: str, pid: int, seconds: float, clients: int,
               models: dict[str, str], rss_every: float = 5.0) -> tuple[Results, int]:
    """Runs the load; returns the results and the sequences left once idle."""
    res = Results()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout,
                                 trust_env=False) as http:
        sampler = asyncio.create_task(sample_rss(pid, res, deadline, rss_every))
        await asyncio.gather(*(client(http, res, i, deadline, models) for i in range(clients)))
        await sampler
        left = await wait_idle(http)
        for line in (await http.get("/metrics")).text.splitlines():
            if line.startswith("llmservice_response_cache{"):
                stat = line.split('stat="', 1)[1].split('"', 1)[0]
                res.cache[stat] = float(line.rsplit(" ", 1)[1])
        health = await http.get("/health")
        if health.status_code != 200:
            res.error("health", f"{health.status_code} {health.text[:200]}")
    return res, left


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summary(res: Results, left: int, seconds: float) -> dict:
    requests = sum(res.counts.values())
    rss_mib = [(round(t), round(k / 1024, 1)) for t, k in res.rss]
    return {
        "seconds": round(seconds),
        "requests": requests,
        "by_kind": res.counts,
        "errors": len(res.errors),
        "first_errors": res.errors[:10],
        "documented_503": res.busy,
        "client_hang_ups": res.disconnects,
        "cache_hits": res.cache_hits,
        "cache_at_end": res.cache,
        "ttft_p50_ms": round(percentile(res.ttft, 50) * 1000),
        "ttft_p95_ms": round(percentile(res.ttft, 95) * 1000),
        "sequences_left_when_idle": left,
        "rss_mib": " ".join(f"{t}s:{m}" for t, m in rss_mib),
        "rss_median_mib": round(statistics.median(k for _, k in rss_mib), 1) if rss_mib else None,
    }
