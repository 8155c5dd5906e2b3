#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 30 s each) with
# the nightly toolchain, and prints each target's run count. Without a
# nightly toolchain it says so and exits 0: the same targets run as a plain
# test over the corpus in `cargo test -p nutshell-vmm --test fuzz_corpus`.
# A missing cargo-fuzz is a missing install step (`tools/setup.sh --deps`
# installs it wherever nightly exists), so under NUTSHELL_REQUIRE_ALL=1 it
# fails the run instead of skipping.
#
#   vmm/fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-30}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "SKIP: no nightly toolchain (the corpus replay test covers the targets)"; exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  if [[ ${NUTSHELL_REQUIRE_ALL:-} == 1 ]]; then
    echo "FAIL: cargo-fuzz is not installed, and NUTSHELL_REQUIRE_ALL=1 (tools/setup.sh --deps installs it)" >&2
    exit 1
  fi
  echo "SKIP: cargo-fuzz is not installed (tools/setup.sh --deps installs it)"; exit 0
fi
log=$(mktemp)
# The vsock target's sockets go under TMPDIR; libFuzzer exits without
# removing them, so they get a directory that goes with this run.
fuzz_tmp=$(mktemp -d)
trap 'rm -rf "$log" "$fuzz_tmp"' EXIT
for t in block_queue virtqueue vsock_packet net_queue; do
  mkdir -p "corpus/$t"
  echo "==> $t for ${SECS}s"
  TMPDIR=$fuzz_tmp cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=1024 >"$log" 2>&1 || true
  grep -E '^(Done|==[0-9]+==|SUMMARY|artifact)' "$log" || true
  [[ -z $(ls artifacts/"$t" 2>/dev/null) ]] || { echo "FAIL: $t found a crash: artifacts/$t"; exit 1; }
  # libFuzzer ends a clean bounded run with "Done N runs in S second(s)";
  # without it the target did not build or run, which must not pass.
  grep -qE '^Done [0-9]+ runs' "$log" || {
    echo "FAIL: $t did not run to its time limit; the last lines:"; tail -20 "$log"; exit 1
  }
done
echo "fuzzing: no crashes"
