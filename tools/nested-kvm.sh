#!/usr/bin/env bash
# Runs a command inside "L1": a Debian Linux booted under QEMU/TCG with an
# emulated AMD CPU that has SVM and nested paging, where kvm_amd gives a
# /dev/kvm that can run Linux guests. For machines whose own /dev/kvm cannot
# (docs: environment.md, "KVM inside QEMU/TCG"). Everything is emulated: use
# it to prove correctness, never to measure performance.
#
#   tools/nested-kvm.sh [--] CMD [ARG...]
#
# CMD runs as root in the caller's directory on the host's own filesystem
# (virtme-ng shares it read-write), with the caller's PATH and HOME. Its
# stdout and stderr, merged, stream to our stdout; the L1 console goes to a
# log that is shown only when L1 itself fails. Exit status: CMD's, exactly;
# 125 when L1 failed before CMD finished (no boot, timeout, crash).
#
# It installs what it needs, idempotently: apt `kmod qemu-system-x86
# python3-venv`, virtme-ng $VIRTME_NG_VERSION in a venv, and the Debian
# kernel that `linux-image-amd64` depends on (the .deb cached under
# $NUTSHELL_CACHE/l1 by version; the modules L1 needs unpacked into
# /lib/modules/<version>, because L1 loads them from the host's tree).
# A piece that cannot be had prints one `SKIP: <reason>` line and exits 0;
# with NUTSHELL_REQUIRE_ALL=1 it is a failure (`FAIL: <reason>`, status 1).
#
# Knobs: NESTED_KVM_CPUS (2), NESTED_KVM_MEMORY (4G), NESTED_KVM_TIMEOUT_S
# (1800, the whole L1 run), NESTED_KVM_STALL_S (120: L1 without its pulse
# that long has stalled), NESTED_KVM_ENV (more variable names to pass in),
# NESTED_KVM_QEMU (the QEMU binary L1 runs on; see below for the default).
# L1 is CPU-hungry and stalls under load: run it under the shared VM lock,
#   flock /tmp/nutshell-vm-tests.lock tools/nested-kvm.sh -- CMD
set -euo pipefail

VIRTME_NG_VERSION=1.42
CACHE=${NUTSHELL_CACHE:-/var/cache/nutshell}/l1
CPUS=${NESTED_KVM_CPUS:-2}
MEMORY=${NESTED_KVM_MEMORY:-4G}
TIMEOUT_S=${NESTED_KVM_TIMEOUT_S:-1800}
STALL_S=${NESTED_KVM_STALL_S:-120}
# What L1 loads from the kernel package: KVM and its dependencies, what
# virtme-ng's initramfs needs to mount the shared root (virtio-fs, 9p), and
# what pod networking needs there: veth, tun, a CNI bridge, tc ingress with
# u32 and mirred, and netfilter for CNI's portmap (directories or files).
MODULE_DIRS='arch/x86 virt crypto lib fs net/9p net/vmw_vsock drivers/crypto drivers/virtio drivers/char drivers/block
  drivers/net/veth.ko drivers/net/tun.ko net/bridge net/802 net/llc net/sched net/netfilter net/ipv4/netfilter net/ipv6/netfilter'

[[ ${1:-} == -- ]] && shift
if (($# == 0)); then
  echo "usage: $0 [--] CMD [ARG...]" >&2
  exit 2
fi

missing() {
  if [[ ${NUTSHELL_REQUIRE_ALL:-} == 1 ]]; then
    echo "FAIL: $*" >&2
    exit 1
  fi
  echo "SKIP: $*"
  exit 0
}
log() { echo "nested-kvm: $*" >&2; }

# --- what it needs on the host -------------------------------------------------
mkdir -p "$CACHE"
need_pkgs=()
command -v depmod >/dev/null || [[ -x /usr/sbin/depmod ]] || need_pkgs+=(kmod)
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >"$CACHE/apt.log" 2>&1 ||
    missing "apt-get install ${need_pkgs[*]} failed (see $CACHE/apt.log)"
fi

venv=$CACHE/venv-virtme-ng-$VIRTME_NG_VERSION
if [[ ! -e $venv/.complete ]]; then
  log "installing virtme-ng $VIRTME_NG_VERSION into $venv"
  rm -rf "$venv"
  { /usr/bin/python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q "virtme-ng==$VIRTME_NG_VERSION"; } >"$CACHE/pip.log" 2>&1 ||
    missing "pip install virtme-ng==$VIRTME_NG_VERSION failed (see $CACHE/pip.log)"
  touch "$venv/.complete"
fi

kpkg=${NESTED_KVM_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')}
[[ -n $kpkg ]] || missing "apt-cache names no kernel package for linux-image-amd64"
kver=${kpkg#linux-image-}
kdir=$CACHE/kernel-$kver
moddir=/lib/modules/$kver
stamp="$kpkg $MODULE_DIRS"
if [[ ! -s $kdir/vmlinuz || $(cat "$moddir/.nutshell-l1" 2>/dev/null) != "$stamp" ]]; then
  mkdir -p "$kdir"
  deb=$(ls "$kdir"/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z $deb ]]; then
    log "downloading $kpkg"
    (cd "$kdir" && apt-get download "$kpkg") >"$CACHE/apt.log" 2>&1 ||
      missing "apt-get download $kpkg failed (see $CACHE/apt.log)"
    deb=$(ls "$kdir"/"${kpkg}"_*.deb | head -1)
  fi
  log "unpacking $kpkg: $kdir/vmlinuz and the modules L1 needs into $moddir"
  members=("./boot/vmlinuz-$kver" "./lib/modules/$kver/modules.builtin"
    "./lib/modules/$kver/modules.builtin.modinfo" "./lib/modules/$kver/modules.order")
  for d in $MODULE_DIRS; do members+=("./lib/modules/$kver/kernel/$d"); done
  unpack=$kdir/unpack
  rm -rf "$unpack" "$moddir"
  mkdir -p "$unpack"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$unpack" "${members[@]}" ||
    missing "unpacking $deb failed"
  mv "$unpack/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  mkdir -p /lib/modules
  mv "$unpack/lib/modules/$kver" "$moddir"
  rm -rf "$unpack"
  /usr/sbin/depmod "$kver" || missing "depmod $kver failed"
  echo "$stamp" >"$moddir/.nutshell-l1"
fi

# L1 runs on a newer QEMU than the product's: bookworm-backports' (10.0 in
# Dec 2026) instead of Debian 12's 7.2, unpacked under the cache and never
# installed, so the TCG backend's own QEMU stays the distribution's. Under
# 7.2, L1's kernel now and then locked up in KVM's local APIC code or
# stalled without a word (issue 11). Elsewhere than Debian 12 the system's
# QEMU serves. NESTED_KVM_QEMU names another binary.
if [[ -z ${NESTED_KVM_QEMU:-} ]] && grep -qx 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  qapt=$CACHE/qemu-apt
  mkdir -p "$qapt/lists/partial" "$qapt/cache/archives/partial"
  echo "deb http://deb.debian.org/debian bookworm-backports main" >"$qapt/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$qapt/sources.list" -o Dir::Etc::sourceparts=/dev/null
    -o "Dir::State::Lists=$qapt/lists" -o "Dir::Cache=$qapt/cache")
  # The newest version; without the network, the one unpacked last.
  qver=
  if apt-get "${apt_opts[@]}" update >"$CACHE/apt-qemu.log" 2>&1; then
    qver=$(apt-cache "${apt_opts[@]}" show --no-all-versions qemu-system-x86 2>/dev/null |
      awk '$1 == "Version:" {print $2; exit}')
  fi
  qroot=$CACHE/qemu-${qver//[:~]/_}
  if [[ -z $qver ]]; then
    # shellcheck disable=SC2012 # our own directory names
    qroot=$(ls -td "$CACHE"/qemu-*/.complete 2>/dev/null | head -1 || true)
    [[ -n $qroot ]] || missing "no qemu-system-x86 from bookworm-backports (see $CACHE/apt-qemu.log)"
    qroot=${qroot%/.complete}
  elif [[ ! -e $qroot/.complete ]]; then
    log "unpacking QEMU $qver (bookworm-backports) for L1 into $qroot"
    rm -rf "$qroot"
    mkdir -p "$qroot/debs"
    (cd "$qroot/debs" && apt-get "${apt_opts[@]}" download qemu-system-x86 qemu-system-common qemu-system-data) \
      >>"$CACHE/apt-qemu.log" 2>&1 || missing "apt-get download of QEMU $qver failed (see $CACHE/apt-qemu.log)"
    for deb in "$qroot"/debs/*.deb; do dpkg-deb -x "$deb" "$qroot/root" || missing "unpacking $deb failed"; done
    rm -rf "$qroot/debs"
    "$qroot/root/usr/bin/qemu-system-x86_64" --version >/dev/null ||
      missing "QEMU $qver from bookworm-backports does not run here"
    touch "$qroot/.complete"
  fi
  NESTED_KVM_QEMU=$qroot/root/usr/bin/qemu-system-x86_64
  # Its own modules, not the system QEMU's (a module must match its QEMU).
  export QEMU_MODULE_DIR=$qroot/root/usr/lib/x86_64-linux-gnu/qemu
fi

# --- the run ---------------------------------------------------------------------
# The exchange directory: a host path L1 sees. Not /tmp (an overlay in L1)
# and not /var/{cache,tmp,log} (empty tmpfs there).
xroot=$HOME/.cache/nutshell-nested-kvm
mkdir -p "$xroot"
x=$(mktemp -d "$xroot/run.XXXXXX")
vng_pid=
tail_pid=
watch_pid=
cleanup() {
  [[ -n $vng_pid ]] && kill "$vng_pid" 2>/dev/null || true
  [[ -n $tail_pid ]] && kill "$tail_pid" 2>/dev/null || true
  [[ -n $watch_pid ]] && kill "$watch_pid" 2>/dev/null || true
  rm -rf "$x"
}
trap cleanup EXIT

{
  echo "#!/bin/bash"
  for v in PATH HOME CARGO_HOME RUSTUP_HOME NUTSHELL_REQUIRE_ALL ${NESTED_KVM_ENV:-}; do
    [[ -n ${!v+set} ]] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'x=%q\n' "$x"
  printf 'cd %q || exit 125\n' "$PWD"
  # A missing /dev/kvm is a missing piece (the emulated CPU has no SVM),
  # which the host side reports; the command's status is written last.
  cat <<'EOF'
if ! modprobe kvm_amd >"$x/modprobe.log" 2>&1 || [[ ! -c /dev/kvm ]]; then
  echo nokvm >"$x/status"
  exit 0
fi
# L1's /dev has no static nodes that load their module on first open, as
# a booted host's has: /dev/net/tun (the runtime's taps) appears with tun.
modprobe tun >>"$x/modprobe.log" 2>&1 || true
# L1's symbols (its modules' too), to name where its CPUs are should it stall.
cat /proc/kallsyms >"$x/kallsyms" 2>/dev/null || true
# L1's pulse, which the host watches: a file touched every 5 s of L1's time.
( while :; do : >"$x/heartbeat"; sleep 5; done ) </dev/null >/dev/null 2>&1 &
"$@" >"$x/output" 2>&1 </dev/null
echo $? >"$x/status.new" && mv "$x/status.new" "$x/status"
EOF
} >"$x/inner.sh"
chmod +x "$x/inner.sh"
: >"$x/output"
printf -v exec_line '%q ' "$x/inner.sh" "$@"

PATH="$venv/bin:$PATH" timeout --kill-after=10 "$TIMEOUT_S" vng --run "$kdir/vmlinuz" --disable-kvm \
  ${NESTED_KVM_QEMU:+--qemu "$NESTED_KVM_QEMU"} --cpus "$CPUS" --memory "$MEMORY" --rw --verbose \
  --qemu-opts="-cpu EPYC,+svm,+npt -monitor unix:$x/monitor.sock,server=on,wait=off" --exec "$exec_line" >"$x/console.log" 2>&1 </dev/null &
vng_pid=$!
tail -n +1 -f --pid="$vng_pid" "$x/output" &
tail_pid=$!
# L1 fails in two ways that never recover (issue 11), so L1 is ended at
# the first sign, not at TIMEOUT_S (`timeout` passes the signal to its
# process group: vng and QEMU):
#  - its kernel locks up (both CPUs spinning in KVM's __apic_accept_irq, one
#    delivering an irqfd through the IOAPIC, the other the vCPU's own timer,
#    on QEMU 7.2), and its watchdog says so;
#  - it stalls without a word: its pulse stops, with QEMU busy. Before L1 is
#    ended, QEMU's monitor gives each vCPU's registers, three times a second
#    apart, to say where the emulated CPUs spin.
# hmp CMD...: QEMU's human monitor, spoken in Python (Debian 12 has it in
# every install, and socat not), with RIPs named from L1's kallsyms.
hmp() {
  /usr/bin/python3 - "$x/monitor.sock" "$x/kallsyms" "$@" <<'PY'
import bisect, re, socket, sys, time
syms = []
try:
    for line in open(sys.argv[2]):
        addr, kind, name = line.split()[:3]
        if kind in "tT":
            syms.append((int(addr, 16), name))
except OSError:
    pass
syms.sort()
def name(m):
    rip = int(m.group(1), 16)
    i = bisect.bisect_right(syms, (rip, "~")) - 1
    where = f" <{syms[i][1]}+{rip - syms[i][0]:#x} in L1>" if i >= 0 and rip - syms[i][0] < 0x4000 else ""
    return m.group(0) + where
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
def drain():
    out, end = b"", time.time() + 5
    while time.time() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
        if out.endswith(b"(qemu) "):
            break
    return out.decode(errors="replace")
drain()
for cmd in sys.argv[3:]:
    s.sendall(cmd.encode() + b"\n")
    # The monitor echoes the command, keystroke by keystroke, on one line.
    reply = drain().replace("\r", "").removesuffix("(qemu) ").partition("\n")[2]
    print(f"(qemu) {cmd}")
    reply = re.sub(r"RIP=([0-9a-f]{16})", name, reply)
    sys.stdout.write("".join(l + "\n" for l in reply.splitlines()
                             if not l.startswith(("FPR", "YMM", "XMM", "FCW", "DR"))))
    sys.stdout.flush()
PY
}
(
  while kill -0 "$vng_pid" 2>/dev/null; do
    if grep -q 'BUG: soft lockup' "$x/console.log"; then
      sleep 3 # the rest of the report
      touch "$x/lockup"
      kill -TERM "$vng_pid" 2>/dev/null
      exit 0
    fi
    if [[ -e $x/heartbeat ]] && (($(date +%s) - $(stat -c %Y "$x/heartbeat") > STALL_S)); then
      {
        qemu=$(pgrep -f -- "^[^ ]*qemu-system-x86_64 .*$x/monitor.sock" | head -1 || true)
        [[ -n $qemu ]] && top -H -b -n 1 -p "$qemu" | head -20
        cmds=("info cpus" "info registers -a")
        for ((c = 0; c < CPUS; c++)); do cmds+=("cpu $c" "info lapic"); done
        for i in 1 2 3; do
          echo "--- sample $i"
          hmp "${cmds[@]}" || echo "(QEMU's monitor did not answer)"
          sleep 1
        done
      } >"$x/stall.log" 2>&1
      touch "$x/stalled"
      kill -TERM "$vng_pid" 2>/dev/null
      exit 0
    fi
    sleep 5
  done
) &
watch_pid=$!
wait "$vng_pid" && vng_rc=0 || vng_rc=$?
vng_pid=
wait "$tail_pid" 2>/dev/null || true
tail_pid=
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
watch_pid=

status=$(cat "$x/status" 2>/dev/null || true)
if [[ $status == nokvm ]]; then
  missing "no /dev/kvm in L1 (modprobe kvm_amd: $(tr '\n' ' ' <"$x/modprobe.log"))"
fi
if [[ -e $x/lockup ]]; then
  log "L1's kernel locked up (issue 11), so L1 was ended; its first report:"
  grep -m1 -A40 'BUG: soft lockup' "$x/console.log" | grep -v srso_return_thunk >&2
  exit 125
fi
if [[ -e $x/stalled ]]; then
  log "L1 stalled: no pulse for ${STALL_S}s (issue 11), so L1 was ended; its console's last lines, then its vCPUs:"
  tail -15 "$x/console.log" >&2
  cat "$x/stall.log" >&2
  exit 125
fi
if [[ ! $status =~ ^[0-9]+$ ]]; then
  log "L1 ended (vng status $vng_rc$([[ $vng_rc == 124 ]] && echo ", timed out after ${TIMEOUT_S}s")) before the command finished; its console's last lines:"
  tail -40 "$x/console.log" >&2
  exit 125
fi
if grep -q 'rcu_.*detected stalls\|RCU Stall' "$x/console.log"; then
  log "warning: L1 reported RCU stalls (host under load?)"
fi
exit "$status"
