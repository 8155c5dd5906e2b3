#!/usr/bin/env bash
# `nutshell run` benchmark: one busybox container in its own microVM, no
# containerd, N times; prints p50/p99 of each `--timing` milestone (ms from
# the start of the VM's launch): vm-launched, agent-ready, container-started,
# container-exited, vm-stopped.
#
#   tools/bench/run.sh [runs] [backend]     (default 20, auto; release build)
#
# Needs root, the installed guest image and the VM backends (tools/setup.sh).
# `auto` is nutshell-vmm where KVM can run Linux, QEMU/TCG elsewhere (here).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-20}
BACKEND=${2:-auto}
# BUILD=0 when built already (inside L1, where a build would crawl).
[[ ${BUILD:-1} == 0 ]] || cargo build -q --release -p nutshell -p nutshell-vmm
export PATH="$PWD/target/release:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs"/{bin,proc,sys,dev,tmp,etc}
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/true"

backend=$(target/release/nutshell check --backend-only 2>/dev/null || true)
echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); backend $BACKEND (auto here: ${backend:-?})"
# A run that takes longer than RUN_TIMEOUT_S (120) has stalled: say where,
# rather than hang the benchmark (and a whole L1 with it).
for ((i = 0; i < RUNS; i++)); do
  rc=0
  timeout "${RUN_TIMEOUT_S:-120}" target/release/nutshell run --backend "$BACKEND" --timing \
    --rootfs "$work/rootfs" -- true 2>>"$work/timing" || rc=$?
  if ((rc == 124)); then
    echo "run $i stalled for ${RUN_TIMEOUT_S:-120} s; the busiest processes:" >&2
    ps -eo pid,ppid,stat,pcpu,etime,comm --sort=-pcpu | head -12 >&2
  fi
  ((rc == 0)) || { tail -20 "$work/timing" >&2; echo "run $i failed ($rc)" >&2; exit 1; }
done
python3 - "$work/timing" "$RUNS" <<'PY'
import collections, sys
ms = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 4 and f[0] == "timing:" and f[3] == "ms":
        ms[f[1]].append(float(f[2]))
pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
for k in ("vm-launched", "agent-ready", "container-started", "container-exited", "vm-stopped"):
    xs = ms.get(k, [])
    if xs:
        print(f"nutshell run -- true: {k:18} p50 {pct(xs, 50):7.0f} ms  p99 {pct(xs, 99):7.0f} ms  ({len(xs)} runs)")
PY
