#!/usr/bin/env bash
# The busybox test rootfs and images, built offline from busybox-static (no
# registry is reachable): the one recipe for the test harness (tests/src/)
# and for tools/lib/containerd.sh (the main job, the benchmark).
#
#   test-images.sh rootfs DIR        fill DIR with a busybox root filesystem:
#                                    /bin/busybox with a link per applet, the
#                                    usual empty mount points, /etc/passwd and
#                                    /etc/group with root and nobody, and a
#                                    page for `httpd -h /www`: /www/index.html
#                                    saying $NS_WWW_PAGE
#   test-images.sh build             build (or find in the cache) two OCI
#                                    archives of that rootfs, busybox.tar
#                                    (command sh) and pause.tar (sleep inf),
#                                    and engine.tar, the busybox image as a
#                                    docker-archive named $NS_ENGINE_IMAGE
#                                    (`docker load`, `podman load`); print
#                                    their directory
#   test-images.sh import ADDRESS NAMESPACE...
#                                    build, then import both into the
#                                    containerd at ADDRESS, in each NAMESPACE,
#                                    as $NS_BUSYBOX_IMAGE and $NS_PAUSE_IMAGE
#
# The archives are cached in $NUTSHELL_CACHE/test-images/<key>, keyed by
# busybox and by this file, so every user shares them and a change here
# rebuilds them. Sourced, it defines the names and the ns_* functions below.

# Fully qualified: ctr and the CRI plugin resolve no short names offline.
NS_BUSYBOX_IMAGE=docker.io/nutshell/busybox:latest
NS_PAUSE_IMAGE=docker.io/nutshell/pause:latest
# Docker and Podman (tests/src/engines.rs, tools/bench/engines.sh): under
# localhost/, which neither engine tries to pull from a registry.
NS_ENGINE_IMAGE=localhost/nutshell-test/busybox:latest
# What `httpd -f -p 80 -h /www` serves from every test image.
NS_WWW_PAGE=served-by-the-nutshell-test-image

NS_BUSYBOX_BIN=/bin/busybox

# Each function returns non-zero at its first failure, whether or not the
# caller runs under `set -e` (which command substitutions do not inherit).

# ns_busybox_rootfs DIR
ns_busybox_rootfs() {
  local dir=$1 applet list
  mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,var} &&
    cp "$NS_BUSYBOX_BIN" "$dir/bin/busybox" &&
    list=$("$NS_BUSYBOX_BIN" --list-full) || return 1
  while IFS= read -r applet; do
    [[ -z $applet || $applet == bin/busybox || -e $dir/$applet || -L $dir/$applet ]] && continue
    [[ $applet != */* || -d $dir/${applet%/*} ]] || mkdir -p "$dir/${applet%/*}" || return 1
    ln -s /bin/busybox "$dir/$applet" || return 1
  done <<<"$list"
  mkdir -p "$dir/www" && echo "$NS_WWW_PAGE" >"$dir/www/index.html" || return 1
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$dir/etc/passwd" &&
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
}

# ns_oci_archive WORKDIR TAR CMD...: an OCI archive holding one image, tag
# latest, of the busybox rootfs, whose command is CMD. With $NS_DOCKER_NAME
# set, TAR is a docker-archive of the image under that name instead.
ns_oci_archive() {
  local work=$1 tar=$2 c
  shift 2
  local layout=$work/layout bundle=$work/bundle
  local args=(--config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin)
  for c in "$@"; do args+=(--config.cmd "$c"); done
  rm -rf "$work" &&
    umoci init --layout "$layout" &&
    umoci new --image "$layout:latest" &&
    umoci unpack --image "$layout:latest" "$bundle" >/dev/null &&
    ns_busybox_rootfs "$bundle/rootfs" &&
    umoci repack --image "$layout:latest" "$bundle" &&
    umoci config --image "$layout:latest" "${args[@]}" &&
    umoci gc --layout "$layout" &&
    if [[ -n ${NS_DOCKER_NAME:-} ]]; then
      skopeo --insecure-policy copy -q "oci:$layout:latest" "docker-archive:$tar:$NS_DOCKER_NAME"
    else
      tar -C "$layout" -cf "$tar" .
    fi &&
    rm -rf "$work"
}

# ns_test_images: prints the directory holding busybox.tar, pause.tar and
# engine.tar.
ns_test_images() {
  local key dir tmp
  key=$(cat "$NS_BUSYBOX_BIN" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16) || return 1
  dir=${NUTSHELL_CACHE:-/var/cache/nutshell}/test-images/$key
  if [[ ! -f $dir/busybox.tar || ! -f $dir/pause.tar || ! -f $dir/engine.tar ]]; then
    tmp=$dir.tmp-$$
    rm -rf "$tmp" && mkdir -p "$tmp" || return 1
    # The sandbox process only has to live as long as the pod.
    if ! { ns_oci_archive "$tmp/busybox" "$tmp/busybox.tar" sh &&
      ns_oci_archive "$tmp/pause" "$tmp/pause.tar" sleep inf &&
      NS_DOCKER_NAME=$NS_ENGINE_IMAGE ns_oci_archive "$tmp/engine" "$tmp/engine.tar" sh; } >&2; then
      rm -rf "$tmp"
      return 1
    fi
    # Another user may have won the race: either copy is fine.
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
  fi
  echo "$dir"
}

# ns_test_images_import ADDRESS NAMESPACE...
ns_test_images_import() {
  local address=$1 dir ns
  shift
  dir=$(ns_test_images) || return 1
  for ns in "$@"; do
    ctr --address "$address" --namespace "$ns" images import \
      --base-name "${NS_BUSYBOX_IMAGE%:*}" "$dir/busybox.tar" >/dev/null &&
      ctr --address "$address" --namespace "$ns" images import \
        --base-name "${NS_PAUSE_IMAGE%:*}" "$dir/pause.tar" >/dev/null || return 1
  done
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    rootfs) ns_busybox_rootfs "${2:?rootfs needs a directory}" ;;
    build) ns_test_images ;;
    import) shift; ns_test_images_import "${1:?import needs an address}" "${@:2}" ;;
    *) sed -n '6,22p' "$0" >&2; exit 2 ;;
  esac
fi
