#!/usr/bin/env bash
# libFuzzer (cargo fuzz) on every parser of untrusted bytes, SECONDS each
# (default 300); TARGET... picks some of them. Starts from the seeds that
# fuzz/seeds/make_seeds.py writes (real requests, the chat-template cases,
# model outputs, BGE-M3's head files) and keeps what it learns in fuzz/corpus/. Every input in
# fuzz/regressions/<target>/ (what earlier runs found) runs first. A crash stops
# the run and leaves the input in fuzz/artifacts/<target>/; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# and, once fixed, keep it in fuzz/regressions/<target>/.
# The fuzz build needs no llama.cpp (engine without its `llama` feature).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
targets=(tool_calls chat_template request_body heads gbnf_guard sse_framer detok cached_answer)
if [ $# -gt 1 ]; then
    targets=("${@:2}")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
python3 fuzz/seeds/make_seeds.py fuzz/corpus
# cargo fuzz asks for sanitizer flags that stable rustc takes only with this.
export RUSTC_BOOTSTRAP=1
cargo fuzz build
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    echo "fuzz: $target for ${seconds}s"
    status=0
    dirs=(fuzz/corpus/"$target")
    if [ -d fuzz/regressions/"$target" ]; then
        dirs+=(fuzz/regressions/"$target")
    fi
    cargo fuzz run "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -dict=fuzz/tokens.dict -print_final_stats=1 >"$log" 2>&1 || status=$?
    # libFuzzer's progress lines are many; its summary and any crash are not.
    grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added)|panicked|ERROR|SUMMARY|artifact" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log"
        exit "$status"
    fi
done
