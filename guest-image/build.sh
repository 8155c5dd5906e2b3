#!/usr/bin/env bash
# The one build command for the guest image: kernel, agent, initramfs.
#
#   guest-image/build.sh [--install] [--agent PATH] [--kernel-only]
#
#   --install      copy the result to $NUTSHELL_GUEST_DIR (tools/lib/paths.sh)
#                  (vmlinux, initramfs.cpio.gz, initramfs-debug.cpio.gz, VERSION)
#   --agent PATH   use this static agent instead of building it
#                  (tools/build-agent.sh); $NUTSHELL_AGENT_BIN does the same
#   --kernel-only  build (or find in the cache) the kernel and stop
#
# Each part is cached under ${NUTSHELL_CACHE:-/var/cache/nutshell} by the
# hash of its inputs (see README.md): a second run, or a run after only the
# agent changed, does not rebuild the kernel. The result is written to
# $NUTSHELL_CACHE/guest/<kernelrelease>-<kernelkey12>-<initramfskey12>/,
# printed on the last line.
set -euo pipefail
source "$(dirname "$0")/common.sh"
REPO=$(cd "$GUEST_IMAGE_DIR/.." && pwd)

INSTALL=0 KERNEL_ONLY=0 AGENT=${NUTSHELL_AGENT_BIN:-}
while (($#)); do
  case $1 in
    --install) INSTALL=1 ;;
    --agent) AGENT=${2:?--agent needs a path}; shift ;;
    --kernel-only) KERNEL_ONLY=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

build_agent() {
  step "agent: building the static nutshell-agent"
  if [[ -x $REPO/tools/build-agent.sh ]]; then
    "$REPO/tools/build-agent.sh" | tail -1
  else
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --target x86_64-unknown-linux-gnu -p nutshell-agent >&2)
    echo "$REPO/target/x86_64-unknown-linux-gnu/release/nutshell-agent"
  fi
}

# Replaces each file in one rename, so a VM starting meanwhile never reads
# half a kernel.
install_to() {
  local from=$1 to=$2 f
  mkdir -p "$to"
  for f in vmlinux initramfs.cpio.gz initramfs-debug.cpio.gz VERSION; do
    cp "$from/$f" "$to/.$f.tmp"
    chmod 0644 "$to/.$f.tmp"
    mv -f "$to/.$f.tmp" "$to/$f"
  done
  step "installed into $to"
}

main() {
  local t0=$SECONDS kdir idir
  kdir=$("$GUEST_IMAGE_DIR/kernel.sh" | tail -1)
  ((KERNEL_ONLY)) && { echo "$kdir"; return; }
  [[ -n $AGENT ]] || AGENT=$(build_agent)
  idir=$("$GUEST_IMAGE_DIR/initramfs.sh" "$kdir" "$AGENT" | tail -1)

  local release out
  release=$(cat "$kdir/kernelrelease")
  out=$NUTSHELL_CACHE/guest/$release-$(basename "$kdir" | cut -c1-12)-$(basename "$idir" | cut -c1-12)
  if [[ ! -f $out/VERSION ]]; then
    local tmp
    mkdir -p "$NUTSHELL_CACHE/guest"
    tmp=$(mktemp -d "$NUTSHELL_CACHE/guest/.tmp.XXXXXX")
    cp "$kdir/vmlinux" "$idir/initramfs.cpio.gz" "$idir/initramfs-debug.cpio.gz" "$tmp/"
    {
      echo "kernel $release"
      echo "source $KERNEL_PACKAGE $(kernel_package_version)"
      echo "kernel-key $(basename "$kdir")"
      echo "initramfs-key $(basename "$idir")"
      echo "agent-sha256 $(cat "$idir/agent.sha256")"
      (cd "$tmp" && sha256sum vmlinux initramfs.cpio.gz initramfs-debug.cpio.gz)
    } >"$tmp/VERSION"
    chmod 0755 "$tmp"
    rm -rf "$out"
    mv "$tmp" "$out"
  fi
  ln -sfn "$(basename "$out")" "$NUTSHELL_CACHE/guest/latest"
  step "guest image: $out ($((SECONDS - t0)) s)"
  info "vmlinux $(stat -c %s "$out/vmlinux") bytes, initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, debug initramfs $(stat -c %s "$out/initramfs-debug.cpio.gz") bytes"
  ((INSTALL)) && install_to "$out" "$NUTSHELL_GUEST_DIR"
  echo "$out"
}

main
