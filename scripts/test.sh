#!/usr/bin/env bash
# Every test: formatting and lints, the Rust unit and integration tests (release
# build, real models from ../shared/models; the Qdrant tests' stand-in server
# runs on the suite's Python), 10 seconds of libFuzzer on each
# parser of untrusted bytes (scripts/fuzz_parsers.sh), then the openai-python
# compatibility suite against the real binary (with a one-minute soak and the
# fault tests).
set -euo pipefail
cd "$(dirname "$0")/.."

# Seconds per stage, printed last so CI's tail shows where the time went.
stages=()
mark=$(date +%s)
stage() {
    local now
    now=$(date +%s)
    stages+=("$1 $((now - mark))s")
    mark=$now
}
trap 'echo "test.sh stages: ${stages[*]:-none}"' EXIT

# (Re)install the suite's tools when the venv is new or the pins changed.
if ! cmp -s tests/compat/requirements.txt .venv/requirements.installed; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
    cp tests/compat/requirements.txt .venv/requirements.installed
fi

stage "venv"
cargo fmt --all --check
# Lints in release, so they share the build's compiled dependencies (llama.cpp).
cargo clippy --release --locked --all-targets -- -D warnings
stage "clippy"
cargo build --release --locked
stage "build"
cargo test --release --locked
stage "cargo-test"
(cd fuzz && cargo fmt --check)
scripts/fuzz_parsers.sh "${LLMSERVICE_FUZZ_SECONDS_EACH:-10}"
stage "fuzz"

.venv/bin/pytest -q --durations=12 tests/compat
stage "compat"
# The chat, streaming, tools and embeddings cases again, through a second
# llmservice whose tiers are served by the first ({TIER}_BACKEND=openai): every
# answer must pass through unchanged. (The two long grammar sweeps test our
# engine, not the proxy, and ran above.)
LLMSERVICE_VIA_UPSTREAM=1 .venv/bin/pytest -q \
    tests/compat/test_chat.py tests/compat/test_embeddings.py \
    tests/compat/test_structured.py tests/compat/test_completions.py \
    -k "not test_200_random_schemas and not test_required_tool_choice_always"
stage "compat-upstream"
