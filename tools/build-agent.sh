#!/usr/bin/env bash
# Builds the static nutshell-agent (the guest's /init) and prints its path as
# the last line of stdout.
#
# The explicit --target keeps RUSTFLAGS (+crt-static) away from proc-macros
# and build scripts, which must stay dynamic host binaries. The checkout's
# path is remapped so that the binary (and so the initramfs, and its cache
# key) is the same whichever directory the repository was cloned into.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$PWD=/nutshell" \
    cargo build --release --target "$target" -p nutshell-agent >&2
bin="$PWD/target/$target/release/nutshell-agent"
# A dynamic executable lists its libraries as "name => path".
if ldd "$bin" 2>&1 | grep -q '=>'; then
    echo "build-agent.sh: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
