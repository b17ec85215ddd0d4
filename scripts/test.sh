#!/usr/bin/env bash
# Every test: formatting and lints, the Rust unit and integration tests (release
# build, real models from ../shared/models), then the openai-python
# compatibility suite against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
# Lints in release, so they share the build's compiled dependencies (llama.cpp).
cargo clippy --release --locked --all-targets -- -D warnings
cargo build --release --locked
cargo test --release --locked

# (Re)install the suite's tools when the venv is new or the pins changed.
if ! cmp -s tests/compat/requirements.txt .venv/requirements.installed; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
    cp tests/compat/requirements.txt .venv/requirements.installed
fi
.venv/bin/pytest -q tests/compat
