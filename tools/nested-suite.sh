#!/usr/bin/env bash
# The vmm backend end to end on a KVM that runs Linux: what the test command
# (tools/test.sh) runs inside L1, `tools/nested-kvm.sh -- tools/nested-suite.sh`,
# since these machines' own KVM cannot run Linux. On a capable host it runs
# as it is. Everything it runs was built by `cargo test` on the host first:
# under emulation a build would take longer than the tests.
#
#  1. `nutshell check` picks the own VMM for `vm.backend = "auto"`;
#  2. tools/kvm-linux-boot-test.sh: nutshell-vmm boots the guest, the agent
#     answers over our hybrid vsock, `nutshell run --backend vmm` runs a
#     container, and its figures (RUNS boots, 3 unless told);
#  3. containerd end to end with `vm.backend = "vmm"` (NUTSHELL_TEST_BACKEND):
#     a `ctr run`, and CRI pods on a CNI bridge reaching each other through
#     our virtio-net ($NESTED_TESTS names them).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n--> %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "nutshell check: auto picks the own VMM"
check=$(target/debug/nutshell check 2>&1 || true)
grep -q '^backend vmm' <<<"$check" || fail "auto does not pick vmm here:
$check"

step "tools/kvm-linux-boot-test.sh (PROFILE=debug, RUNS=${RUNS:-3})"
out=$(RUNS=${RUNS:-3} PROFILE=debug tools/kvm-linux-boot-test.sh 2>&1) ||
  { echo "$out"; fail "the boot test failed"; }
echo "$out"
# Here KVM runs Linux: a skip would hide a broken probe.
! grep -q '^SKIP' <<<"$out" || fail "the boot test skipped on a KVM that runs Linux"

step "containerd tests with vm.backend = \"vmm\""
export NUTSHELL_TEST_BACKEND=vmm
export PATH="$PWD/target/debug:$PATH"
# shellcheck disable=SC2086 # word splitting of the test list is meant
cargo test -q -p nutshell-tests ${NESTED_TESTS:-"--test guest_vmm --test containerd_ctr -- --exact ctr_run_prints_the_guest_kernel_and_passes_exit_codes the_vmm_backend_boots_the_guest_or_says_why_not a_kernel_that_panics_ends_the_start_with_its_console an_agent_that_never_answers_fails_at_the_deadline a_guest_that_floods_its_console_is_stopped_at_the_deadline"}
