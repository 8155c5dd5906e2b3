#!/usr/bin/env bash
# Guest image figures (printed, not asserted): kernel build time from clean,
# vmlinux and initramfs sizes, and boot-to-agent under QEMU/TCG.
#
#   tools/bench/guest-image.sh [--clean-build] [--boots N]
#
#   --clean-build  time a kernel build from clean in a scratch cache (takes
#                  minutes); without it the time recorded when the cached
#                  kernel was built is shown
#   --boots N      boots to time (default 10; 0 skips)
#
# Reads the installed image in $NUTSHELL_GUEST_DIR (tools/lib/paths.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
GUEST_DIR=$NUTSHELL_GUEST_DIR
NUTSHELL_CACHE=${NUTSHELL_CACHE:-/var/cache/nutshell}
CLEAN=0 BOOTS=10
while (($#)); do
  case $1 in
    --clean-build) CLEAN=1 ;;
    --boots) BOOTS=${2:?}; shift ;;
    *) echo "usage: $0 [--clean-build] [--boots N]" >&2; exit 2 ;;
  esac
  shift
done
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

for f in vmlinux initramfs.cpio.gz; do
  [[ -f $GUEST_DIR/$f ]] || { echo "$GUEST_DIR/$f missing: guest-image/build.sh --install" >&2; exit 1; }
done

if ((CLEAN)); then
  scratch=$(mktemp -d /var/tmp/nutshell-kbench.XXXXXX)
  trap 'rm -rf "$scratch"' EXIT
  t0=$(date +%s.%N)
  sdir=$(NUTSHELL_CACHE=$scratch guest-image/kernel.sh | tail -1)
  t1=$(date +%s.%N)
  build=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f s (extract + config + make -j%d, this run)", b - a, '"$(nproc)"' }')
  # The same inputs in another directory must give the same bytes.
  if cmp -s "$sdir/vmlinux" "$NUTSHELL_CACHE/kernel/$(basename "$sdir")/vmlinux"; then
    reproducible="yes (byte-identical to the cached build of key $(basename "$sdir" | cut -c1-12))"
  elif [[ -f $NUTSHELL_CACHE/kernel/$(basename "$sdir")/vmlinux ]]; then
    reproducible="NO: differs from the cached build of key $(basename "$sdir" | cut -c1-12)"
  else
    reproducible="not checked (no cached build of this key)"
  fi
else
  kdir=$NUTSHELL_CACHE/kernel/$(awk '/^kernel-key /{print $2}' "$GUEST_DIR/VERSION")
  if [[ -f $kdir/build-seconds ]]; then
    build="$(cat "$kdir/build-seconds") s (make -j$(nproc) vmlinux, recorded when $kdir was built)"
  else
    build="unknown (run with --clean-build)"
  fi
fi

printf '%-36s %s\n' "kernel" "$(awk '/^kernel /{print $2}' "$GUEST_DIR/VERSION")"
printf '%-36s %s\n' "kernel build from clean" "$build"
[[ -n ${reproducible:-} ]] && printf '%-36s %s\n' "kernel reproducible" "$reproducible"
printf '%-36s %s (target <= 20 MiB)\n' "vmlinux size" "$(mib "$(stat -c %s "$GUEST_DIR/vmlinux")")"
printf '%-36s %s (target <= 8 MiB)\n' "initramfs size (gzip)" "$(mib "$(stat -c %s "$GUEST_DIR/initramfs.cpio.gz")")"
printf '%-36s %s\n' "debug initramfs size (gzip)" "$(mib "$(stat -c %s "$GUEST_DIR/initramfs-debug.cpio.gz")")"

((BOOTS > 0)) || exit 0
# Wall time from starting QEMU to the agent's "agent serving" line on the
# serial console, and the guest's own uptime stamp on that line's neighbour.
times=()
for ((i = 0; i < BOOTS; i++)); do
  log=$(mktemp)
  t0=$(date +%s.%N)
  qemu-system-x86_64 -accel tcg -cpu max -smp 1 \
    -M microvm,x-option-roms=off,acpi=off,memory-backend=mem \
    -object memory-backend-memfd,id=mem,size=256M,share=on -m 256 \
    -nographic -no-reboot -kernel "$GUEST_DIR/vmlinux" -initrd "$GUEST_DIR/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1" </dev/null >"$log" 2>&1 &
  pid=$!
  t=""
  for ((j = 0; j < 1200; j++)); do
    if grep -q "agent serving" "$log"; then t=$(date +%s.%N); break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [[ -z $t ]]; then
    echo "boot $i: no 'agent serving' line; console:" >&2
    tail -20 "$log" >&2
    rm -f "$log"
    exit 1
  fi
  times+=("$(awk -v a="$t0" -v b="$t" 'BEGIN { printf "%.3f", b - a }')")
  rm -f "$log"
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
p50=$(awk -v n="${#times[@]}" 'NR == int((n + 1) / 2) { print }' <<<"$sorted")
max=$(tail -1 <<<"$sorted")
printf '%-36s p50 %s s, max %s s over %d boots (target p50 <= 2 s)\n' \
  "boot to agent serving (TCG, wall)" "$p50" "$max" "$BOOTS"
