#!/usr/bin/env python3
"""Time to first token for conversations that come back after their slot was
reused: more conversations than the server has slots, each growing turn by
turn (its history, the model's answer, a new question), asked in rotation as
a chat UI with several users would. Without a prompt cache in host memory,
every returning turn recomputes its whole history.

Each target is started by this script (--launch NAME='command', {port} in the
command) and measured alone, one request at a time (streaming chat, greedy).
Reported per target: median and p90 TTFT of first turns (nothing to reuse)
and of returning turns, and the share of prompt tokens the server reported as
cached.

    python3 scripts/bench/prompt_cache.py \\
      --launch "llmservice=env LIGHT_MODEL_PATH=m.gguf LIGHT_N_CTX=8192 ENABLE_CACHE=false \\
                target/release/llmservice serve --port {port}" \\
      --launch "llama-server=llama-server -m m.gguf -c 8192 --parallel 4 --jinja --port {port}"

Only the standard library, httpx and CPython's own documentation (the texts).
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import time

import httpx
import pydoc_data.topics

QUESTIONS = [
    "Summarize this in one sentence.",
    "What is the most important rule it states?",
    "Give a short example.",
    "What mistake do people often make with it?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{base} did not become healthy")


def turn(client: httpx.Client, base: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """One streamed greedy answer: TTFT in ms, the text, the usage."""
    body = {"model": "light", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, text, usage = None, [], {}
    with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600,
                       headers={"connection": "close"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                delta = choice.get("delta", {}).get("content")
                if delta:
                    if ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
                    text.append(delta)
            usage = event.get("usage") or usage
    return ttft if ttft is not None else (time.perf_counter() - started) * 1000, "".join(text), usage


def measure(base: str, conversations: int, turns: int, chars: int, max_tokens: int) -> dict:
    names = sorted(pydoc_data.topics.topics)[:conversations * 3:3]
    histories = [[{"role": "user", "content": pydoc_data.topics.topics[n][:chars] + "\n\n" + QUESTIONS[0]}]
                 for n in names]
    first, returning, prompt, cached = [], [], 0, 0
    with httpx.Client() as client:
        for t in range(turns):
            for history in histories:
                if t > 0:
                    history.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
                ms, text, usage = turn(client, base, history, max_tokens)
                history.append({"role": "assistant", "content": text})
                (first if t == 0 else returning).append(ms)
                if t > 0:
                    prompt += usage.get("prompt_tokens", 0)
                    cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    pct = lambda v, p: sorted(v)[min(len(v) - 1, int(round((len(v) - 1) * p)))]
    return {
        "first_p50": statistics.median(first), "first_p90": pct(first, 0.9),
        "returning_p50": statistics.median(returning), "returning_p90": pct(returning, 0.9),
        "cached_share": cached / prompt if prompt else 0.0,
        "returning_prompt_tokens_mean": prompt / len(returning),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", action="append", required=True, help="NAME=command with {port}")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chars", type=int, default=2400, help="document characters per conversation")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for spec in args.launch:
        name, command = spec.split("=", 1)
        port = free_port()
        process = subprocess.Popen(shlex.split(command.format(port=port)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            rows.append((name, measure(base, args.conversations, args.turns, args.chars, args.max_tokens)))
        finally:
            process.terminate()
            process.wait(30)
    print(f"{args.conversations} conversations, {args.turns} turns each, asked in rotation, "
          f"one request at a time, {args.max_tokens} tokens per answer\n")
    print("| target | first turn TTFT p50 / p90 ms | returning turn TTFT p50 / p90 ms | "
          "returning prompt tokens (mean) | reported cached |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['first_p50']:.0f} / {r['first_p90']:.0f} | {r['returning_p50']:.0f} / "
              f"{r['returning_p90']:.0f} | {r['returning_prompt_tokens_mean']:.0f} | {r['cached_share']:.0%} |")


if __name__ == "__main__":
    main()
