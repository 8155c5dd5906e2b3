#!/usr/bin/env bash
# Boot benchmark of the real guest under QEMU or nutshell-vmm through
# nutshell-runtime:
# boot to agent-ready (p50 over N boots), guest memory in use at agent-ready
# (GuestDetails MemTotal - MemAvailable), host RSS/PSS of the VM's process
# tree (QEMU + vhost-device-vsock [+ virtiofsd], or nutshell-vmm
# [+ virtiofsd]), shutdown time.
#
#   tools/bench/boot.sh [--backend qemu|vmm] [--boots N] [--accel tcg|kvm|auto] [--memory MIB] [--shared]
#                       [--guest-dir DIR]
#
# Needs root, the installed guest image (tools/lib/paths.sh) and the VM
# backends (tools/setup.sh). Targets (issue 3): boot p50 <= 2 s wall under
# TCG, guest memory in use <= 32 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tools/lib/paths.sh
source tools/lib/paths.sh
# PROFILE=release for figures worth comparing; BUILD=0 when built already.
profile=${PROFILE:-debug}
[[ ${BUILD:-1} == 0 ]] ||
  cargo build -q --profile "$([[ $profile == debug ]] && echo dev || echo "$profile")" \
    -p nutshell-runtime --example boot-bench
echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); qemu: $(qemu-system-x86_64 --version | head -1)"
echo "guest: $(cat "$NUTSHELL_GUEST_DIR/VERSION" 2>/dev/null || echo '?')"
exec "target/$profile/examples/boot-bench" "$@"
