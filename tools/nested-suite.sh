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
#  3. guest_vmm: the guest on the vmm backend, and guests that misbehave (a
#     kernel panic, a silent agent, a console flood) end with our error;
#  4. containerd end to end with `vm.backend = "vmm"` (NUTSHELL_TEST_BACKEND):
#     a `ctr run`, CRI pods on a CNI bridge reaching each other through our
#     virtio-net, and a killed shim's clean-up ($NESTED_TESTS names them);
#  5. the warm pool: CRI pods on the bridge claiming warm VMs with NICs
#     (unless NESTED_TESTS chose the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n--> %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# The runtime finds nutshell-vmm on PATH: this build's.
export PATH="$PWD/target/debug:$PATH"

step "nutshell check: auto picks the own VMM"
check=$(target/debug/nutshell check 2>&1 || true)
grep -q '^backend vmm' <<<"$check" || fail "auto does not pick vmm here:
$check"

step "tools/kvm-linux-boot-test.sh (PROFILE=debug, RUNS=${RUNS:-3})"
out=$(RUNS=${RUNS:-3} PROFILE=debug BUILD=0 tools/kvm-linux-boot-test.sh 2>&1) ||
  { echo "$out"; fail "the boot test failed"; }
echo "$out"
# Here KVM runs Linux: a skip would hide a broken probe.
! grep -q '^SKIP' <<<"$out" || fail "the boot test skipped on a KVM that runs Linux"

step "tests on the vmm backend: misbehaving guests, and containerd with vm.backend = \"vmm\""
export NUTSHELL_TEST_BACKEND=vmm
# The test binaries `cargo test` built, run directly (cargo itself would
# spend minutes under emulation finding them fresh). NESTED_TESTS: lines of
# "<test file> <filter>...".
tests=${NESTED_TESTS:-"guest_vmm
containerd_ctr ctr_run_prints_the_guest_kernel
containerd_cni nutshell_pods_on_a_cni_bridge a_killed_shim_leaves_no_tap"}
run_test() {
  local file=$1
  shift
  # shellcheck disable=SC2012 # names are cargo's: <file>-<16 hex digits>
  bin=$(ls -t target/debug/deps/"$file"-* 2>/dev/null | grep -E -- "-[0-9a-f]{16}$" | head -1 || true)
  [[ -x $bin ]] || fail "no built test binary for $file (tools/test.sh builds it: cargo build --workspace --all-targets)"
  "$bin" "$@" || fail "$file failed with vm.backend = vmm"
}
while read -r file filters; do
  [[ -n $file ]] || continue
  # shellcheck disable=SC2086 # the filters are words
  run_test "$file" $filters
done <<<"$tests"

if [[ -z ${NESTED_TESTS:-} ]]; then
  step "the warm pool on the vmm backend: CRI pods claim warm VMs, whose NICs (our virtio-net) move into the pods' namespaces"
  NUTSHELL_TEST_POOL=1 run_test containerd_cni nutshell_pods_on_a_cni_bridge
fi
