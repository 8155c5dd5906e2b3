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

# missing_packages NAME...: sets `missing` to those of NAME not installed.
missing_packages() {
  local p
  missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}

step "apt packages"
missing_packages "${APT_PACKAGES[@]}"
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "all ${#APT_PACKAGES[@]} present"
fi

# Docker and Podman, for the engine tests (tests/tests/engine_*.rs) and
# tools/bench/engines.sh, which start private instances of their own. The
# packages' maintainer scripts would enable and start the machine's
# dockerd and podman services: a policy-rc.d that denies every start covers
# the install (unless the machine has one already), and the units are
# disabled afterwards, so nothing runs or starts at boot because of this.
ENGINE_PACKAGES=(podman docker.io)
ENGINE_UNITS=(docker.service docker.socket podman.service podman.socket
  podman-restart.service podman-auto-update.service podman-auto-update.timer)
step "container engines: ${ENGINE_PACKAGES[*]}"
missing_packages "${ENGINE_PACKAGES[@]}"
if ((${#missing[@]})); then
  policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# tools/setup.sh, while it installs %s\nexit 101\n' "${missing[*]}" >"$policy"
    chmod 0755 "$policy"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    { [[ -z $policy ]] || rm -f "$policy"; exit 1; }
  [[ -z $policy ]] || rm -f "$policy"
  # Offline too: systemctl edits the links without a running systemd.
  systemctl disable --quiet "${ENGINE_UNITS[@]}" 2>/dev/null || true
  if [[ -d /run/systemd/system ]]; then
    systemctl stop "${ENGINE_UNITS[@]}" 2>/dev/null || true
  fi
  [[ ! -e /etc/init.d/docker ]] || update-rc.d docker disable >/dev/null 2>&1 || true
else
  echo "${ENGINE_PACKAGES[*]} present"
fi

# The vhost-user backends QEMU needs (vsock and virtio-fs) come from
# crates.io and take minutes to compile on two cores, so they build in the
# background, niced, while the agent and the guest kernel build.
CARGO_TOOLS=(
  "vhost-device-vsock 0.3.0"
  "virtiofsd 1.14.0"
)
# The test command fuzzes the VMM's guest-facing parsers with cargo-fuzz,
# which runs on nightly: wherever a nightly toolchain exists (rustup cannot
# fetch one here, only crates.io is reachable), install it too. A machine
# without nightly is the one case the fuzz step may skip.
if cargo +nightly --version >/dev/null 2>&1; then
  CARGO_TOOLS+=("cargo-fuzz 0.13.2")
else
  echo "note: no nightly toolchain: cargo-fuzz is not installed and the fuzz step will skip"
fi
CARGO_ROOT=/usr/local
cargo_tool_present() { # name version
  [[ -x $CARGO_ROOT/bin/$1 ]] && grep -qF "\"$1 $2 " "$CARGO_ROOT/.crates.toml" 2>/dev/null
}
cargo_tool_pids=()
# A failing later step must not leave installs running on their own.
stop_cargo_tools() {
  local entry
  for entry in "${cargo_tool_pids[@]}"; do kill "${entry%%:*}" 2>/dev/null || true; done
}
trap stop_cargo_tools EXIT
step "cargo tools: ${CARGO_TOOLS[*]}"
mkdir -p "$NUTSHELL_CACHE/logs"
for tool in "${CARGO_TOOLS[@]}"; do
  read -r name version <<<"$tool"
  if cargo_tool_present "$name" "$version"; then
    echo "$name $version present"
    continue
  fi
  echo "$name $version: cargo install in the background (log: $NUTSHELL_CACHE/logs/cargo-install-$name.log)"
  CARGO_TARGET_DIR=$NUTSHELL_CACHE/cargo-install/$name nice -n 10 \
    cargo install --locked --root "$CARGO_ROOT" --version "$version" "$name" \
    >"$NUTSHELL_CACHE/logs/cargo-install-$name.log" 2>&1 &
  cargo_tool_pids+=("$!:$name")
done

step "agent (static)"
if [[ -x tools/build-agent.sh ]]; then
  AGENT_BIN=$(tools/build-agent.sh | tail -1)
else
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu -p nutshell-agent
  AGENT_BIN=$PWD/target/x86_64-unknown-linux-gnu/release/nutshell-agent
fi
echo "$AGENT_BIN"

step "guest image (kernel cached under $NUTSHELL_CACHE/kernel)"
guest-image/build.sh --install --agent "$AGENT_BIN"

for entry in "${cargo_tool_pids[@]}"; do
  name=${entry#*:}
  step "cargo tools: waiting for $name"
  if ! wait "${entry%%:*}"; then
    tail -30 "$NUTSHELL_CACHE/logs/cargo-install-$name.log" >&2
    echo "cargo install $name failed" >&2
    exit 1
  fi
  echo "$CARGO_ROOT/bin/$name"
done
cargo_tool_pids=()

# ---------------------------------------------------------------------------
# containerd-shim-nutshell-v2 (and nutshell-vmm, its backend wherever KVM
# can run Linux), its config, containerd, and the main job
# (issue 4). The machine's own containerd config is never overwritten: the
# nutshell runtime goes into a drop-in, and the main job runs on a private
# containerd (own root, state and socket), so nothing of the machine's is
# restarted.
if [[ $MODE == all ]]; then
  step "binaries: containerd-shim-nutshell-v2, nutshell-vmm, nutshell, nutshell-runc -> /usr/local/bin"
  cargo build --release -p nutshell-runtime --bin containerd-shim-nutshell-v2 \
    -p nutshell-vmm --bin nutshell-vmm -p nutshell --bin nutshell -p nutshell-runc --bin nutshell-runc
  for bin in containerd-shim-nutshell-v2 nutshell-vmm nutshell nutshell-runc; do
    install -m 0755 "target/release/$bin" "/usr/local/bin/$bin"
  done

  step "nutshell config"
  if [[ -e /etc/nutshell/config.toml ]]; then
    echo "/etc/nutshell/config.toml exists: kept as it is"
  else
    install -D -m 0644 runtime/config/default.toml /etc/nutshell/config.toml
    echo "installed /etc/nutshell/config.toml (the built-in default)"
  fi

  step "warm pool: the nutshell-pool systemd unit, installed disabled"
  install -D -m 0644 tools/systemd/nutshell-pool.service /etc/systemd/system/nutshell-pool.service
  echo "installed /etc/systemd/system/nutshell-pool.service; it keeps [pool] warm VMs booted"
  echo "(host memory while they wait): systemctl enable --now nutshell-pool, or run nutshell pool"

  step "containerd: a drop-in with the nutshell runtime for the machine's containerd"
  mkdir -p /etc/containerd/conf.d
  # shellcheck source=tools/lib/containerd.sh
  source tools/lib/containerd.sh
  ns_containerd_dropin >/etc/containerd/conf.d/nutshell.toml
  echo "wrote /etc/containerd/conf.d/nutshell.toml"
  if [[ ! -e /etc/containerd/config.toml ]]; then
    printf 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n' >/etc/containerd/config.toml
    echo "created /etc/containerd/config.toml (there was none): it imports /etc/containerd/conf.d/*.toml"
  elif grep -q 'conf\.d/\*\.toml' /etc/containerd/config.toml; then
    echo "/etc/containerd/config.toml already imports /etc/containerd/conf.d/*.toml"
  else
    echo "NOTE: /etc/containerd/config.toml is yours and was left untouched. For the machine's"
    echo "      containerd to offer nutshell, add as its first line:"
    echo "        imports = [\"/etc/containerd/conf.d/*.toml\"]"
    echo "      and restart containerd. The main job below does not need that."
  fi

  step "main job: a busybox container in a microVM, through containerd"
  trap ns_containerd_stop EXIT
  ns_containerd_start /run/nutshell-main-job
  guest=$(ns_ctr run --rm --runtime io.containerd.nutshell.v2 \
    "$NS_BUSYBOX_IMAGE" nutshell-main-job uname -r </dev/null)
  ns_containerd_stop
  trap - EXIT
  echo
  echo "  kernel inside the nutshell microVM: $guest"
  echo "  kernel of this host:                $(uname -r)"
fi

echo "setup ($MODE) done"
