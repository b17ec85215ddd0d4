#!/usr/bin/env python3
"""Speculative decoding, side by side: the same greedy chat requests against
servers that serve the same GGUF with and without guessing.

Each target gets the same prompts in turn (A p1, B p1, C p1, A p2, ...), one
request at a time, streaming with usage, so every server sees the same machine
noise. Prompts come in kinds that differ in how much of the answer is already
in the prompt:

  quote    repeat a passage word for word
  extract  answer a question by copying from a document
  edit     return a code listing with one name changed
  free     a story: nothing to copy (speculation must not cost here)
  predict  the edit prompts again with OpenAI's `prediction` set to the code as it
           stands (what an editor sends); servers without it ignore the field

Reported per (kind, target): median decode tok/s (completion tokens after the
first / time after the first), median TTFT, and, where the server reports
them, drafted and accepted guesses. Outputs are compared with the first
target's: greedy speculation that changes a token is a bug.

  python3 scripts/bench/speculative.py \\
      --launch off='LIGHT_MODEL_PATH=M LIGHT_SPECULATIVE=off target/release/llmservice serve --port 8100' \\
      --launch ngram='LIGHT_MODEL_PATH=M LIGHT_SPECULATIVE=ngram target/release/llmservice serve --port 8101' \\
      --target off=http://127.0.0.1:8100 --target ngram=http://127.0.0.1:8101 \\
      --markdown spec.md

Python 3.11 stdlib + httpx. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import datetime as _dt

import httpx

PASSAGE = (
    "The lighthouse stood on a rock at the mouth of the harbour. Every evening the keeper "
    "climbed the one hundred and twelve steps, wound the clockwork that turned the lens, "
    "and lit the lamp. Ships coming in from the north saw the light long before they saw "
    "the land, and the fishermen said that as long as the lamp burned nobody in the town "
    "would drown. In the winter of the great storm the clockwork broke, and the keeper "
    "turned the lens by hand for three nights without sleeping."
)

DOCUMENT = (
    "Order 4471 was placed on 12 March by Dana Whitfield of Harbour Street 9, Lowmoor. "
    "It contains two brass lanterns at 38 euros each, one coil of tarred rope at 17 euros, "
    "and a tin of lamp oil at 9 euros. Shipping is by courier to the customer's address. "
    "Order 4472 was placed on 13 March by Piet van Rijn of Canal Road 21, Eastwick. It "
    "contains one ship's bell at 120 euros. Shipping is by post."
)

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''

PROMPTS: list[tuple[str, str]] = [
    ("quote", f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}"),
    ("quote", f"Copy this text without changing anything:\n\n{DOCUMENT}"),
    ("extract", f"{DOCUMENT}\n\nWhat does order 4471 contain, who placed it, and where does it ship? "
                "Answer with the exact wording of the document."),
    ("extract", f"{PASSAGE}\n\nWhat did the keeper do every evening? Quote the text."),
    ("edit", f"Rename the variable `subtotal` to `net` in this code and return the whole code:\n\n{CODE}"),
    ("edit", f"Add a docstring to each function in this code and return the whole file:\n\n{CODE}"),
    ("free", "Write a short story about a robot who learns to paint."),
    ("free", "Explain in a few paragraphs why the sky is blue."),
]
PREDICTION = {"prediction": {"type": "content", "content": CODE}}
PROMPTS += [("predict", prompt) for kind, prompt in PROMPTS if kind == "edit"]


def stream_chat(http: httpx.Client, base: str, model: str, prompt: str, max_tokens: int,
                extra: dict) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    first = None
    text = []
    usage = None
    timings = None
    with http.stream("POST", base.rstrip("/") + "/v1/chat/completions", json=body,
                     timeout=300) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    text.append(piece)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or len(text)
    first = first or end
    decode_s = end - first
    out = {
        "text": "".join(text),
        "tokens": tokens,
        "ttft_ms": (first - start) * 1000,
        "decode_tps": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else 0.0,
        "drafted": None,
        "accepted": None,
    }
    details = (usage or {}).get("completion_tokens_details") or {}
    if details.get("accepted_prediction_tokens") is not None:
        out["accepted"] = details["accepted_prediction_tokens"]
        out["drafted"] = out["accepted"] + details.get("rejected_prediction_tokens", 0)
    if timings and timings.get("draft_n") is not None:  # llama-server reports its own
        out["drafted"] = timings.get("draft_n")
        out["accepted"] = timings.get("draft_n_accepted")
    return out


def wait_ready(http: httpx.Client, base: str, deadline: float) -> None:
    while time.time() < deadline:
        try:
            if http.get(base.rstrip("/") + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", required=True, help="NAME=URL")
    ap.add_argument("--launch", action="append", default=[], help="NAME=COMMAND (shell)")
    ap.add_argument("--model", default="light")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra-body", default="{}")
    ap.add_argument("--identical", default="",
                    help="comma-separated targets whose outputs must equal the first's (default: all)")
    ap.add_argument("--note", default="")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    targets = [tuple(t.split("=", 1)) for t in args.target]
    extra = json.loads(args.extra_body)
    identical = set(args.identical.split(",")) if args.identical else {n for n, _ in targets}

    procs = []
    log_dir = tempfile.mkdtemp(prefix="bench-speculative-")
    for spec in args.launch:
        name, cmd = spec.split("=", 1)
        print(f"[launch] {name}: {cmd}  (log: {log_dir}/{name}.log)", flush=True)
        log = open(f"{log_dir}/{name}.log", "ab")
        procs.append(subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        http = httpx.Client()
        for _, base in targets:
            wait_ready(http, base, time.time() + 120)
        for name, base in targets:  # warm up: load, first-touch the weights
            stream_chat(http, base, args.model, "Say hello.", 8, extra)
        results: dict[tuple[str, str], list[dict]] = {}
        mismatches = []
        for repeat in range(args.repeats):
            for i, (kind, prompt) in enumerate(PROMPTS):
                reference = None
                for name, base in targets:
                    body = {**extra, **(PREDICTION if kind == "predict" else {})}
                    r = stream_chat(http, base, args.model, prompt, args.max_tokens, body)
                    results.setdefault((kind, name), []).append(r)
                    if reference is None:
                        reference = r["text"]
                    elif r["text"] != reference and repeat == 0 and name in identical:
                        mismatches.append((i, name))
                    print(f"[{repeat}] {kind:8} {name:14} {r['tokens']:4} tok "
                          f"{r['decode_tps']:7.1f} tok/s  drafted {r['drafted']} accepted {r['accepted']}",
                          flush=True)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)

    base_name = targets[0][0]
    lines = [
        f"Speculative decoding, {_dt.date.today()}, {platform.machine()} {os.cpu_count()} cores. "
        f"{args.note}",
        "",
        f"Greedy chat, {args.max_tokens} tokens at most, one request at a time, "
        f"{args.repeats} repeats of {len(PROMPTS)} prompts, targets in turn.",
        "",
        "| kind | target | decode tok/s (median) | vs " + base_name + " | TTFT ms | tokens | guesses kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(k for k, _ in PROMPTS):
        base_tps = statistics.median(r["decode_tps"] for r in results[(kind, base_name)])
        for name, _ in targets:
            rs = results[(kind, name)]
            tps = statistics.median(r["decode_tps"] for r in rs)
            drafted = sum(r["drafted"] or 0 for r in rs)
            accepted = sum(r["accepted"] or 0 for r in rs)
            kept = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "-"
            lines.append(
                f"| {kind} | {name} | {tps:.1f} | {tps / base_tps:.2f}× | "
                f"{statistics.median(r['ttft_ms'] for r in rs):.0f} | "
                f"{statistics.median(r['tokens'] for r in rs):.0f} | {kept} |")
    lines.append("")
    if mismatches:
        lines.append("Outputs that differ from " + base_name + ": " +
                     ", ".join(f"prompt {i} on {n}" for i, n in mismatches))
    else:
        lines.append(f"Every output of {', '.join(sorted(identical - {base_name}))} is identical "
                     f"to {base_name}'s.")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        open(args.markdown, "w").write(report + "\n")
    if args.json:
        json.dump({f"{k}|{n}": v for (k, n), v in results.items()}, open(args.json, "w"), indent=1)
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
