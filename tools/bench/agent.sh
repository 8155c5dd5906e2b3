#!/usr/bin/env bash
# Benchmarks nutshell-agent on this host (printed, not asserted): create,
# start and wait of `true` through the agent (p50/p99 over RUNS, default
# 200), the agent's idle RSS, and the stripped static binary's size.
# Needs root and busybox-static.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-200}"
bin="$(tools/build-agent.sh | tail -n 1)"
# A stripped copy: the release profile strips already; this makes sure.
stripped="$(mktemp)"
trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$bin" 2>/dev/null || cp "$bin" "$stripped"
echo "stripped static binary: $(stat -c %s "$stripped") bytes"
cargo build --release -q -p nutshell-tests --example agent_bench
NUTSHELL_AGENT_BIN="$bin" target/release/examples/agent_bench "$runs"
