#!/usr/bin/env bash
# containerd benchmark of the nutshell shim, on a private containerd
# (tools/lib/containerd.sh):
#   - `ctr run --rm ... true` wall time, p50/p99 over N runs, nutshell beside
#     runc (io.containerd.runc.v2) in the same run;
#   - shim RSS per pod (an idle `sleep` pod);
#   - PSS of the whole idle pod: the shim plus the VM's processes (QEMU,
#     vhost-device-vsock, virtiofsd and its sandbox child).
#
#   tools/bench/containerd.sh [--runs N] [--release]
#
# Needs root, containerd, the guest image and the VM backends
# (tools/setup.sh). Uses the workspace's shim build (debug, or --release),
# not the installed one; the nutshell config is $NUTSHELL_CONFIG or
# /etc/nutshell/config.toml or the built-in default.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=20 PROFILE=debug
while (($#)); do
  case $1 in
    --runs) RUNS=${2:?}; shift ;;
    --release) PROFILE=release ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ $PROFILE == release ]]; then
  cargo build -q --release -p nutshell-runtime --bin containerd-shim-nutshell-v2
else
  cargo build -q -p nutshell-runtime --bin containerd-shim-nutshell-v2
fi
export NS_SHIM_DIR=$PWD/target/$PROFILE
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
# shellcheck source=tools/lib/containerd.sh
source tools/lib/containerd.sh
trap ns_containerd_stop EXIT
ns_containerd_start "/run/nutshell-bench-$$"

echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(containerd --version | cut -d' ' -f1,3)"
echo "shim: target/$PROFILE/containerd-shim-nutshell-v2; guest: $(head -1 "$NUTSHELL_GUEST_DIR/VERSION" 2>/dev/null || echo '?')"

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# percentile P of the numbers on stdin (nearest rank)
percentile() {
  sort -n | awk -v p="$1" '{v[NR]=$1} END {i=int((p/100)*NR+0.999999); if (i<1) i=1; print v[i]}'
}

# time_runs RUNTIME: N runs of `true`, one duration (ms) per line
time_runs() {
  local runtime=$1 i t0
  for ((i = 0; i < RUNS; i++)); do
    t0=$(now_ms)
    ns_ctr run --rm --runtime "$runtime" "$NS_BUSYBOX_IMAGE" "bench-$i" true </dev/null >/dev/null
    echo $(($(now_ms) - t0))
  done
}

printf '\n%-28s %8s %8s  (ctr run --rm ... true, %d runs each)\n' runtime p50_ms p99_ms "$RUNS"
for rt in io.containerd.runc.v2 io.containerd.nutshell.v2; do
  times=$(time_runs "$rt")
  printf '%-28s %8s %8s\n' "$rt" "$(percentile 50 <<<"$times")" "$(percentile 99 <<<"$times")"
done

# An idle pod: memory of the shim and of the whole pod.
ns_ctr run -d --runtime io.containerd.nutshell.v2 "$NS_BUSYBOX_IMAGE" bench-idle sleep 100000 </dev/null >/dev/null
sleep 5
# Pod directories are named by a hash; owner.json says whose each is.
rec=$(dirname "$(grep -l '"pod": "bench-idle"' /run/nutshell/*/owner.json | head -1)")/vm.json
shim=$(sed -n 's/.*"shim_pid":\([0-9]*\).*/\1/p' "$rec")
vm_pids=$(grep -o '"pid":[0-9]*' "$rec" | cut -d: -f2)
# The VM processes lead their own process groups; virtiofsd forks a child.
pod_pids=$shim
for p in $vm_pids; do
  pod_pids+=" $(pgrep -g "$p" | tr '\n' ' ' || true)"
done
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/$3" 2>/dev/null || echo 0; }
shim_rss=$(kib "$shim" VmRSS status)
pss=0
for p in $pod_pids; do
  v=$(kib "$p" Pss smaps_rollup)
  pss=$((pss + ${v:-0}))
done
printf '\n%-40s %8s\n' "idle pod (sleep), host memory" KiB
printf '%-40s %8s\n' "shim RSS" "$shim_rss"
printf '%-40s %8s\n' "whole pod PSS (shim + VM processes)" "$pss"
printf '%-40s %8s\n' "  processes counted" "$(wc -w <<<"$pod_pids")"
ns_ctr task kill -s SIGKILL bench-idle >/dev/null
for ((i = 0; i < 100; i++)); do
  ns_ctr task ls 2>/dev/null | grep -q '^bench-idle .*STOPPED' && break
  sleep 0.1
done
ns_ctr task delete bench-idle >/dev/null 2>&1 || true
ns_ctr containers delete bench-idle >/dev/null
