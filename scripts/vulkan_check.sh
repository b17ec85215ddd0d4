#!/usr/bin/env bash
# Builds llmservice with llama.cpp's Vulkan backend (`--features vulkan`) into
# target/vulkan/ and runs the real-model compatibility tests with every layer
# offloaded (`{TIER}_N_GPU_LAYERS=-1`). Without a GPU, Mesa's software device
# (lavapipe, `mesa-vulkan-drivers`) runs llama.cpp's shaders on the CPU: slow,
# but it checks that the build and the offloaded path give correct answers.
#
# Needs Debian's libvulkan-dev, glslc, spirv-headers, mesa-vulkan-drivers and
# vulkan-tools (installed here when running as root), and Vulkan headers of
# 1.3.261 or later (llama.cpp uses vk::LayerSettingEXT). Debian 12 ships 1.3.239, so on
# Debian 12 the headers of Debian 13's libvulkan-dev are unpacked into a
# temporary directory and put first on the include path (nothing is installed
# from Debian 13; the system's Vulkan loader is used).
#
# Not part of scripts/test.sh: a second llama.cpp build with its shaders costs
# about 25 minutes on 2 cores (BENCHMARKS.md / RELIABILITY.md have the run).
#
#   scripts/vulkan_check.sh            build, then run the tests
#   scripts/vulkan_check.sh --build    build only
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libvulkan-dev glslc spirv-headers mesa-vulkan-drivers vulkan-tools)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "vulkan_check: install ${missing[*]} first (sudo apt-get install ${missing[*]})" >&2
        exit 2
    fi
fi

header_version=$(awk '/#define VK_HEADER_VERSION /{print $3}' /usr/include/vulkan/vulkan_core.h)
if [ "${header_version:-0}" -lt 261 ]; then
    headers="${TMPDIR:-/tmp}/llmservice-vulkan-headers"
    if ! [ -f "$headers/usr/include/vulkan/vulkan.hpp" ]; then
        echo "vulkan_check: Vulkan headers 1.3.$header_version are too old; unpacking Debian 13's"
        deb="libvulkan-dev_1.4.309.0-1_amd64.deb"
        mkdir -p "$headers"
        curl -fsSL -o "$headers/$deb" "http://deb.debian.org/debian/pool/main/v/vulkan-loader/$deb"
        dpkg-deb -x "$headers/$deb" "$headers"
    fi
    export CFLAGS="-I$headers/usr/include ${CFLAGS:-}"
    export CXXFLAGS="-I$headers/usr/include ${CXXFLAGS:-}"
fi

export CARGO_TARGET_DIR=target/vulkan
start=$(date +%s)
cargo build --release --locked --features vulkan
echo "vulkan_check: built in $(( $(date +%s) - start )) s"
[ "${1:-}" = --build ] && exit 0

binary="$CARGO_TARGET_DIR/release/llmservice"
# llama.cpp passes over CPU-type Vulkan devices unless they are named: where
# the software device is the only one, name it.
if [ -z "${GGML_VK_VISIBLE_DEVICES:-}" ] && command -v vulkaninfo >/dev/null \
    && ! vulkaninfo --summary 2>/dev/null | grep deviceType | grep -qv PHYSICAL_DEVICE_TYPE_CPU; then
    echo "vulkan_check: only a CPU Vulkan device (Mesa's lavapipe): GGML_VK_VISIBLE_DEVICES=0"
    export GGML_VK_VISIBLE_DEVICES=0
fi
models="$(cd .. && pwd)/shared/models"
export LIGHT_N_GPU_LAYERS=-1 EMBEDDING_N_GPU_LAYERS=-1 RERANKER_N_GPU_LAYERS=-1

# First: llama.cpp must say it put the layers on the Vulkan device.
log=$(mktemp)
port=$(( 20000 + RANDOM % 20000 ))
RUST_LOG=info,llama_cpp_2=info PORT=$port LIGHT_MODEL_PATH="$models/SmolLM2-135M-Instruct-Q4_1.gguf" \
    LIGHT_N_CTX=2048 LIGHT_N_THREADS=2 ENABLE_CACHE=false DATA_DIR="$(mktemp -d)" \
    "$binary" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -fs "localhost:$port/health" >/dev/null 2>&1 && break
    sleep 1
done
curl -fs "localhost:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "light", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}'
echo
kill $server
wait $server 2>/dev/null || true
grep -E "ggml_vulkan|Vulkan0|offloaded|offloading" "$log" | head -20 || true
if ! grep -qE "offloaded [1-9][0-9]*/[0-9]+ layers to GPU" "$log"; then
    echo "vulkan_check: the model was not offloaded to a Vulkan device (log: $log)" >&2
    exit 1
fi

# Then the real-model compatibility cases, every layer on the device.
LLMSERVICE_BIN="$binary" .venv/bin/pytest -q \
    tests/compat/test_chat.py tests/compat/test_completions.py \
    tests/compat/test_embeddings.py tests/compat/test_structured.py \
    -k "not test_200_random_schemas and not test_required_tool_choice_always"
echo "vulkan_check: finished in $(( $(date +%s) - start )) s"
