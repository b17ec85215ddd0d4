"""Fixtures for the llmservice OpenAI-compatibility suite.

The server is started once per session, lazily: only when a test asks for
`server`, `base_url`, `http` or `client`, so `pytest --collect-only` never
starts it.

Environment:
  LLMSERVICE_BIN          server binary (default <repo>/target/release/llmservice)
  LLMSERVICE_TEST_MODEL   GGUF model (default <repo>/../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf)
  LLMSERVICE_VIA_UPSTREAM 1: the tests talk to a second llmservice whose light and
                          embedding tiers are `{TIER}_BACKEND=openai` upstreams served by
                          the first (the proxy must pass every answer through unchanged)
  The embedding and reranker tiers use the MiniLM encoder and the synthetic reranker
  found beside that model, when they are there.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

COMPAT_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPAT_DIR.parent.parent
MODEL_FILE_NAME = "SmolLM2-135M-Instruct-Q4_1.gguf"
EMBEDDING_FILE_NAME = "all-MiniLM-L6-v2-f16.gguf"
RERANKER_FILE_NAME = "SYNTHETIC-minilm-l6-reranker-f16.gguf"
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "llmservice"
DEFAULT_MODEL = REPO_ROOT.parent / "shared" / "models" / MODEL_FILE_NAME

STARTUP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.1
SHUTDOWN_GRACE_S = 15.0
REQUEST_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 20_000

# Where the running session's server logs live; read by pytest_terminal_summary.
_SERVER_LOGS: dict[str, Path] = {}


@dataclasses.dataclass(frozen=True)
class Server:
    port: int
    base_url: str  # server root, e.g. http://127.0.0.1:41234 (no /v1)
    workdir: Path
    stderr_path: Path
    proc: subprocess.Popen


def _tail(path: Path, max_chars: int = LOG_TAIL_CHARS) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    text = data.decode("utf-8", errors="replace")
    if len(text) > max_chars:
        text = "...[truncated]...\n" + text[-max_chars:]
    return text or "<empty>"


def _resolve_model() -> Path:
    configured = os.environ.get("LLMSERVICE_TEST_MODEL")
    model = Path(configured) if configured else DEFAULT_MODEL
    model = model.resolve()
    if not model.is_file():
        source = "LLMSERVICE_TEST_MODEL" if configured else "the default location"
        pytest.fail(
            f"test model not found at {model} (from {source}). "
            f"Put {MODEL_FILE_NAME} there or point LLMSERVICE_TEST_MODEL at it.",
            pytrace=False,
        )
    return model


def _resolve_binary() -> Path:
    configured = os.environ.get("LLMSERVICE_BIN")
    binary = (Path(configured) if configured else DEFAULT_BIN).resolve()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"llmservice binary not found or not executable at {binary}. "
            "Build it with `cargo build --release` or set LLMSERVICE_BIN.",
            pytrace=False,
        )
    return binary


def _read_port(port_file: Path) -> int | None:
    try:
        text = port_file.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None  # not written yet (or only partly)
    port = int(text)
    return port if 0 < port < 65536 else None


def _wait_until_ready(proc: subprocess.Popen, port_file: Path, stderr_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_problem = f"{port_file.name} not written yet"
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            pytest.fail(
                f"llmservice exited with status {rc} during startup "
                f"(see the 'llmservice stderr' section at the end; full log: {stderr_path})",
                pytrace=False,
            )
        # Re-read every time: never latch onto a partly written file.
        port = _read_port(port_file)
        if port is not None:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False)
                body = resp.json() if resp.status_code == 200 else None
                if isinstance(body, dict) and body.get("status") == "healthy":
                    return port
                last_problem = f"GET /health -> {resp.status_code} {resp.text[:200]!r}"
            except (httpx.HTTPError, ValueError) as exc:
                last_problem = f"GET /health on port {port}: {exc!r}"
        time.sleep(POLL_INTERVAL_S)
    pytest.fail(
        f"llmservice not healthy within {STARTUP_TIMEOUT_S:.0f}s (last: {last_problem}); "
        f"see the 'llmservice stderr' section at the end; full log: {stderr_path}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SHUTDOWN_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _launch(binary: Path, workdir: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen, int]:
    """Starts `llmservice serve` on a free port in `workdir`; its logs go beside it."""
    stderr_path = workdir / f"{name}.stderr.log"
    stdout_path = workdir / f"{name}.stdout.log"
    _SERVER_LOGS[f"{name} stderr"] = stderr_path
    _SERVER_LOGS[f"{name} stdout"] = stdout_path
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), "serve", "--host", "127.0.0.1", "--port", "0"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        return proc, _wait_until_ready(proc, workdir / ".port", stderr_path)
    except BaseException:
        _stop(proc)
        raise


def _proxy_env(env: dict[str, str], upstream_port: int, workdir: Path) -> dict[str, str]:
    """The same tiers, the light and embedding ones served by the upstream."""
    env = dict(env, MODELS_DIR=str(workdir / "models"), DATA_DIR=str(workdir / "data"))
    for tier, name in (("LIGHT", "light"), ("EMBEDDING", "embedding")):
        if f"{tier}_MODEL_PATH" in env:
            env[f"{tier}_BACKEND"] = "openai"
            env[f"{tier}_BASE_URL"] = f"http://127.0.0.1:{upstream_port}/v1"
            env[f"{tier}_UPSTREAM_MODEL"] = name
    return env


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    model = _resolve_model()
    binary = _resolve_binary()

    workdir = tmp_path_factory.mktemp("llmservice")
    models_dir = workdir / "models"
    models_dir.mkdir()

    env = os.environ.copy()
    env.update(
        LIGHT_MODEL_PATH=str(model),
        MODELS_DIR=str(models_dir),
        DATA_DIR=str(workdir / "data"),
        LIGHT_N_CTX="2048",
        LIGHT_N_THREADS="2",
        RUST_BACKTRACE="1",
    )
    for tier, name in (("EMBEDDING", EMBEDDING_FILE_NAME), ("RERANKER", RERANKER_FILE_NAME)):
        if (model.parent / name).is_file():
            env[f"{tier}_MODEL_PATH"] = str(model.parent / name)
            env[f"{tier}_N_THREADS"] = "2"

    # Requests to the local server must never go through an HTTP proxy.
    mp = pytest.MonkeyPatch()
    for var in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(var, "")
        mp.setenv(var, ",".join(filter(None, [current, "127.0.0.1", "localhost"])))

    started: list[subprocess.Popen] = []
    try:
        proc, port = _launch(binary, workdir, env, "llmservice")
        started.append(proc)
        if os.environ.get("LLMSERVICE_VIA_UPSTREAM") == "1":
            front = tmp_path_factory.mktemp("llmservice-proxy")
            (front / "models").mkdir()
            proc, port = _launch(binary, front, _proxy_env(env, port, front), "proxy")
            started.append(proc)
            workdir = front
        yield Server(
            port=port,
            base_url=f"http://127.0.0.1:{port}",
            workdir=workdir,
            stderr_path=workdir / ("proxy.stderr.log" if len(started) > 1 else "llmservice.stderr.log"),
            proc=proc,
        )
    finally:
        for proc in reversed(started):
            _stop(proc)
        mp.undo()


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    """Server root URL without /v1, e.g. http://127.0.0.1:41234."""
    return server.base_url


@pytest.fixture(scope="session")
def client(server: Server):
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1",
        api_key="not-needed",
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
    )
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(base_url: str):
    """Raw httpx client rooted at the server (paths like "/v1/chat/completions")."""
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as c:
        yield c


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SERVER_LOGS:
        return  # no server started (e.g. --collect-only)
    stats = terminalreporter.stats
    if not (stats.get("failed") or stats.get("error")):
        return
    for name, path in _SERVER_LOGS.items():
        if not path.exists() or not path.stat().st_size:
            continue
        terminalreporter.section(f"{name} (tail)")
        terminalreporter.write_line(f"full log: {path}")
        terminalreporter.write_line(_tail(path, LOG_TAIL_CHARS if "stderr" in name else 5_000))
