# syntax=docker/dockerfile:1
# llmservice in a container: a build stage with llama.cpp's toolchain, then a
# slim runtime with the binary, a non-root user, /models and /data volumes.
#
#   docker build -t llmservice .
#   docker run -p 8000:8000 -v ./models:/models:ro -v llmservice-data:/data \
#       -e API_KEY=change-me -e LIGHT_MODEL_PATH=/models/SmolLM2-135M-Instruct-Q4_1.gguf llmservice
#
# GPU images: add `--build-arg FEATURES=cuda` on an nvidia/cuda devel base, or
# `FEATURES=vulkan` with libvulkan-dev and glslc (see README, GPU builds).

FROM rust:1.95-bookworm AS build
ARG FEATURES=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libclang-dev clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# An image runs on machines other than the one that built it: build for a
# floor (AVX2, FMA, F16C: x86-64 CPUs since 2013-2015) rather than for this
# CPU, which .cargo/config.toml chooses for source builds. RUSTFLAGS replaces
# that setting, and llama.cpp is compiled for the same floor.
ENV RUSTFLAGS="-C target-cpu=x86-64-v3"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin llmservice ${FEATURES:+--features $FEATURES} \
    && install -m 0755 target/release/llmservice /usr/local/bin/llmservice

FROM debian:bookworm-slim
# libgomp: llama.cpp's threads; curl: the health check; ca-certificates: Hub
# downloads and https upstreams.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/llmservice llmservice \
    && mkdir -p /models /data \
    && chown llmservice:llmservice /models /data
COPY --from=build /usr/local/bin/llmservice /usr/local/bin/llmservice
USER llmservice
WORKDIR /home/llmservice
# Listening beyond loopback, the server requires an API key on every route
# but /health: API_KEY, or the one it generates into /data/api_key.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODELS_DIR=/models \
    DATA_DIR=/data
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["llmservice"]
CMD ["serve"]
