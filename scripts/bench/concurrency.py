#!/usr/bin/env python3
"""Side-by-side HTTP benchmark of OpenAI-compatible completion servers.

Drives two (or more) servers that serve the same GGUF model with the same
thread count -- typically llmservice and llama-cpp-python[server] -- and
measures them interleaved in one run so that both see the same machine noise:

  1. Concurrency sweep: for each level c, c closed-loop clients send streaming
     POST /v1/completions requests back to back for --duration seconds (after
     a --warmup). Reported per (c, target): requests completed in the window,
     aggregate output tok/s, median per-request decode tok/s, TTFT p50/p95,
     errors.
  2. Prefix reuse: a ~1,000-token conversation history; turn 1 sends
     history + question, turn 2 sends turn 1's prompt + its answer + a new
     question. TTFT2 / TTFT1 shows how much of the shared prefix the server
     reuses.

Only Python 3.11 stdlib + httpx. The servers are started by the caller, or by
the script itself with --launch NAME='command' (it then stops them at exit).

Example:
  python3 scripts/bench/concurrency.py \\
      --target llmservice=http://127.0.0.1:8000 \\
      --target llama-cpp-python=http://127.0.0.1:8001 \\
      --eos-token-id 2 --json bench.json --markdown bench.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    import httpx
except ImportError:  # pragma: no cover - checked in main() so --help works without it
    httpx = None  # type: ignore[assignment]


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------

_SUBJECTS = [
    "an old lighthouse keeper", "a young botanist", "a retired train driver",
    "a curious robot", "a street musician", "a marine biologist",
    "a village baker", "a lost astronaut", "a chess prodigy", "a mountain guide",
    "a night-shift nurse", "a clockmaker", "a desert archaeologist",
    "a beekeeper", "a radio operator", "a glassblower", "a cartographer",
    "a ferry captain", "a librarian", "a volcano researcher",
]
_OBJECTS = [
    "a sealed letter", "a broken compass", "a map with no names",
    "a glowing seed", "a silver key", "a forgotten diary", "a music box",
    "a jar of sand", "a painted stone", "a torn photograph", "a tiny door",
    "a paper boat", "a brass telescope", "a locked chest", "a feather pen",
    "a cracked mirror", "an unfinished quilt", "a clock without hands",
    "a bottle of ink", "a wooden bird",
]
_PLACES = [
    "an abandoned railway station", "a flooded library", "a busy night market",
    "a quiet orchard", "a frozen harbour", "a rooftop garden",
    "a mountain monastery", "a desert oasis", "a foggy pier", "a salt mine",
    "an island observatory", "a crowded ferry", "a sunken ship",
    "a snowy forest cabin", "a closed circus", "an empty museum",
    "a windmill", "a canyon bridge", "a rainy bus stop", "a coral reef",
]
_TEMPLATES = [
    "Write a short story about {s} who finds {o} in {p}. Describe the scene in "
    "vivid detail and explain what happens next:",
    "Tell me a tale in which {s} discovers {o} hidden somewhere in {p}, and "
    "describe how it changes the rest of their day:",
    "Imagine {s} exploring {p} at dawn and stumbling upon {o}. Narrate the "
    "moment carefully and continue the story:",
    "Compose the opening of a novel where {s} receives {o} while visiting {p}. "
    "Set the mood and introduce the mystery:",
]


def sweep_prompt(level: int, client: int, request: int) -> str:
    """A ~30-token prompt, different for every (client, request) of a level.

    The same (level, client, request) gives the same prompt on every target.
    """
    n = len(_SUBJECTS) * len(_OBJECTS) * len(_PLACES)
    # A bijective-ish mix so neighbouring clients/requests get unrelated prompts.
    k = (client * 7919 + request * 104729 + level * 1299709) % n
    s = _SUBJECTS[k % len(_SUBJECTS)]
    o = _OBJECTS[(k // len(_SUBJECTS)) % len(_OBJECTS)]
    p = _PLACES[(k // (len(_SUBJECTS) * len(_OBJECTS))) % len(_PLACES)]
    t = _TEMPLATES[(client + request) % len(_TEMPLATES)]
    return t.format(s=s, o=o, p=p)


_PARAGRAPH = (
    "The {w} project keeps its notes in a shared notebook. Every morning the "
    "team reviews the measurements from the night before, compares them with "
    "the forecast, and writes down anything that looks unusual. When a sensor "
    "drifts, someone walks out to the field station, cleans the housing, "
    "checks the cables and records the serial number, so that later readers "
    "can tell which values to trust and which to discard."
)
_HISTORY_QUESTIONS = [
    "What does the {w} team do first each morning?",
    "How do they handle a drifting sensor in the {w} project?",
    "Why is the serial number written down?",
    "Where are the {w} notes kept?",
    "Who walks out to the field station?",
    "What do they compare the measurements with?",
]
_TURN1_QUESTION = "Summarise the {w} project's routine in one sentence."
_TURN2_QUESTION = "Now list two risks to the {w} project's data quality."
_SEED_WORDS = [
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor",
    "indigo", "juniper", "kestrel", "lumen", "marble", "nimbus", "onyx",
    "pollen", "quartz", "raven", "sable", "tundra", "umber", "velvet",
    "willow", "xenon", "yarrow", "zephyr",
]


def seed_word(run_seed: int, repeat: int) -> str:
    rng = random.Random(run_seed * 1000 + repeat)
    return f"{rng.choice(_SEED_WORDS)}{rng.randrange(1000, 9999)}"


def build_history(word: str, approx_tokens: int) -> str:
    """Deterministic User/Assistant history of ~approx_tokens tokens.

    Tokens are estimated as characters / 4 (English text, BPE-ish tokenizers).
    The seed word opens the text, so histories of different repeats share no
    prefix beyond a token or two.
    """
    parts = [f"Conversation log {word}.\n"]
    chars = len(parts[0])
    i = 0
    while chars < approx_tokens * 4:
        q = _HISTORY_QUESTIONS[i % len(_HISTORY_QUESTIONS)].format(w=word)
        a = _PARAGRAPH.format(w=word)
        turn = f"User: {q}\nAssistant: {a}\n"
        parts.append(turn)
        chars += len(turn)
        i += 1
    return "".join(parts).rstrip("\n")


# --------------------------------------------------------------------------
# One streaming request
# --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base_url: str
    model: str | None = None

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/completions"


@dataclass
class ReqResult:
    client: int
    seq: int
    start: float  # seconds, relative to the run's t0
    end: float
    ok: bool
    first: float | None = None  # time of the first non-empty text chunk
    last: float | None = None  # time of the last non-empty text chunk
    chunks: int = 0  # chunks with non-empty choices[0].text
    usage_tokens: int | None = None  # usage.completion_tokens, if sent
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    finish_reason: str | None = None
    text: str = ""

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000.0

    @property
    def decode_tps(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        dt = self.last - self.first
        return (self.tokens - 1) / dt if dt > 0 else None

    def record(self, keep_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not keep_text:
            d.pop("text")
        d["tokens"] = self.tokens
        d["ttft_ms"] = self.ttft_ms
        d["decode_tps"] = self.decode_tps
        return d


async def stream_completion(
    http: httpx.AsyncClient,
    target: Target,
    body: dict[str, Any],
    t0: float,
    timeout: float,
    client: int = 0,
    seq: int = 0,
    keep_text: bool = False,
) -> ReqResult:
    """Send one streaming completion; never raises (errors go in the result)."""
    start = time.perf_counter()
    res = ReqResult(client=client, seq=seq, start=start - t0, end=start - t0, ok=False)
    text_parts: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", target.completions_url, json=body) as resp:
                res.status = resp.status_code
                if resp.status_code != 200:
                    raw = (await resp.aread())[:500].decode("utf-8", "replace")
                    res.error = f"HTTP {resp.status_code}: {_error_message(raw)}"
                else:
                    done = False
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue  # blank separators, "event:", ": ping" comments
                        payload = line[5:].strip()
                        if not payload:
                            continue
                        if payload == "[DONE]":
                            done = True
                            break
                        try:
                            obj = json.loads(payload)
                        except json.JSONDecodeError:
                            res.error = f"bad SSE payload: {payload[:200]}"
                            break
                        if not isinstance(obj, dict):
                            continue
                        if obj.get("error"):
                            res.error = f"error event: {_error_message(json.dumps(obj))}"
                            break
                        now = time.perf_counter() - t0
                        choices = obj.get("choices") or []
                        if choices and isinstance(choices[0], dict):
                            piece = choices[0].get("text") or ""
                            if piece:
                                res.chunks += 1
                                if res.first is None:
                                    res.first = now
                                res.last = now
                                if keep_text:
                                    text_parts.append(piece)
                            if choices[0].get("finish_reason"):
                                res.finish_reason = choices[0]["finish_reason"]
                        usage = obj.get("usage")
                        if isinstance(usage, dict):
                            if isinstance(usage.get("completion_tokens"), int):
                                res.usage_tokens = usage["completion_tokens"]
                            if isinstance(usage.get("prompt_tokens"), int):
                                res.prompt_tokens = usage["prompt_tokens"]
                    if res.error is None:
                        if not done and res.finish_reason is None:
                            res.error = "stream ended without [DONE] or finish_reason"
                        else:
                            res.ok = True
    except TimeoutError:
        res.error = f"timeout after {timeout:g} s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # never let one request take the run down
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.end = time.perf_counter() - t0
    res.text = "".join(text_parts)
    return res


def _error_message(raw: str) -> str:
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    except (json.JSONDecodeError, AttributeError):
        return raw.strip()[:300]


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------
# Workload 1: concurrency sweep
# --------------------------------------------------------------------------


def sampling_body(args: argparse.Namespace, model: str | None, prompt: str,
                  max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
    }
    if model:
        body["model"] = model
    if args.eos_token_id:
        body["logit_bias"] = {str(t): -100 for t in args.eos_token_id}
    if args.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if args.extra_body:
        body.update(args.extra_body)
    return body


async def run_level(args: argparse.Namespace, target: Target, http: httpx.AsyncClient,
                    level: int) -> dict[str, Any]:
    """c closed-loop clients; returns the summary and raw per-request records."""
    t0 = time.perf_counter()
    w0 = args.warmup
    w1 = args.warmup + args.duration
    results: list[ReqResult] = []

    async def client_loop(cid: int) -> None:
        seq = 0
        # Jittered lengths keep closed-loop clients from finishing (and so
        # arriving) in lockstep; the same seed gives every target the same lengths.
        lengths = random.Random(f"{level}-{cid}")
        while time.perf_counter() - t0 < w1:
            max_tokens = args.max_tokens
            if args.max_tokens_jitter > 0:
                spread = int(args.max_tokens * args.max_tokens_jitter)
                max_tokens = max(1, args.max_tokens + lengths.randint(-spread, spread))
            body = sampling_body(args, target.model, sweep_prompt(level, cid, seq),
                                 max_tokens)
            r = await stream_completion(http, target, body, t0, args.request_timeout,
                                        client=cid, seq=seq)
            results.append(r)
            seq += 1
            if not r.ok:
                # Back off so a dead server does not turn this into a busy loop.
                await asyncio.sleep(args.error_backoff)

    # After w1 no new requests start; in-flight ones drain (bounded by the
    # request timeout) so the server is idle before the next target runs.
    await asyncio.gather(*(client_loop(i) for i in range(level)))
    wall_end = time.perf_counter() - t0

    window = w1 - w0
    completed = [r for r in results if r.ok and w0 <= r.end <= w1]
    started_in = [r for r in results if w0 <= r.start < w1]
    ttfts = [r.ttft_ms for r in started_in if r.ttft_ms is not None]
    decode = [r.decode_tps for r in completed if r.decode_tps is not None]
    errors = [r for r in results if not r.ok and r.end >= w0]
    warm_errors = [r for r in results if not r.ok and r.end < w0]
    tokens = sum(r.tokens for r in completed)
    short = sum(1 for r in completed
                if args.max_tokens_jitter == 0 and r.tokens < args.max_tokens)
    error_kinds: dict[str, int] = {}
    for r in errors + warm_errors:
        key = (r.error or "?")[:120]
        error_kinds[key] = error_kinds.get(key, 0) + 1

    return {
        "target": target.name,
        "concurrency": level,
        "window_s": window,
        "wall_s": wall_end,
        "requests": len(completed),
        "output_tokens": tokens,
        "agg_tok_s": tokens / window if window > 0 else None,
        "decode_tok_s_p50": median(decode),
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p95": percentile(ttfts, 95),
        "ttft_samples": len(ttfts),
        "errors": len(errors),
        "warmup_errors": len(warm_errors),
        "error_kinds": error_kinds,
        "short_requests": short,
        "late_requests": sum(1 for r in results if r.ok and r.end > w1),
        "raw": [r.record() for r in results],
    }


# --------------------------------------------------------------------------
# Workload 2: prefix reuse
# --------------------------------------------------------------------------


async def run_prefix_repeat(args: argparse.Namespace, target: Target,
                            http: httpx.AsyncClient, repeat: int) -> dict[str, Any]:
    word = seed_word(args.seed, repeat)
    history = build_history(word, args.history_tokens)
    prompt1 = f"{history}\nUser: {_TURN1_QUESTION.format(w=word)}\nAssistant:"
    t0 = time.perf_counter()
    body1 = sampling_body(args, target.model, prompt1, args.turn_max_tokens)
    r1 = await stream_completion(http, target, body1, t0, args.request_timeout,
                                 seq=0, keep_text=True)
    out: dict[str, Any] = {
        "target": target.name, "repeat": repeat, "seed_word": word,
        "prompt1_chars": len(prompt1),
        "turn1": r1.record(keep_text=True),
        "turn2": None,
    }
    if not r1.ok:
        return out
    prompt2 = (f"{prompt1}{r1.text}\nUser: {_TURN2_QUESTION.format(w=word)}"
               "\nAssistant:")
    body2 = sampling_body(args, target.model, prompt2, args.turn_max_tokens)
    r2 = await stream_completion(http, target, body2, t0, args.request_timeout,
                                 seq=1, keep_text=True)
    out["prompt2_chars"] = len(prompt2)
    out["turn2"] = r2.record(keep_text=True)
    return out


def summarize_prefix(target: str, repeats: list[dict[str, Any]]) -> dict[str, Any]:
    t1 = [r["turn1"]["ttft_ms"] for r in repeats
          if r["turn1"]["ok"] and r["turn1"]["ttft_ms"] is not None]
    t2 = [r["turn2"]["ttft_ms"] for r in repeats
          if r["turn2"] and r["turn2"]["ok"] and r["turn2"]["ttft_ms"] is not None]
    errors = sum(1 for r in repeats if not r["turn1"]["ok"])
    errors += sum(1 for r in repeats if r["turn2"] is not None and not r["turn2"]["ok"])
    p_tokens = [r["turn1"]["prompt_tokens"] for r in repeats
                if r["turn1"].get("prompt_tokens")]
    m1, m2 = median(t1), median(t2)
    return {
        "target": target,
        "repeats": len(repeats),
        "ttft1_ms_median": m1,
        "ttft2_ms_median": m2,
        "ratio": (m2 / m1) if (m1 and m2 is not None) else None,
        "turn1_prompt_tokens": median(p_tokens) if p_tokens else None,
        "errors": errors,
    }


# --------------------------------------------------------------------------
# Targets, launching, machine info
# --------------------------------------------------------------------------


def parse_target(spec: str) -> Target:
    if "=" not in spec:
        raise argparse.ArgumentTypeError(
            f"--target wants NAME=BASE_URL[,MODEL], got {spec!r}")
    name, rest = spec.split("=", 1)
    url, _, model = rest.partition(",")
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"--target wants NAME=http://HOST:PORT[,MODEL], got {spec!r}")
    return Target(name=name.strip(), base_url=url.strip(), model=model.strip() or None)


def parse_launch(spec: str) -> tuple[str, str]:
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"--launch wants NAME=COMMAND, got {spec!r}")
    name, cmd = spec.split("=", 1)
    return name.strip(), cmd


def parse_int_list(spec: str) -> list[int]:
    try:
        xs = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {spec!r}")
    if not xs or any(x < 1 for x in xs):
        raise argparse.ArgumentTypeError(f"want positive integers, got {spec!r}")
    return xs


async def probe_model(http: httpx.AsyncClient, target: Target) -> tuple[bool, str | None, str]:
    """GET /v1/models: (reachable, first chat model id or None, message)."""
    url = target.base_url.rstrip("/") + "/v1/models"
    try:
        resp = await http.get(url, timeout=10.0)
    except httpx.HTTPError as e:
        return False, None, f"{type(e).__name__}: {e}"
    if resp.status_code != 200:
        return False, None, f"HTTP {resp.status_code}"
    try:
        data = resp.json().get("data") or []
    except (json.JSONDecodeError, AttributeError):
        return True, None, "unparseable /v1/models"
    ids = [d.get("id") for d in data if isinstance(d, dict) and d.get("id")]
    chat = [d.get("id") for d in data if isinstance(d, dict) and d.get("kind") == "chat"]
    pick = (chat or ids or [None])[0]
    return True, pick, f"models: {', '.join(map(str, ids)) or '(none)'}"


class Launched:
    """Servers this script started (--launch); stopped by process group at exit."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: str) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{name}.log")
        log = open(log_path, "ab")
        print(f"[launch] {name}: {cmd}  (log: {log_path})", flush=True)
        proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own session's group
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
            print(f"[launch] stopped {name} (pid {proc.pid})", flush=True)
        self.procs.clear()


async def wait_ready(http: httpx.AsyncClient, target: Target, launched: Launched,
                     timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok, _, _ = await probe_model(http, target)
        if ok:
            return True
        if not launched.alive(target.name):
            print(f"[launch] {target.name} exited before becoming ready", flush=True)
            return False
        await asyncio.sleep(0.5)
    return False


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "cpu_model": platform.processor() or None,
        "mem_gib": None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                    break
    except OSError:
        pass
    return info


def machine_line(m: dict[str, Any]) -> str:
    parts = [f"{m['cpu_count']} cores"]
    if m.get("cpu_model"):
        parts.append(str(m["cpu_model"]))
    if m.get("mem_gib"):
        parts.append(f"{m['mem_gib']} GiB")
    parts.append(m["platform"])
    parts.append(f"Python {m['python']}, httpx {m['httpx']}")
    return ", ".join(parts)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def sweep_row(s: dict[str, Any]) -> list[str]:
    return [str(s["concurrency"]), s["target"], fmt(s["agg_tok_s"]),
            fmt(s["decode_tok_s_p50"]), fmt(s["ttft_ms_p50"], 0),
            fmt(s["ttft_ms_p95"], 0), str(s["requests"]), str(s["errors"])]


SWEEP_HEADER = ["c", "target", "agg tok/s", "req decode tok/s p50", "TTFT p50 ms",
                "TTFT p95 ms", "requests", "errors"]
PREFIX_HEADER = ["target", "TTFT1 median ms", "TTFT2 median ms", "TTFT2/TTFT1",
                 "turn-1 prompt tokens", "repeats", "errors"]


def prefix_row(p: dict[str, Any]) -> list[str]:
    pt = p["turn1_prompt_tokens"]
    return [p["target"], fmt(p["ttft1_ms_median"], 0), fmt(p["ttft2_ms_median"], 0),
            fmt(p["ratio"], 3), "-" if pt is None else f"{pt:.0f}",
            str(p["repeats"]), str(p["errors"])]


def write_markdown(path: str, report: dict[str, Any]) -> None:
    cfg = report["config"]
    lines = [
        f"<!-- generated by scripts/bench/concurrency.py on {report['date']} -->",
        f"- Date: {report['date']}",
        f"- Machine: {machine_line(report['machine'])}",
        "- Targets: " + "; ".join(
            f"`{t['name']}` {t['base_url']} (model `{t['model'] or '-'}`)"
            for t in report["targets"]),
    ]
    for note in cfg.get("notes") or []:
        lines.append(f"- {note}")
    lines.append("")
    if report["sweep"]:
        eos = cfg["eos_token_id"]
        lines += [
            f"Concurrency sweep: closed-loop clients, streaming `/v1/completions`, "
            f"max_tokens {cfg['max_tokens']}, temperature {cfg['temperature']}, "
            + (f"EOS {','.join(map(str, eos))} biased -100, " if eos else "no EOS bias, ")
            + f"{cfg['warmup']:g} s warm-up + {cfg['duration']:g} s window per "
            "(level, target), targets interleaved. agg tok/s = output tokens of "
            "requests completed inside the window / window length; TTFT over requests "
            "started inside the window.",
            "",
            "| concurrency | target | agg tok/s | TTFT p50 ms | TTFT p95 ms | requests | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in report["sweep"]:
            lines.append(
                f"| {s['concurrency']} | {s['target']} | {fmt(s['agg_tok_s'])} | "
                f"{fmt(s['ttft_ms_p50'], 0)} | {fmt(s['ttft_ms_p95'], 0)} | "
                f"{s['requests']} | {s['errors']} |")
        lines.append("")
    if report["prefix_summary"]:
        lines += [
            f"Prefix reuse: ~{cfg['history_tokens']}-token history; turn 1 = history + "
            f"question, turn 2 = turn-1 prompt + its answer (max_tokens "
            f"{cfg['turn_max_tokens']}) + a new question; streaming; median of "
            f"{cfg['turn_repeats']} repeats with different histories. "
            "TTFT2/TTFT1 < 1 means the shared prefix was reused (prompt tokens: from "
            "`usage`, only with --stream-usage).",
            "",
            "| target | TTFT1 median ms | TTFT2 median ms | TTFT2/TTFT1 | turn-1 prompt tokens | repeats | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in report["prefix_summary"]:
            lines.append("| " + " | ".join(prefix_row(p)) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        write_markdown(args.markdown, report)
        print(f"wrote {args.markdown}")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


async def run(args: argparse.Namespace, report: dict[str, Any], launched: Launched) -> None:
    targets: list[Target] = args.target
    levels = args.concurrency
    limits = httpx.Limits(max_connections=max(levels) + 8,
                          max_keepalive_connections=max(levels) + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=min(10.0, args.request_timeout))
    clients = {t.name: httpx.AsyncClient(limits=limits, timeout=timeout,
                                         trust_env=args.trust_env) for t in targets}
    try:
        # Launch (optional), then probe every target and fill in its model.
        launch = dict(args.launch or [])
        for t in targets:
            if t.name in launch:
                launched.start(t.name, launch[t.name])
                if not await wait_ready(clients[t.name], t, launched, args.launch_timeout):
                    print(f"[launch] {t.name} not ready after {args.launch_timeout:g} s",
                          flush=True)
        live: list[Target] = []
        for t in targets:
            ok, pick, msg = await probe_model(clients[t.name], t)
            if t.model is None:
                t.model = args.model or pick
            print(f"[probe] {t.name} {t.base_url}: {'up' if ok else 'DOWN'} ({msg}); "
                  f"model field: {t.model or '(none)'}", flush=True)
            report["probe"][t.name] = {"ok": ok, "message": msg}
            if ok or args.no_probe:
                live.append(t)
        report["targets"] = [asdict(t) for t in targets]
        if not live:
            print("no target is reachable; nothing to measure", flush=True)
            return

        if not args.skip_sweep:
            print(f"\n== concurrency sweep: levels {levels}, {args.warmup:g} s warm-up + "
                  f"{args.duration:g} s window, max_tokens {args.max_tokens} ==", flush=True)
            for level in levels:
                for t in live:
                    s = await run_level(args, t, clients[t.name], level)
                    report["sweep"].append(s)
                    print(f"  c={level:<3} {t.name:<20} agg {fmt(s['agg_tok_s']):>7} tok/s  "
                          f"TTFT p50 {fmt(s['ttft_ms_p50'], 0):>6} ms  "
                          f"p95 {fmt(s['ttft_ms_p95'], 0):>6} ms  req {s['requests']:>4}  "
                          f"err {s['errors']}" + (f"  short {s['short_requests']}"
                                                  if s["short_requests"] else ""),
                          flush=True)
                    for kind, n in s["error_kinds"].items():
                        print(f"        {n} x {kind}", flush=True)
                    await asyncio.sleep(args.cooldown)

        if not args.skip_prefix and args.turn_repeats > 0:
            print(f"\n== prefix reuse: ~{args.history_tokens}-token history, "
                  f"{args.turn_repeats} repeats ==", flush=True)
            per_target: dict[str, list[dict[str, Any]]] = {t.name: [] for t in live}
            for rep in range(args.turn_repeats):
                for t in live:
                    r = await run_prefix_repeat(args, t, clients[t.name], rep)
                    per_target[t.name].append(r)
                    report["prefix"].append(r)
                    t2 = r["turn2"]
                    print(f"  repeat {rep} {t.name:<20} TTFT1 "
                          f"{fmt(r['turn1']['ttft_ms'], 0):>6} ms  TTFT2 "
                          f"{fmt(t2['ttft_ms'] if t2 else None, 0):>6} ms"
                          + ("" if r["turn1"]["ok"] else f"  turn1 error: {r['turn1']['error']}")
                          + ("" if (t2 is None or t2["ok"]) else f"  turn2 error: {t2['error']}"),
                          flush=True)
                    await asyncio.sleep(args.cooldown)
            report["prefix_summary"] = [summarize_prefix(n, rs) for n, rs in per_target.items()]
    finally:
        for c in clients.values():
            await c.aclose()


def print_summary(report: dict[str, Any]) -> None:
    print(f"\nMachine: {machine_line(report['machine'])}")
    print(f"Date: {report['date']}")
    if report["sweep"]:
        print("\nConcurrency sweep")
        print_table([sweep_row(s) for s in report["sweep"]], SWEEP_HEADER)
    if report["prefix_summary"]:
        print("\nPrefix reuse")
        print_table([prefix_row(p) for p in report["prefix_summary"]], PREFIX_HEADER)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="concurrency.py",
        description=__doc__.split("\n\n")[0] + " Runs a concurrency sweep and a "
        "prefix-reuse test against each --target, interleaved, and prints tables "
        "(optionally JSON and markdown).",
        epilog="""example (servers already running):
  python3 scripts/bench/concurrency.py \\
      --target llmservice=http://127.0.0.1:8000 \\
      --target llama-cpp-python=http://127.0.0.1:8001 \\
      --eos-token-id 1 --json bench.json --markdown bench.md

example (the script starts and stops the servers):
  python3 scripts/bench/concurrency.py \\
      --target llmservice=http://127.0.0.1:8000 \\
      --launch 'llmservice=LIGHT_MODEL_PATH=M.gguf LIGHT_N_THREADS=2 \\
                target/release/llmservice serve --port 8000' \\
      --target llama-cpp-python=http://127.0.0.1:8001 \\
      --launch 'llama-cpp-python=python -m llama_cpp.server --model M.gguf \\
                --n_threads 2 --interrupt_requests False --port 8001'

Tokens per request = number of SSE chunks with non-empty choices[0].text, or
usage.completion_tokens when a usage object arrives (see --stream-usage).
Pass --eos-token-id so every request generates exactly --max-tokens tokens on
every server (the "short" count in the output flags requests that did not).""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("targets")
    g.add_argument("--target", type=parse_target, action="append", required=True,
                   metavar="NAME=BASE_URL[,MODEL]",
                   help="server to measure (repeatable), e.g. "
                        "llmservice=http://127.0.0.1:8000 ; MODEL overrides --model "
                        "for this target")
    g.add_argument("--model", metavar="NAME",
                   help="'model' field to send (default: first model the target's "
                        "/v1/models lists, preferring kind=chat)")
    g.add_argument("--launch", type=parse_launch, action="append", metavar="NAME=COMMAND",
                   help="start this shell command for target NAME before measuring, "
                        "wait until its /v1/models answers, stop it (its process "
                        "group) at exit; repeatable")
    g.add_argument("--launch-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for a launched server to answer (default 300)")
    g.add_argument("--launch-log-dir", metavar="DIR",
                   help="where launched servers' output goes (default: a temp dir)")
    g.add_argument("--no-probe", action="store_true",
                   help="measure targets even if GET /v1/models fails")
    g.add_argument("--trust-env", action="store_true",
                   help="let httpx use proxy settings from the environment (off by default)")

    g = p.add_argument_group("concurrency sweep (workload 1)")
    g.add_argument("--concurrency", type=parse_int_list, default=[1, 2, 4, 8, 16],
                   metavar="LIST", help="comma-separated client counts (default 1,2,4,8,16)")
    g.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="measurement window per (level, target) in seconds (default 20)")
    g.add_argument("--warmup", type=float, default=3.0, metavar="S",
                   help="seconds the clients run before the window opens (default 3)")
    g.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="max_tokens per sweep request (default 64)")
    g.add_argument("--max-tokens-jitter", type=float, default=0.0, metavar="F",
                   help="vary max_tokens uniformly by +-F*N per request (default 0: "
                        "fixed lengths, so closed-loop clients arrive in lockstep)")
    g.add_argument("--skip-sweep", action="store_true", help="skip workload 1")

    g = p.add_argument_group("prefix reuse (workload 2)")
    g.add_argument("--history-tokens", type=int, default=1000, metavar="N",
                   help="approximate history length in tokens (chars/4; default 1000)")
    g.add_argument("--turn-max-tokens", type=int, default=32, metavar="N",
                   help="max_tokens of each turn (default 32)")
    g.add_argument("--turn-repeats", type=int, default=3, metavar="N",
                   help="conversations per target, each with a different history "
                        "(default 3)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for the history seed words (default: time-based, so a "
                        "rerun does not hit caches of the previous run; recorded in the JSON)")
    g.add_argument("--skip-prefix", action="store_true", help="skip workload 2")

    g = p.add_argument_group("requests")
    g.add_argument("--eos-token-id", type=int, action="append", metavar="ID",
                   help="token id to bias by -100 (logit_bias) so generation never "
                        "stops early; repeatable (default: none)")
    g.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature of every request (default 0.7)")
    g.add_argument("--extra-body", type=json.loads, default=None, metavar="JSON",
                   help="JSON object merged into every request body, e.g. to pin the "
                        "same sampler on both servers: "
                        "'{\"top_p\":0.95,\"top_k\":40,\"min_p\":0.05,\"repeat_penalty\":1.1}'")
    g.add_argument("--stream-usage", action="store_true",
                   help="also send stream_options.include_usage=true (exact token "
                        "counts where the server supports it)")
    g.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="overall timeout of one request in seconds (default 120)")
    g.add_argument("--error-backoff", type=float, default=0.5, metavar="S",
                   help="pause after a failed request before the client's next one "
                        "(default 0.5)")
    g.add_argument("--cooldown", type=float, default=2.0, metavar="S",
                   help="pause between runs so the previous server's threads settle "
                        "(default 2)")

    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write every raw number here")
    g.add_argument("--markdown", metavar="PATH",
                   help="write markdown tables ready for BENCHMARKS.md here")
    g.add_argument("--note", action="append", metavar="TEXT",
                   help="extra bullet for the markdown header, e.g. 'Model: X, 2 threads "
                        "on both sides' (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if httpx is None:
        sys.exit("concurrency.py needs httpx: pip install httpx")
    names = [t.name for t in args.target]
    if len(set(names)) != len(names):
        sys.exit("target names must be unique")
    for name, _ in args.launch or []:
        if name not in names:
            sys.exit(f"--launch {name}=...: no --target named {name}")
    if args.seed is None:
        args.seed = int(time.time()) % 1_000_000
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        sys.exit("--extra-body must be a JSON object")
    if args.duration <= 0 or args.warmup < 0 or args.max_tokens < 1:
        sys.exit("--duration must be > 0, --warmup >= 0, --max-tokens >= 1")

    cfg = {k: v for k, v in vars(args).items() if k not in ("target", "launch")}
    cfg["notes"] = cfg.pop("note") or []
    cfg["launch"] = [f"{n}={c}" for n, c in (args.launch or [])]
    report: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg,
        "targets": [asdict(t) for t in args.target],
        "probe": {},
        "sweep": [],
        "prefix": [],
        "prefix_summary": [],
    }
    print(f"Machine: {machine_line(report['machine'])}", flush=True)
    launched = Launched(args.launch_log_dir or tempfile.mkdtemp(prefix="llm-bench-"))
    code = 0
    try:
        asyncio.run(run(args, report, launched))
    except KeyboardInterrupt:
        print("\ninterrupted; reporting what was measured", flush=True)
        code = 130
    finally:
        launched.stop_all()
    print_summary(report)
    write_outputs(args, report)
    return code


if __name__ == "__main__":
    sys.exit(main())
