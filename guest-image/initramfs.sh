#!/usr/bin/env bash
# Builds the initramfs from the static agent, without root:
#   initramfs.cpio.gz        /init (the agent), /dev, /dev/console
#   initramfs-debug.cpio.gz  the same plus a static busybox and its applet
#                            links, for a shell (boot with rdinit=/bin/sh)
# into $NUTSHELL_CACHE/initramfs/<key>/, where <key> is the sha256 of the
# agent, busybox, the source package version (gen_init_cpio comes from it)
# and this script. Prints that directory on its last line.
#
#   initramfs.sh KERNEL_DIR AGENT_BINARY
#
# KERNEL_DIR is kernel.sh's output (for gen_init_cpio). This is the fast path
# when only the agent changed: no kernel rebuild.
set -euo pipefail
source "$(dirname "$0")/common.sh"

BUSYBOX=${BUSYBOX:-/bin/busybox}

# Writes gen_init_cpio's file list. Sorted, owned by root, and given one
# mtime (gen_init_cpio -t), so the archive depends only on its inputs.
file_list() {
  local agent=$1 debug=$2 busybox=$3
  echo "dir /dev 0755 0 0"
  # The kernel opens /dev/console as PID 1's stdin/stdout/stderr before it
  # runs /init; without the node the agent would start with no output.
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "file /init $agent 0755 0 0"
  if [[ $debug == 1 ]]; then
    local dirs=() links=() applet
    while IFS= read -r applet; do
      [[ -z $applet || $applet == bin/busybox ]] && continue
      [[ $applet == */* ]] && dirs+=("/${applet%/*}")
      links+=("slink /$applet /bin/busybox 0777 0 0")
    done < <("$BUSYBOX" --list-full)
    echo "dir /bin 0755 0 0"
    printf 'dir %s 0755 0 0\n' $(printf '%s\n' "${dirs[@]}" /usr | sort -u | grep -vx /bin)
    echo "file /bin/busybox $busybox 0755 0 0"
    printf '%s\n' "${links[@]}" | sort -u
  fi
}

# A dynamically linked agent would die at once: the image has no libc.
check_static() {
  local bin=$1
  [[ -f $bin ]] || die "agent binary $bin not found (build it: tools/build-agent.sh)"
  if readelf -lW "$bin" 2>/dev/null | grep -q 'INTERP'; then
    die "$bin is dynamically linked; the initramfs needs a static binary (RUSTFLAGS='-C target-feature=+crt-static')"
  fi
}

main() {
  (($# == 2)) || die "usage: $0 KERNEL_DIR AGENT_BINARY"
  local kdir=$1 agent=$2
  [[ -x $kdir/gen_init_cpio ]] || die "$kdir/gen_init_cpio missing: run kernel.sh first"
  check_static "$agent"
  [[ -x $BUSYBOX ]] || die "$BUSYBOX missing (apt-get install busybox-static)"
  check_static "$BUSYBOX"
  reproducible_env

  local key dir
  key=$({
    echo "package $KERNEL_PACKAGE $(kernel_package_version) epoch $SOURCE_DATE_EPOCH"
    echo "agent $(sha256 "$agent")"
    echo "busybox $(sha256 "$BUSYBOX")"
    echo "script $(sha256 "$GUEST_IMAGE_DIR/initramfs.sh") $(sha256 "$GUEST_IMAGE_DIR/common.sh")"
  } | sha256sum | cut -d' ' -f1)
  dir=$NUTSHELL_CACHE/initramfs/$key
  if [[ -f $dir/initramfs.cpio.gz && -f $dir/initramfs-debug.cpio.gz ]]; then
    step "initramfs: cached ($dir)"
    echo "$dir"
    return
  fi
  step "initramfs: agent $(sha256 "$agent" | cut -c1-12) ($(du -h "$agent" | cut -f1))"
  local tmp
  mkdir -p "$NUTSHELL_CACHE/initramfs"
  tmp=$(mktemp -d "$NUTSHELL_CACHE/initramfs/.tmp.XXXXXX")
  chmod 0755 "$tmp"
  # Debug sections only make the image bigger; the symbol table stays so
  # that a panic's backtrace still names functions.
  strip --strip-debug -o "$tmp/init" "$agent"
  cp "$BUSYBOX" "$tmp/busybox"
  # gen_init_cpio -t covers directories, nodes and links; regular files keep
  # their own mtime.
  touch -d "@$SOURCE_DATE_EPOCH" "$tmp/init" "$tmp/busybox"
  local variant name
  for variant in 0 1; do
    name=initramfs.cpio.gz
    [[ $variant == 1 ]] && name=initramfs-debug.cpio.gz
    file_list "$tmp/init" "$variant" "$tmp/busybox" >"$tmp/${name%.cpio.gz}.list"
    "$kdir/gen_init_cpio" -t "$SOURCE_DATE_EPOCH" "$tmp/${name%.cpio.gz}.list" | gzip -n -9 >"$tmp/$name"
    info "$name: $(stat -c %s "$tmp/$name") bytes"
  done
  sha256 "$agent" >"$tmp/agent.sha256"
  rm -f "$tmp/init" "$tmp/busybox"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  echo "$dir"
}

main "$@"
