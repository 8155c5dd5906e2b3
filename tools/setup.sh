#!/usr/bin/env bash
# Sets a fresh Debian 12 machine up for nutshell and runs the main job.
#
#   tools/setup.sh            everything, then a container in a microVM
#   tools/setup.sh --deps     only what the tests need (used by tools/test.sh)
#
# Idempotent: each step skips what is already in place. Heavy artifacts are
# cached outside the clone under $NUTSHELL_CACHE (default /var/cache/nutshell),
# keyed by their inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=all
case "${1:-}" in
  --deps) MODE=deps ;;
  "") ;;
  *) echo "usage: $0 [--deps]" >&2; exit 2 ;;
esac

export NUTSHELL_CACHE=${NUTSHELL_CACHE:-/var/cache/nutshell}
step() { printf '\n==> %s\n' "$*"; }

APT_PACKAGES=(
  # build
  build-essential pkg-config protobuf-compiler
  # guest kernel
  linux-source-6.1 bc flex bison libelf-dev libssl-dev cpio
  # test rootfs and images
  busybox-static umoci skopeo e2fsprogs erofs-utils
  # VM backends
  qemu-system-x86 libseccomp-dev libcap-ng-dev
  # containerd and friends
  containerd containernetworking-plugins iproute2 procps psmisc
)

step "apt packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "all ${#APT_PACKAGES[@]} present"
fi

# Further steps (vhost-user backends, guest image, shim, containerd config,
# the main job) are added by the pieces that need them.
echo "setup ($MODE) done"
