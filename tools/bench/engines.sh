#!/usr/bin/env bash
# Docker and Podman benchmark (printed, not asserted): `podman run --rm
# IMAGE true` and `docker run --rm IMAGE true`, N times each, p50/p99 of the
# wall time per engine and runtime in the same run: Debian's runc, and the
# runtime at RUNTIME_PATH (e.g. target/debug/nutshell-runc) when given,
# booting cold and claiming from a warm pool.
# The engines are the tests' private ones (tests/src/engines.rs: own roots,
# dockerd and its containerd inside a network namespace the benchmark
# makes, containers on --network none).
#
#   tools/bench/engines.sh [N] [RUNTIME_PATH]     (default 20, runc only)
#
# Needs root, podman and docker.io (tools/setup.sh --deps); for
# nutshell-runc also the guest image. Runs under the VM test lock, so no
# test shares the machine with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-20}
SECOND=()
if [[ -n ${2:-} ]]; then
  export NUTSHELL_RUNC_BIN
  NUTSHELL_RUNC_BIN=$(realpath "$2")
  SECOND=(second)
fi
cargo build -q -p nutshell-tests --example engine_bench
# `nutshell pool`, for the pool rows.
cargo build -q -p nutshell --bin nutshell
NUTSHELL_REQUIRE_ALL=1 flock /tmp/nutshell-vm-tests.lock \
  target/debug/examples/engine_bench "$RUNS" "${SECOND[@]}"
