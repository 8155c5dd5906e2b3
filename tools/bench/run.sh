#!/usr/bin/env bash
# `nutshell run` benchmark: one busybox container in its own microVM, no
# containerd, N times; prints p50/p99 of each `--timing` milestone (ms from
# the start of the VM's launch): vm-launched, agent-ready, container-started,
# container-exited, vm-stopped.
#
#   tools/bench/run.sh [runs] [backend]     (default 20, auto; release build)
#
# Each run boots its VM (`--cold`). With POOL=1, each run claims a warm VM
# from a `nutshell pool` this script starts on a socket of its own, once the
# pool has one again; those lines read `nutshell run -- true (pool):`.
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

cold=--cold label="nutshell run -- true"
if [[ ${POOL:-0} == 1 ]]; then
  cold= label="nutshell run -- true (pool)"
  export NUTSHELL_CONFIG=$work/pool.toml
  printf '[vm]\nbackend = "%s"\n[pool]\nsocket = "%s"\nwarm = 1\n' "$BACKEND" "$work/pool.sock" >"$NUTSHELL_CONFIG"
  target/release/nutshell pool 2>"$work/pool.log" &
  pool_pid=$!
  trap 'kill $pool_pid 2>/dev/null; wait $pool_pid 2>/dev/null; rm -rf "$work"' EXIT
fi
# wait_warm N: until the pool has made N VMs warm since it started
wait_warm() {
  local j
  for ((j = 0; j < 600; j++)); do
    (($(grep -c 'warm VM ready' "$work/pool.log" || true) >= $1)) && return 0
    sleep 0.1
  done
  echo "the pool did not refill; its log:" >&2
  tail "$work/pool.log" >&2
  return 1
}

backend=$(target/release/nutshell check --backend-only 2>/dev/null || true)
echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); backend $BACKEND (auto here: ${backend:-?})"
# A run that takes longer than RUN_TIMEOUT_S (120) has stalled: say where,
# rather than hang the benchmark (and a whole L1 with it).
for ((i = 0; i < RUNS; i++)); do
  rc=0
  [[ -n $cold ]] || wait_warm $((i + 1))
  timeout "${RUN_TIMEOUT_S:-120}" target/release/nutshell run --backend "$BACKEND" $cold --timing \
    --rootfs "$work/rootfs" -- true 2>>"$work/timing" || rc=$?
  if ((rc == 124)); then
    echo "run $i stalled for ${RUN_TIMEOUT_S:-120} s; the busiest processes:" >&2
    ps -eo pid,ppid,stat,pcpu,etime,comm --sort=-pcpu | head -12 >&2
  fi
  ((rc == 0)) || { tail -20 "$work/timing" >&2; echo "run $i failed ($rc)" >&2; exit 1; }
done
python3 - "$work/timing" "$RUNS" "$label" <<'PY'
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
        print(f"{sys.argv[3]}: {k:18} p50 {pct(xs, 50):7.0f} ms  p99 {pct(xs, 99):7.0f} ms  ({len(xs)} runs)")
PY
