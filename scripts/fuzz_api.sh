#!/usr/bin/env bash
# Schema-driven fuzzing of the HTTP API (schemathesis against /openapi.json)
# for longer than CI's minute: scripts/fuzz_api.sh [seconds, default 600].
# Needs the release build and the test venv (scripts/test.sh makes both).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMSERVICE_FUZZ_SECONDS="${1:-600}" .venv/bin/pytest -q -s tests/compat/test_api_fuzz.py
