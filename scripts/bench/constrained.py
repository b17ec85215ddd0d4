"""Per-token cost of constrained sampling: decode tokens/s of one stream with
no constraint, a JSON schema (llguidance; with the server's bounded whitespace,
and forced compact through the schema's own `x-guidance` options) and a GBNF
grammar (llama.cpp's sampler), same model, prompt and length, modes interleaved
round by round.

Usage: python scripts/bench/constrained.py http://127.0.0.1:8000 [rounds]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import httpx

TOKENS = 200
SCHEMA = {  # long enough that every run is cut by max_tokens, never finished early
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 100, "maxItems": 100,
                             "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "count": {"type": "integer"}},
                                       "required": ["name", "count"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
# The same schema with no free whitespace: `{"a": 1, "b": 2}` and nothing else.
COMPACT = {**SCHEMA, "x-guidance": {"whitespace_pattern": None, "item_separator": ", ", "key_separator": ": "}}
GRAMMAR = 'root ::= line+\nline ::= [a-z]+ (" " [a-z]+)* ".\\n"\n'
MODES = {
    "none": {"ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "inventory", "schema": SCHEMA}}},
    "json_compact": {"response_format": {"type": "json_schema", "json_schema": {"name": "inventory", "schema": COMPACT}}},
    "gbnf": {"grammar": GRAMMAR, "ignore_eos": True},
}


def run(client: httpx.Client, base: str, extra: dict) -> float:
    body = {"model": "light", "stream": True, "temperature": 0.7, "seed": 1, "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "List the items in a kitchen."}], **extra}
    first = last = None
    pieces = 0
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    # Text pieces are tokens here (one event per token); the first is the prefill.
    return (pieces - 1) / (last - first)


def main() -> None:
    base = sys.argv[1].rstrip("/")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    results: dict[str, list[float]] = {m: [] for m in MODES}
    with httpx.Client(timeout=300) as client:
        for mode, extra in MODES.items():
            run(client, base, extra)  # warm-up (builds the vocabulary trie once)
        for _ in range(rounds):
            for mode, extra in MODES.items():
                results[mode].append(run(client, base, extra))
    base_rate = statistics.median(results["none"])
    for mode, rates in results.items():
        median = statistics.median(rates)
        print(f"{mode:12s} median {median:6.1f} tok/s  ratio {median / base_rate:.3f}  runs {[round(r, 1) for r in rates]}")


if __name__ == "__main__":
    main()
