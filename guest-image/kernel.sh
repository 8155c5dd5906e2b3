#!/usr/bin/env bash
# Builds the guest kernel (vmlinux) from Debian's linux-source-6.1 on
# `make tinyconfig` plus the fragments in config/, and caches it under
#   $NUTSHELL_CACHE/kernel/<key>/{vmlinux,config,kernelrelease,gen_init_cpio,build.log}
# where <key> is the sha256 of the fragments, the source package version and
# this script. Prints that directory on its last line. A cached key is not
# rebuilt. Usually run through build.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"

# The lines of a fragment that set something: CONFIG_X=... and
# "# CONFIG_X is not set".
config_lines() {
  grep -hE '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$@" || true
}

kernel_key() {
  {
    echo "package $KERNEL_PACKAGE $(kernel_package_version)"
    # The options, not the comments: rewording a fragment's explanation
    # must not cost a kernel build.
    for f in "$GUEST_IMAGE_DIR"/config/*.config; do
      echo "fragment $(basename "$f") $(config_lines "$f" | sha256sum | cut -d' ' -f1)"
    done
    echo "script $(sha256 "$GUEST_IMAGE_DIR/kernel.sh") $(sha256 "$GUEST_IMAGE_DIR/common.sh")"
  } | sha256sum | cut -d' ' -f1
}

# Every option a fragment asks for must survive olddefconfig: Kconfig drops
# an option whose dependencies are unmet without a word.
verify_config() {
  local config=$1 missing=() line sym
  while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
      grep -qxF "$line" "$config" || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$config" || echo absent))")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      sym=${BASH_REMATCH[1]}
      if grep -qE "^$sym=" "$config"; then missing+=("$line (got: $(grep -E "^$sym=" "$config"))"); fi
    fi
  done < <(config_lines "$GUEST_IMAGE_DIR"/config/*.config)
  if ((${#missing[@]})); then
    printf 'error: %d requested kernel option(s) did not survive olddefconfig (unmet dependencies?):\n' "${#missing[@]}" >&2
    printf '  %s\n' "${missing[@]}" >&2
    return 1
  fi
}

# Kbuild's one line per object is too much for a terminal and too little to
# debug: keep it all in the log and show a count every few seconds.
make_with_progress() {
  local log=$1; shift
  local start=$SECONDS n=0 last=$SECONDS line
  set +e
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    n=$(grep -cE '^  (CC|AS|LD|AR)' "$log" || true)
    if ((SECONDS - last >= 15)); then
      info "make: $n objects, $((SECONDS - start)) s"
      last=$SECONDS
    fi
  done
  wait "$pid"
  local rc=$?
  set -e
  if ((rc != 0)); then
    grep -E 'error|Error' "$log" | head -20 >&2 || true
    tail -30 "$log" >&2
    die "kernel build failed (rc $rc); full log: $log"
  fi
  info "make: done in $((SECONDS - start)) s"
}

main() {
  [[ -f $KERNEL_TARBALL ]] || die "$KERNEL_TARBALL missing (apt-get install $KERNEL_PACKAGE)"
  reproducible_env
  local version key dir
  version=$(kernel_package_version)
  key=$(kernel_key)
  dir=$NUTSHELL_CACHE/kernel/$key
  mkdir -p "$NUTSHELL_CACHE/kernel"
  # Two builds of one key (setup in CI and a developer) wait for each other.
  exec 9>"$dir.lock"
  flock 9
  if [[ -f $dir/vmlinux && -f $dir/kernelrelease && -x $dir/gen_init_cpio ]]; then
    step "kernel: cached ($dir)"
    echo "$dir"
    return
  fi

  local src=$NUTSHELL_CACHE/kernel/src/$KERNEL_PACKAGE-$version
  if [[ ! -f $src/.extracted ]]; then
    step "kernel: extracting $KERNEL_TARBALL ($version)"
    rm -rf "$src" && mkdir -p "$src"
    tar -xf "$KERNEL_TARBALL" -C "$src" --strip-components=1
    touch "$src/.extracted"
  fi

  local out=$dir/build
  rm -rf "$dir" && mkdir -p "$out"
  local mk=(make -C "$src" O="$out" -s)
  step "kernel: tinyconfig + $(ls "$GUEST_IMAGE_DIR"/config/*.config | xargs -n1 basename | tr '\n' ' ')"
  "${mk[@]}" tinyconfig >/dev/null
  # Later assignments override earlier ones (Kconfig warns "override"); the
  # fragments come after tinyconfig's, in file-name order.
  cat "$GUEST_IMAGE_DIR"/config/*.config >>"$out/.config"
  "${mk[@]}" olddefconfig >/dev/null 2>&1
  verify_config "$out/.config"
  info "all $(config_lines "$GUEST_IMAGE_DIR"/config/*.config | wc -l) requested options are in .config"

  local jobs
  jobs=$(nproc)
  step "kernel: make -j$jobs vmlinux (log: $dir/build.log)"
  local t0=$SECONDS
  make_with_progress "$dir/build.log" nice -n 10 make -C "$src" O="$out" -j"$jobs" vmlinux
  echo $((SECONDS - t0)) >"$dir/build-seconds"

  "${mk[@]}" kernelrelease >"$dir/kernelrelease"
  cp "$out/vmlinux" "$dir/vmlinux.tmp"
  cp "$out/.config" "$dir/config"
  # gen_init_cpio writes an initramfs from a file list without root and with
  # one fixed mtime: what initramfs.sh needs to be reproducible.
  gcc -O2 -o "$dir/gen_init_cpio" "$src/usr/gen_init_cpio.c"
  rm -rf "$out"
  mv "$dir/vmlinux.tmp" "$dir/vmlinux"
  step "kernel: $(cat "$dir/kernelrelease"), vmlinux $(du -h "$dir/vmlinux" | cut -f1), built in $(cat "$dir/build-seconds") s"
  echo "$dir"
}

main "$@"
