#!/usr/bin/env bash
# nutshell-vmm against QEMU (`-M microvm -accel kvm`) on one KVM that runs
# Linux, in one run: process start to agent-ready and the host RSS/PSS of
# the VM's process tree with a running guest (tools/bench/boot.sh, both
# backends with virtio-fs), and `nutshell run -- true` end to end
# (tools/bench/run.sh). Prints each figure for both and the ratio vmm/QEMU.
#
#   tools/bench/nested.sh [boots] [runs]     (default 10 and 10)
#
# Where the host's KVM cannot run Linux (these machines), it measures inside
# one L1 (tools/nested-kvm.sh; take the shared VM lock). There everything is
# emulated: only the ratios mean something, never the absolute times.
# Builds (release) on the host first; nothing is built inside L1.
set -euo pipefail
cd "$(dirname "$0")/../.."
BOOTS=${1:-10}
RUNS=${2:-10}

if [[ ${NESTED_BENCH_INNER:-} != 1 ]]; then
  cargo build -q --release -p nutshell -p nutshell-vmm
  cargo build -q --release -p nutshell-runtime --example boot-bench
  export NESTED_BENCH_INNER=1
  if [[ $(target/release/nutshell check --backend-only 2>/dev/null || true) == vmm ]]; then
    exec "$0" "$BOOTS" "$RUNS"
  fi
  echo "This host's KVM cannot run Linux: measuring inside L1 (emulated; ratios only)."
  NESTED_KVM_ENV="${NESTED_KVM_ENV:-} NESTED_BENCH_INNER" exec tools/nested-kvm.sh -- "$0" "$BOOTS" "$RUNS"
fi

export PATH="$PWD/target/release:$PATH" BUILD=0 PROFILE=release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "on $(uname -r), $(nproc) CPUs; $(qemu-system-x86_64 --version | head -1)"
for b in vmm qemu; do
  echo "--> boot-bench --backend $b --accel kvm --shared --boots $BOOTS"
  tools/bench/boot.sh --backend "$b" --accel kvm --shared --boots "$BOOTS" | tee "$out/boot-$b"
done
for b in vmm qemu; do
  echo "--> nutshell run --backend $b -- true, $RUNS runs"
  tools/bench/run.sh "$RUNS" "$b" | tee "$out/run-$b"
done

python3 - "$out" <<'PY'
import re, sys
d = sys.argv[1]
def figures(backend):
    f = {}
    for line in open(f"{d}/boot-{backend}"):
        if line.startswith("failed boots:"):
            f["boots failed (of all)"] = float(line.split()[2])
        m = re.match(r"(.*?)\s+p50\s+([\d.]+)\s+(\S+)\s+p90\s+([\d.]+)", line)
        if m:
            f[f"{m[1]} p50 ({m[3]})"] = float(m[2])
            if m[3] == "s":
                f[f"{m[1]} p90 ({m[3]})"] = float(m[4])
    for line in open(f"{d}/run-{backend}"):
        m = re.match(r"nutshell run -- true: (\S+)\s+p50\s+(\d+) ms\s+p99\s+(\d+) ms", line)
        if m and m[1] in ("agent-ready", "vm-stopped"):
            f[f"run -- true {m[1]} p50 (ms)"] = float(m[2])
            f[f"run -- true {m[1]} p99 (ms)"] = float(m[3])
    return f
vmm, qemu = figures("vmm"), figures("qemu")
print(f"\n{'figure':<50} {'vmm':>10} {'QEMU':>10} {'vmm/QEMU':>9}")
for k in vmm:
    if k in qemu:
        r = vmm[k] / qemu[k] if qemu[k] else float("nan")
        print(f"{k:<50} {vmm[k]:>10.3f} {qemu[k]:>10.3f} {r:>9.2f}")
PY
