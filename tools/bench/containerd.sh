#!/usr/bin/env bash
# containerd benchmark of the nutshell shim, on a private containerd
# (tools/lib/containerd.sh):
#   - `ctr run --rm ... true` wall time, p50/p99 over N runs: runc
#     (io.containerd.runc.v2), nutshell booting cold, and nutshell claiming
#     a warm VM from a pool (`nutshell pool`, one VM kept warm; each run
#     starts once the pool has refilled), with the pool's warm-up and
#     without it (`[pool] warm_up = false`), all in the same run, and how
#     many VMs the cold runs gave up and booted again;
#   - PSS of a warm VM waiting in the pool, and of an idle pod that claimed
#     it, with and without its warm-up;
#   - shim RSS per pod and PSS of the whole idle pod (an idle `sleep` pod
#     booted cold, alone on the host): the shim plus the VM's processes
#     (QEMU, vhost-device-vsock, virtiofsd and its sandbox child).
#
#   tools/bench/containerd.sh [--runs N] [--release]
#
# Needs root, containerd, the guest image and the VM backends
# (tools/setup.sh). Uses the workspace's shim and nutshell builds (debug,
# or --release), not the installed ones, and the built-in default config
# with its own pool socket.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=20 PROFILE=debug
while (($#)); do
  case $1 in
    --runs) RUNS=${2:?}; shift ;;
    --release) PROFILE=release ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ $PROFILE == release ]]; then
  cargo build -q --release -p nutshell-runtime -p nutshell --bin containerd-shim-nutshell-v2 --bin nutshell
else
  cargo build -q -p nutshell-runtime -p nutshell --bin containerd-shim-nutshell-v2 --bin nutshell
fi
export NS_SHIM_DIR=$PWD/target/$PROFILE
bench_dir=/run/nutshell-bench-$$
# The shim reads this config (containerd passes the environment on); the
# pool below serves its socket while the warm runs are timed.
export NUTSHELL_CONFIG=/run/nutshell-bench-$$.toml
# pool_config WARM_UP: the config the shim and the pool read.
pool_config() {
  printf '[pool]\nsocket = "%s"\nwarm = 1\nwarm_up = %s\n' "$bench_dir.pool.sock" "$1" >"$NUTSHELL_CONFIG"
}
pool_config true
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
# shellcheck source=tools/lib/containerd.sh
source tools/lib/containerd.sh
pool_pid=
stop_pool() {
  [[ -n $pool_pid ]] || return 0
  kill "$pool_pid" 2>/dev/null || true
  wait "$pool_pid" 2>/dev/null || true
  pool_pid=
}
trap 'stop_pool; ns_containerd_stop; rm -f "$NUTSHELL_CONFIG" "$bench_dir.pool.log"' EXIT
ns_containerd_start "$bench_dir"

echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(containerd --version | cut -d' ' -f1,3)"
echo "shim: target/$PROFILE/containerd-shim-nutshell-v2; guest: $(head -1 "$NUTSHELL_GUEST_DIR/VERSION" 2>/dev/null || echo '?')"

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# percentile P of the numbers on stdin (nearest rank)
percentile() {
  sort -n | awk -v p="$1" '{v[NR]=$1} END {i=int((p/100)*NR+0.999999); if (i<1) i=1; print v[i]}'
}

# warm_vms: how many VMs the pool has made warm since it started
warm_vms() { grep -c 'warm VM ready' "$bench_dir.pool.log" 2>/dev/null || true; }

# time_runs RUNTIME [warm]: N runs of `true`, one duration (ms) per line;
# with `warm`, each run waits until the pool has a VM again
time_runs() {
  local runtime=$1 warm=${2:-} i t0 j
  for ((i = 0; i < RUNS; i++)); do
    if [[ -n $warm ]]; then
      for ((j = 0; j < 600 && $(warm_vms) < i + 1; j++)); do sleep 0.1; done
      (($(warm_vms) >= i + 1)) || { echo "the pool did not refill; its log:" >&2; tail "$bench_dir.pool.log" >&2; exit 1; }
    fi
    t0=$(now_ms)
    ns_ctr run --rm --runtime "$runtime" "$NS_BUSYBOX_IMAGE" "bench-$i" true </dev/null >/dev/null
    echo $(($(now_ms) - t0))
  done
}

row() { printf '%-34s %8s %8s\n' "$1" "$(percentile 50 <<<"$2")" "$(percentile 99 <<<"$2")"; }
printf '\n%-34s %8s %8s  (ctr run --rm ... true, %d runs each)\n' runtime p50_ms p99_ms "$RUNS"
row io.containerd.runc.v2 "$(time_runs io.containerd.runc.v2)"
row "io.containerd.nutshell.v2 (cold)" "$(time_runs io.containerd.nutshell.v2)"
# containerd copies each shim's log into its own. A cold start whose first
# VM's agent was not reached in time kills that VM and boots another
# (Sandbox::start_relaunching's warning), which explains a slow outlier.
echo "  VMs relaunched: $(grep -c 'is started once more' "$bench_dir/containerd.log" || true) in $RUNS cold runs"

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/$3" 2>/dev/null || echo 0; }
# mib KIB: KiB as MiB, one decimal. Read by eye, the KiB this table printed
# until 7 Dec were divided by 1000, not 1024, for the README.
mib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f", k / 1024}'; }
# pss_of PID...: the PSS (KiB) of these processes together
pss_of() {
  local p v sum=0
  for p in "$@"; do
    v=$(kib "$p" Pss smaps_rollup)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

# idle_pod LABEL: an idle pod's shim RSS and whole PSS (the shim and the
# VM's processes), as rows of memory_rows; the pod is removed after.
memory_rows=()
idle_pod() {
  local rec shim vm_pids p pod_pids i
  ns_ctr run -d --runtime io.containerd.nutshell.v2 "$NS_BUSYBOX_IMAGE" bench-idle sleep 100000 </dev/null >/dev/null
  # A claimed VM's pool would boot the next beside it, sharing its file pages.
  stop_pool
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
  memory_rows+=("$1:")
  memory_rows+=("$(printf '  %-38s %8s' "shim RSS" "$(mib "$(kib "$shim" VmRSS status)")")")
  # shellcheck disable=SC2086 # a list of pids
  memory_rows+=("$(printf '  %-38s %8s' "whole pod PSS ($(wc -w <<<"$pod_pids") processes)" "$(mib "$(pss_of $pod_pids)")")")
  ns_ctr task kill -s SIGKILL bench-idle >/dev/null
  for ((i = 0; i < 100; i++)); do
    ns_ctr task ls 2>/dev/null | grep -q '^bench-idle .*STOPPED' && break
    sleep 0.1
  done
  ns_ctr task delete bench-idle >/dev/null 2>&1 || true
  ns_ctr containers delete bench-idle >/dev/null
}

# pool_pass LABEL WARM_UP: the warm runs against a fresh pool; then, once
# it has refilled, the PSS of the VM waiting in it (the pool's children
# lead their own process groups; virtiofsd forks a child), and an idle
# pod that claims it.
pool_pass() {
  pool_config "$2"
  "target/$PROFILE/nutshell" pool --config "$NUTSHELL_CONFIG" 2>"$bench_dir.pool.log" &
  pool_pid=$!
  row "io.containerd.nutshell.v2 ($1)" "$(time_runs io.containerd.nutshell.v2 warm)"
  echo "  warm VMs claimed: $(grep -c 'VM claimed' "$bench_dir.pool.log" || true) of $RUNS runs"
  local j p pids=()
  for ((j = 0; j < 600 && $(warm_vms) < RUNS + 1; j++)); do sleep 0.1; done
  sleep 2
  for p in $(pgrep -P "$pool_pid" || true); do
    mapfile -t -O "${#pids[@]}" pids < <(pgrep -g "$p" || true)
  done
  memory_rows+=("$(printf '%-40s %8s' "warm VM waiting ($1), PSS" "$(mib "$(pss_of "${pids[@]}")")")")
  idle_pod "idle pod (sleep), claimed ($1)"
  (($(grep -c 'VM claimed' "$bench_dir.pool.log" || true) == RUNS + 1)) ||
    memory_rows+=("  (that idle pod did not claim a warm VM: it booted cold)")
}
pool_pass pool true
pool_pass "pool, no warm-up" false
pool_config true

idle_pod "idle pod (sleep), booted cold"
printf '\n%-40s %8s\n' "host memory" MiB
printf '%s\n' "${memory_rows[@]}"
