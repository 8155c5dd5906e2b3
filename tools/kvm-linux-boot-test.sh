#!/usr/bin/env bash
# The full Linux-boot test for nutshell-vmm: boots the real guest image
# ($NUTSHELL_GUEST_DIR/{vmlinux,initramfs.cpio.gz}, tools/lib/paths.sh) on KVM, reaches the
# agent, and runs a container through it. Needs a KVM that can run Linux
# (bare metal, or nested VMX/SVM); `nutshell check`'s probe decides, and where
# it says no this prints one `SKIP: <reason>` line and exits 0. From a fresh
# checkout it installs what is missing (`tools/setup.sh --deps`: packages,
# virtiofsd, the guest image) and builds what it runs.
#
#   tools/kvm-linux-boot-test.sh        exit 0: passed or skipped; 1: failed
#   RUNS=10 (default)                   boots measured for start to agent-ready
#   PROFILE=release (default) | debug   which cargo profile to build and run
#   BUILD=0                             build nothing: that profile's binaries exist
#
# What it proves on a capable host, in order:
#  1. nutshell-vmm alone: the kernel boots through PVH with our memory map
#     and command line, the serial console works, /init (the agent) runs
#     from the initramfs and answers a ttrpc Health call over our hybrid
#     vsock (`CONNECT 1024` -> `OK`);
#  2. the runtime's vmm backend (`nutshell run --backend vmm`): virtiofsd
#     behind our vhost-user-fs frontend shares a busybox rootfs, the agent
#     mounts it and runs a container whose output and exit status come back;
#  3. figures: process start to agent-ready (p50/p99 over $RUNS boots) for
#     the bare VMM, and `nutshell run --timing` for a whole container.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
GUEST_DIR=$NUTSHELL_GUEST_DIR
BOOT_LIMIT_S=${BOOT_LIMIT_S:-60}
RUNS=${RUNS:-10}

# shellcheck source=tools/lib/build.sh
source tools/lib/build.sh
# The verdict from the debug build (what the test command already built); the
# measured binaries are $PROFILE builds (release unless told), made only where the test runs.
[[ ${BUILD:-1} == 0 ]] || build_debug -q

check=$(target/debug/nutshell check --guest-dir "$GUEST_DIR" || true)
kvm_line=$(grep -E '^[a-z]+ +kvm ' <<<"$check" || true)
linux_line=$(grep -E '^[a-z]+ +kvm-linux ' <<<"$check" || true)
if [[ $kvm_line != ok* ]]; then
  echo "SKIP: ${kvm_line:-nutshell check printed no kvm line}"
  exit 0
fi
if [[ $linux_line != ok* ]]; then
  echo "SKIP: $(sed -E 's/^[a-z]+ +kvm-linux +//' <<<"$linux_line")"
  exit 0
fi

fail() { echo "FAIL: $*" >&2; exit 1; }
need_setup() {
  [[ -s $GUEST_DIR/vmlinux && -s $GUEST_DIR/initramfs.cpio.gz && -x /bin/busybox ]] || return 0
  command -v virtiofsd >/dev/null || [[ -x /usr/local/bin/virtiofsd ]] || return 0
  return 1
}
if need_setup; then
  echo "installing what is missing: tools/setup.sh --deps (packages, virtiofsd, guest image)"
  tools/setup.sh --deps >/tmp/nutshell-kvm-linux-boot-setup.log 2>&1 ||
    { tail -30 /tmp/nutshell-kvm-linux-boot-setup.log >&2; fail "tools/setup.sh --deps failed"; }
fi
for f in vmlinux initramfs.cpio.gz; do
  [[ -s $GUEST_DIR/$f ]] || fail "$GUEST_DIR/$f is missing (guest-image/build.sh --install)"
done
# PROFILE=debug reuses what `cargo test` built (tools/nested-suite.sh, where
# a release build would be compiled under emulation); figures then come
# from the dev profile (opt-level 1).
profile=${PROFILE:-release}
case $profile in
  release) profile_flag=(--release) ;;
  debug) profile_flag=() ;;
  *) fail "PROFILE must be release or debug, not $profile" ;;
esac
# BUILD=0, as tools/bench/ takes it: the binaries exist already (nested-suite.sh: cargo
# under emulation spends minutes only to find nothing to do).
if [[ ${BUILD:-1} != 0 ]]; then
  cargo build -q "${profile_flag[@]}" -p nutshell -p nutshell-vmm
  # The runtime's own agent client: it waits for the agent and prints its
  # Health reply with the milliseconds since a given start (runtime/examples/).
  cargo build -q "${profile_flag[@]}" -p nutshell-runtime --example agent-health
fi
NUTSHELL=target/$profile/nutshell
VMM=target/$profile/nutshell-vmm
HEALTH=target/$profile/examples/agent-health
# `nutshell run --backend vmm` finds nutshell-vmm on PATH: this build's.
export PATH="$PWD/target/$profile:$PATH"

work=$(mktemp -d)
vmm_pid=
cleanup() {
  [[ -n $vmm_pid ]] && kill "$vmm_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT


proved=()

# --- 1. nutshell-vmm alone: the boot, step by step, then the agent ----------
start=$(date +%s%N)
"$VMM" --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
  --cmdline "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1" \
  --memory-mib 256 --serial "$work/console.log" --vsock "3,$work/vsock.sock" \
  --timeout-ms $((BOOT_LIMIT_S * 1000 + 30000)) 2>"$work/vmm.err" &
vmm_pid=$!

wait_for() { # pattern what
  local deadline=$((SECONDS + BOOT_LIMIT_S))
  while ! grep -q -- "$1" "$work/console.log" 2>/dev/null; do
    if ! kill -0 "$vmm_pid" 2>/dev/null; then
      tail -30 "$work/console.log" >&2 || true
      fail "the VM ended before $2: $(cat "$work/vmm.err")"
    fi
    ((SECONDS < deadline)) || { tail -30 "$work/console.log" >&2; fail "no $2 within ${BOOT_LIMIT_S}s"; }
    sleep 0.05
  done
  proved+=("$2 after $((($(date +%s%N) - start) / 1000000)) ms")
}
wait_for "Linux version" "kernel banner"
# The guest kernel has built-in words (CONFIG_CMDLINE) ahead of ours.
wait_for "Command line: .*8250.nr_uarts=1" "our command line"
wait_for "printk: console \[ttyS0\] enabled" "serial console driver"
wait_for "Run /init as init process" "/init (the agent) started from the initramfs"
reply=$("$HEALTH" "$work/vsock.sock" "$start" "$BOOT_LIMIT_S") ||
  fail "talking to the agent over hybrid vsock failed: $(tail -5 "$work/console.log")"
[[ $reply == *": OK; Health: status=SERVING"* ]] || fail "unexpected agent reply: $reply"
proved+=("agent answered ttrpc Health over hybrid vsock: ${reply%; *} (after ${reply##*; } ms)")
kill "$vmm_pid" 2>/dev/null || true
wait "$vmm_pid" 2>/dev/null || true
vmm_pid=

# --- 2. a container through the runtime's vmm backend ------------------------
rootfs=$work/rootfs
tools/lib/test-images.sh rootfs "$rootfs"
out=$("$NUTSHELL" run --backend vmm --timing --rootfs "$rootfs" -- \
  sh -c 'echo "container says: kernel $(uname -r)"; cat /proc/1/cmdline >/dev/null; exit 3' \
  2>"$work/run.err") && rc=0 || rc=$?
[[ $rc == 3 ]] || fail "nutshell run --backend vmm ended with status $rc, not 3: $(cat "$work/run.err")"
[[ $out == "container says: kernel "* ]] || fail "unexpected container output: $out"
run_timing=$(sed -n 's/^timing: //p' "$work/run.err" | tr '\n' ',' | sed 's/,$//; s/,/, /g')
proved+=("nutshell run --backend vmm: a busybox rootfs over virtio-fs (virtiofsd behind our vhost-user-fs), \"$out\", exit status 3 passed through; timing: $run_timing")

# --- 3. figures ----------------------------------------------------------------
quiet="console=ttyS0 reboot=t panic=-1 no_timer_check cryptomgr.notests rcupdate.rcu_expedited=1 8250.nr_uarts=1 quiet"
samples=()
for ((i = 0; i < RUNS; i++)); do
  rm -f "$work/vsock.sock"
  start=$(date +%s%N)
  "$VMM" --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cmdline "$quiet" --memory-mib 256 --serial none --vsock "3,$work/vsock.sock" \
    --timeout-ms $((BOOT_LIMIT_S * 1000)) 2>"$work/vmm.err" &
  vmm_pid=$!
  reply=$("$HEALTH" "$work/vsock.sock" "$start" "$BOOT_LIMIT_S") ||
    fail "boot $i: the agent did not answer: $(cat "$work/vmm.err")"
  samples+=("${reply##*; }")
  kill "$vmm_pid" 2>/dev/null || true
  wait "$vmm_pid" 2>/dev/null || true
  vmm_pid=
done
stats=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{v[NR]=$1} END {
  p50=v[int((NR+1)/2)]; p99=v[NR]; printf "p50 %.1f ms, max %.1f ms over %d boots", p50, p99, NR }')
ready=() whole=()
for ((i = 0; i < RUNS; i++)); do
  "$NUTSHELL" run --backend vmm --timing --rootfs "$rootfs" -- true 2>"$work/run.err" ||
    fail "nutshell run $i failed: $(cat "$work/run.err")"
  ready+=("$(awk '$1 == "timing:" && $2 == "agent-ready" {print $3}' "$work/run.err")")
  whole+=("$(awk '$1 == "timing:" && $2 == "vm-stopped" {print $3}' "$work/run.err")")
done
p50() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.1f", v[int((NR+1)/2)]}'; }
run_stats="agent-ready p50 $(p50 "${ready[@]}") ms, whole run (to VM stopped) p50 $(p50 "${whole[@]}") ms over $RUNS runs"

echo "PASS: nutshell-vmm booted the guest image on KVM and ran a container:"
printf '  - %s\n' "${proved[@]}"
echo "FIGURES ($(nproc) CPUs, $(uname -r)):"
echo "  - nutshell-vmm process start to agent Health reply (256 MiB, 1 vCPU, quiet): $stats"
echo "  - nutshell run --backend vmm -- true (virtiofsd + VMM + agent + container): $run_stats"
