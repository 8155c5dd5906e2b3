#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 30 s each) with
# the nightly toolchain. Without nightly or cargo-fuzz it says so and exits
# 0: the same targets run as a plain test over the corpus in
# `cargo test -p nutshell-vmm --test fuzz_corpus`.
#
#   vmm/fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-30}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "SKIP: no nightly toolchain (the corpus replay test covers the targets)"; exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "SKIP: cargo-fuzz is not installed (cargo install cargo-fuzz)"; exit 0
fi
for t in block_queue virtqueue vsock_packet net_queue; do
  mkdir -p "corpus/$t"
  echo "==> $t for ${SECS}s"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=1024 2>&1 |
    grep -E '^(Done|==[0-9]+==|SUMMARY|artifact)' || true
  [[ -z $(ls artifacts/"$t" 2>/dev/null) ]] || { echo "FAIL: $t found a crash: artifacts/$t"; exit 1; }
done
echo "fuzzing: no crashes"
