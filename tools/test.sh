#!/usr/bin/env bash
# The test command (README, and .ci/run). Installs what the tests need, checks
# formatting and lints, builds the agent and the guest image, and runs every
# test. Missing prerequisites fail the run (NUTSHELL_REQUIRE_ALL=1) rather than
# skipping, except where a host genuinely cannot do something (a KVM that
# cannot boot Linux), which is printed as a one-line SKIP with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export NUTSHELL_REQUIRE_ALL=1
export CARGO_TERM_COLOR=never
# A clean clone builds once: incremental state would only take disk.
[[ ${CI:-} != true ]] || export CARGO_INCREMENTAL=0
# shellcheck source=tools/lib/build.sh
source tools/lib/build.sh
step() { printf '\n==> %s\n' "$*"; }

step "setup (dependencies only)"
tools/setup.sh --deps

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "build the static agent (tests/tests/agent_host/ runs it)"
tools/build-agent.sh >/dev/null

step "build every target once: the shim, nutshell-runc, nutshell, nutshell-vmm and the tests (tests/tests/containerd_*.rs run the shim under a private containerd, with nutshell pool under NUTSHELL_TEST_POOL=1; engine_*.rs nutshell-runc under private Docker and Podman, each in a network namespace of its own)"
build_debug

step "cargo test"
cargo test --workspace

step "the containerd suites once more, their pods claiming warm VMs (each private containerd runs a nutshell pool; CNI pods get the warm VM's NIC moved into their namespace)"
NUTSHELL_TEST_POOL=1 cargo test --workspace --test containerd_ctr --test containerd_faults --test containerd_parallel --test containerd_cni --test containerd_cri
NUTSHELL_TEST_POOL=1 cargo test --workspace --test engine_docker --test engine_podman bridge_network

step "fuzz the VMM's guest-facing parsers for a bounded time (cargo-fuzz, nightly)"
# Built outside the clone, so a clean clone reuses the instrumented build.
CARGO_TARGET_DIR=${NUTSHELL_CACHE:-/var/cache/nutshell}/fuzz-target vmm/fuzz/run.sh "${FUZZ_SECS:-15}"

step "full Linux boot on KVM with nutshell-vmm (skips where KVM cannot run Linux)"
tools/kvm-linux-boot-test.sh

step "the vmm backend end to end on a KVM that runs Linux (tools/nested-suite.sh; inside L1 where this host's cannot)"
# build_debug built all the suite runs, here rather than under emulation.
if grep -qE '^ok +kvm-linux ' <<<"$(target/debug/nutshell check || true)"; then
  tools/nested-suite.sh
else
  # L1 is emulated end to end, and fails on its own now and then (issue
  # 11): on Debian 12's QEMU 7.2 its kernel locked up in KVM's local APIC
  # code, panicked, reset a guest or stalled; on QEMU 10.0 from
  # bookworm-backports, which nested-kvm.sh now uses, 4 of 20 runs failed
  # (a stall; guests that reset or stopped answering), two of them in a
  # row. nested-kvm.sh
  # ends L1 at a lockup report or after two minutes without its pulse,
  # printing where its vCPUs were. The failure is printed in full above,
  # then the suite runs again in a fresh L1, up to three tries; a third
  # failure fails the test command.
  # The suite takes 7-10 minutes in L1; 15 bound a run that neither ends
  # nor stalls, so that three of them still end within CI's 90.
  export NESTED_KVM_TIMEOUT_S=${NESTED_KVM_TIMEOUT_S:-900}
  for try in 1 2 3; do
    tools/nested-kvm.sh -- tools/nested-suite.sh && break
    ((try < 3)) || exit 1
    echo "RETRY: the L1 suite failed (its output is above); once more in a fresh L1"
  done
fi
