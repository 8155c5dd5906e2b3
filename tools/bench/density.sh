#!/usr/bin/env bash
# Density benchmark: idle busybox pods (`ctr run -d … sleep`) on a private
# containerd (tools/lib/containerd.sh), started one after another until the
# PSS of all of them (shims and VM processes) reaches a memory budget.
# Prints pods per GiB, the idle CPU per pod (over 10 s once all run), and
# the start latency (`ctr run -d` wall time) of the first and of the last
# pod. All pods are removed at the end.
#
#   tools/bench/density.sh [--budget-mib N] [--max-pods N] [--release]
#                                     (defaults 2048 MiB, 64 pods, debug)
#
# The budget is small by default: on QEMU/TCG every idle guest still costs
# CPU (its timer ticks are emulated), and this machine has two cores.
# Needs root, containerd, the guest image and the VM backends
# (tools/setup.sh). Uses the workspace's shim build and the built-in
# default config (pods boot cold).
set -euo pipefail
cd "$(dirname "$0")/../.."

BUDGET_MIB=2048 MAX_PODS=64 PROFILE=debug
while (($#)); do
  case $1 in
    --budget-mib) BUDGET_MIB=${2:?}; shift ;;
    --max-pods) MAX_PODS=${2:?}; shift ;;
    --release) PROFILE=release ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
export NUTSHELL_CONFIG=/run/nutshell-density-$$.toml
printf '[pool]\nenabled = false\n' >"$NUTSHELL_CONFIG"
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
# shellcheck source=tools/lib/containerd.sh
source tools/lib/containerd.sh
trap 'ns_containerd_stop; rm -f "$NUTSHELL_CONFIG"' EXIT
ns_containerd_start "/run/nutshell-density-$$"
echo "host: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, load $(cut -d' ' -f1-3 /proc/loadavg)"

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# pod_pids NAME: the shim and every VM process of pod NAME (owner.json
# names the pod; vm.json its processes, each leading a process group)
pod_pids() {
  local dir rec p
  dir=$(dirname "$(grep -l "\"pod\": \"$1\"" /run/nutshell/*/owner.json | head -1)")
  rec=$dir/vm.json
  sed -n 's/.*"shim_pid":\([0-9]*\).*/\1/p' "$rec"
  for p in $(grep -o '"pid":[0-9]*' "$rec" | cut -d: -f2); do
    pgrep -g "$p" || true
  done
}

pss_kib() {
  local total=0 p v
  for p in "$@"; do
    v=$(awk '$1 == "Pss:" {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

ticks() {
  local total=0 p
  for p in "$@"; do
    # utime + stime: fields 14 and 15, counted after the command name
    total=$((total + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0)))
  done
  echo "$total"
}

pods=0 first_ms= last_ms= all_pids=()
while ((pods < MAX_PODS)); do
  t0=$(now_ms)
  ns_ctr run -d --runtime io.containerd.nutshell.v2 "$NS_BUSYBOX_IMAGE" "idle-$pods" sleep 100000 </dev/null >/dev/null
  took=$(($(now_ms) - t0))
  [[ -n $first_ms ]] || first_ms=$took
  last_ms=$took
  pods=$((pods + 1))
  mapfile -t new < <(pod_pids "idle-$((pods - 1))")
  all_pids+=("${new[@]}")
  used=$(($(pss_kib "${all_pids[@]}") / 1024))
  echo "pod $pods: started in $took ms; all pods: $used MiB PSS"
  ((used < BUDGET_MIB)) || break
done
sleep 5
c0=$(ticks "${all_pids[@]}")
sleep 10
c1=$(ticks "${all_pids[@]}")
hz=$(getconf CLK_TCK)
used=$(($(pss_kib "${all_pids[@]}") / 1024))
echo
echo "pods: $pods idle busybox pods in $used MiB PSS (budget $BUDGET_MIB MiB, at most $MAX_PODS pods)"
awk -v n="$pods" -v m="$used" 'BEGIN {printf "pods per GiB: %.1f (%.1f MiB each)\n", n * 1024 / m, m / n}'
awk -v d="$((c1 - c0))" -v hz="$hz" -v n="$pods" 'BEGIN {printf "idle CPU per pod: %.1f %% of a core\n", 100 * d / hz / 10 / n}'
echo "start latency (ctr run -d): first pod $first_ms ms, last pod $last_ms ms"
