"""Process lifecycle, each test with a server of its own: idle shutdown, SIGTERM
with a stream in flight, keep-alive unloading that really returns memory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

import conftest

MIB = 1024 * 1024


def start(workdir: Path, **extra_env: str) -> tuple[subprocess.Popen, str]:
    (workdir / "models").mkdir()
    env = os.environ.copy()
    env.update(
        LIGHT_MODEL_PATH=str(conftest._resolve_model()),
        MODELS_DIR=str(workdir / "models"),
        LIGHT_N_CTX="2048",
        LIGHT_N_THREADS="2",
        ENABLE_CACHE="false",
    )
    env.update(extra_env)
    stderr = workdir / "server.stderr.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [str(conftest._resolve_binary()), "serve", "--host", "127.0.0.1", "--port", "0"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    port = conftest._wait_until_ready(proc, workdir / ".port", stderr)
    return proc, f"http://127.0.0.1:{port}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def chat(base: str, max_tokens: int = 2) -> dict:
    resp = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "light", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
        trust_env=False,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_idle_shutdown_fires_and_traffic_resets_it(tmp_path):
    proc, base = start(tmp_path, SHUTDOWN_TIMEOUT="2")
    try:
        started = time.monotonic()
        while time.monotonic() - started < 4:
            assert httpx.get(f"{base}/health", trust_env=False).status_code == 200
            time.sleep(0.5)
        assert proc.poll() is None, "traffic must keep the server up past SHUTDOWN_TIMEOUT"
        idle_since = time.monotonic()
        assert proc.wait(timeout=10) == 0
        waited = time.monotonic() - idle_since
        assert 1.5 <= waited <= 6, f"exited after {waited:.1f} s idle"
        assert not (tmp_path / ".port").exists(), ".port is removed on exit"
    finally:
        conftest._stop(proc)


def test_sigterm_with_a_stream_in_flight_finishes_it_and_exits_cleanly(tmp_path):
    proc, base = start(tmp_path)
    try:
        body = {"model": "light", "prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60, trust_env=False) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert first != "data: [DONE]"
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and rest[-1] == "data: [DONE]", "the in-flight stream ends properly"
        assert proc.wait(timeout=20) == 0
        assert not (tmp_path / ".port").exists()
    finally:
        conftest._stop(proc)


def test_keep_alive_unloads_the_model_and_its_memory_returns(tmp_path):
    proc, base = start(tmp_path, LIGHT_KEEP_ALIVE="1")
    try:
        idle = rss_bytes(proc.pid)
        chat(base)
        loaded = rss_bytes(proc.pid)
        state = lambda: httpx.get(f"{base}/v1/models", trust_env=False).json()["data"][0]["state"]  # noqa: E731
        assert state() == "loaded"
        deadline = time.monotonic() + 10
        while state() != "available":
            assert time.monotonic() < deadline, "the model was never unloaded"
            time.sleep(0.2)
        after = rss_bytes(proc.pid)
        print(f"RSS idle {idle / MIB:.1f} MiB, loaded {loaded / MIB:.1f} MiB, unloaded {after / MIB:.1f} MiB")
        assert loaded - idle > 50 * MIB, "loading SmolLM2 maps ~94 MiB of weights plus its KV cache"
        assert loaded - after >= 0.8 * (loaded - idle), "unloading returns the model's memory"
        # It loads again on the next request.
        chat(base)
        assert state() == "loaded"
    finally:
        conftest._stop(proc)
