#!/usr/bin/env bash
# Network benchmark of CRI pods (printed, not asserted): a nutshell pod
# beside a runc pod in the same run, on a CNI bridge in a network namespace
# the benchmark makes (nothing touches the machine's network):
#   - TCP throughput from the pod to the node (busybox dd | nc);
#   - node -> pod round trips, p50/p99: a 64-byte echo on one connection,
#     and an HTTP GET to busybox httpd, a new connection each.
# Prints a Markdown table the README can take.
#
#   tools/bench/net.sh [MIB] [ROUND_TRIPS]      (default 64 MiB, 200)
#
# Needs root, containerd, the CNI plugins, the guest image and QEMU
# (tools/setup.sh). Uses the workspace's debug shim; QEMU, not the shim,
# carries a nutshell pod's packets.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p nutshell-runtime --bin containerd-shim-nutshell-v2
cargo build -q -p nutshell-tests --example net_bench
NUTSHELL_REQUIRE_ALL=1 target/debug/examples/net_bench "${1:-64}" "${2:-200}"
