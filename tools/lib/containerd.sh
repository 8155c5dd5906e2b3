# shellcheck shell=bash
# A private containerd 1.6 with the nutshell runtime, for the main job
# (tools/setup.sh) and the benchmark (tools/bench/containerd.sh). Sourced.
#
# It never touches the machine's containerd: its own root, state, socket and
# config live under $NS_CTRD_DIR. Its CRI plugin keeps runc as the default
# runtime (containerd refuses a CRI config whose default runtime is missing)
# and adds the handler `nutshell`; restrict_oom_score_adj because these
# machines lack CAP_SYS_RESOURCE (docs: environment.md).
#
#   ns_containerd_start DIR   start it, import busybox + pause images
#   ns_ctr ARGS...            ctr against it (namespace "nutshell")
#   ns_containerd_stop        stop it and remove DIR
#
# Images are built offline from busybox-static with umoci and imported as
# docker.io/nutshell/busybox:latest and docker.io/nutshell/pause:latest.

NS_BUSYBOX_IMAGE=docker.io/nutshell/busybox:latest
NS_PAUSE_IMAGE=docker.io/nutshell/pause:latest
NS_CTRD_DIR=
NS_CTRD_PID=

ns_ctr() {
  ctr --address "$NS_CTRD_DIR/containerd.sock" --namespace nutshell "$@"
}

# ns_build_image WORKDIR TAR CMD...: a busybox rootfs image whose command is CMD.
ns_build_image() {
  local work=$1 tar=$2; shift 2
  local layout=$work/layout bundle=$work/bundle applet
  rm -rf "$work"; mkdir -p "$work"
  umoci init --layout "$layout"
  umoci new --image "$layout:latest"
  umoci unpack --image "$layout:latest" "$bundle" >/dev/null
  mkdir -p "$bundle"/rootfs/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,var}
  cp /bin/busybox "$bundle/rootfs/bin/busybox"
  while IFS= read -r applet; do
    [[ -z $applet || $applet == bin/busybox || -e $bundle/rootfs/$applet ]] && continue
    mkdir -p "$bundle/rootfs/$(dirname "$applet")"
    ln -s /bin/busybox "$bundle/rootfs/$applet"
  done < <(/bin/busybox --list-full)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$bundle/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$bundle/rootfs/etc/group"
  umoci repack --image "$layout:latest" "$bundle"
  local args=(--config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin) c
  for c in "$@"; do args+=(--config.cmd "$c"); done
  umoci config --image "$layout:latest" "${args[@]}"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$tar" .
  rm -rf "$work"
}

ns_containerd_config() {
  local d=$1
  cat <<EOF
version = 2
root = "$d/root"
state = "$d/state"

[grpc]
  address = "$d/containerd.sock"

[ttrpc]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$NS_PAUSE_IMAGE"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nutshell]
      runtime_type = "io.containerd.nutshell.v2"
      pod_annotations = ["io.nutshell.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni"
EOF
}

ns_containerd_start() {
  NS_CTRD_DIR=$1
  rm -rf "$NS_CTRD_DIR"
  mkdir -p "$NS_CTRD_DIR/images" "$NS_CTRD_DIR/cni"
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
  ns_build_image "$NS_CTRD_DIR/images/bb" "$NS_CTRD_DIR/images/busybox.tar" sh
  ns_build_image "$NS_CTRD_DIR/images/pause" "$NS_CTRD_DIR/images/pause.tar" sleep inf
  ns_ctr images import --base-name "${NS_BUSYBOX_IMAGE%:*}" "$NS_CTRD_DIR/images/busybox.tar" >/dev/null
  ns_ctr images import --base-name "${NS_PAUSE_IMAGE%:*}" "$NS_CTRD_DIR/images/pause.tar" >/dev/null
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
