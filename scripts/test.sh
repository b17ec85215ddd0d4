#!/usr/bin/env bash
# Every test: formatting, the Rust unit and integration tests (release build, real
# models from ../shared/models), then the openai-python compatibility suite
# against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo build --release --locked
cargo test --release --locked

if [ ! -x .venv/bin/pytest ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
fi
.venv/bin/pytest -q tests/compat
