# shellcheck shell=bash
# A private containerd 1.6 with the nutshell runtime, for the main job
# (tools/setup.sh) and the benchmark (tools/bench/containerd.sh). Sourced.
#
# It never touches the machine's containerd: its own root, state, socket and
# config live under $NS_CTRD_DIR. Its config (containerd-config.toml) and its
# images (test-images.sh) are the test harness's too (tests/src/containerd.rs).
#
#   ns_containerd_start DIR   start it, import the busybox and pause images
#                             ($NS_BUSYBOX_IMAGE, $NS_PAUSE_IMAGE)
#   ns_ctr ARGS...            ctr against it (namespace "nutshell")
#   ns_containerd_stop        stop it and remove DIR
#   ns_containerd_dropin      print the drop-in that adds the nutshell runtime
#                             to a containerd (tools/setup.sh)

NS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/lib/test-images.sh
source "$NS_LIB_DIR/test-images.sh"
NS_CTRD_DIR=
NS_CTRD_PID=

ns_ctr() {
  ctr --address "$NS_CTRD_DIR/containerd.sock" --namespace nutshell "$@"
}

# An empty ConfigPath leaves the choice to the shim, as for `ctr run`:
# $NUTSHELL_CONFIG, else /etc/nutshell/config.toml, else the built-in default.
ns_containerd_config() {
  sed -e "s|@DIR@|$1|g" -e "s|@PAUSE_IMAGE@|$NS_PAUSE_IMAGE|g" \
    -e "s|@NUTSHELL_CONFIG@||g" -e "s|@LOG_LEVEL@|info|g" "$NS_LIB_DIR/containerd-config.toml"
}

ns_containerd_dropin() {
  echo "# The nutshell runtime (written by nutshell's tools/setup.sh). Takes effect"
  echo "# when /etc/containerd/config.toml imports /etc/containerd/conf.d/*.toml."
  echo "version = 2"
  sed -n '/^# >>> the nutshell runtime$/,/^# <<< the nutshell runtime$/{/^# [<>]\{3\} /d;p}' \
    "$NS_LIB_DIR/containerd-config.toml"
}

ns_containerd_start() {
  NS_CTRD_DIR=$1
  rm -rf "$NS_CTRD_DIR"
  mkdir -p "$NS_CTRD_DIR/cni"
  ns_containerd_config "$NS_CTRD_DIR" >"$NS_CTRD_DIR/config.toml"
  # $NS_SHIM_DIR (optional) puts another containerd-shim-nutshell-v2 first.
  PATH=${NS_SHIM_DIR:+$NS_SHIM_DIR:}$PATH \
    containerd --config "$NS_CTRD_DIR/config.toml" >"$NS_CTRD_DIR/containerd.log" 2>&1 &
  NS_CTRD_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [[ -S $NS_CTRD_DIR/containerd.sock ]] && ns_ctr version >/dev/null 2>&1 && break
    kill -0 "$NS_CTRD_PID" 2>/dev/null || { tail -20 "$NS_CTRD_DIR/containerd.log" >&2; return 1; }
    sleep 0.1
  done
  ns_ctr version >/dev/null || { echo "containerd did not answer" >&2; return 1; }
  ns_test_images_import "$NS_CTRD_DIR/containerd.sock" nutshell
}

ns_containerd_stop() {
  [[ -n $NS_CTRD_DIR ]] || return 0
  local id
  for id in $(ns_ctr tasks list -q 2>/dev/null); do
    ns_ctr tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    ns_ctr tasks delete -f "$id" >/dev/null 2>&1 || true
  done
  for id in $(ns_ctr containers list -q 2>/dev/null); do
    ns_ctr containers delete "$id" >/dev/null 2>&1 || true
  done
  if [[ -n $NS_CTRD_PID ]]; then
    kill "$NS_CTRD_PID" 2>/dev/null || true
    wait "$NS_CTRD_PID" 2>/dev/null || true
  fi
  # Snapshots are unmounted with their tasks; anything left goes lazily.
  grep -o " $NS_CTRD_DIR[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$NS_CTRD_DIR"
  NS_CTRD_DIR= NS_CTRD_PID=
}
