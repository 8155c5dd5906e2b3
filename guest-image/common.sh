# Shared by guest-image/*.sh: paths, reproducible-build settings, progress.
# Sourced, not run.

GUEST_IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/lib/paths.sh
source "$GUEST_IMAGE_DIR/../tools/lib/paths.sh"
export NUTSHELL_CACHE=${NUTSHELL_CACHE:-/var/cache/nutshell}
KERNEL_PACKAGE=linux-source-6.1
KERNEL_TARBALL=${KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}

step() { printf '==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

sha256() { sha256sum "$@" | cut -d' ' -f1; }

# The package version pins the source: Debian rebuilds the tarball for each
# version, so the version (not the tarball's path) goes into the cache key.
kernel_package_version() {
  dpkg-query -W -f='${Version}' "$KERNEL_PACKAGE" 2>/dev/null ||
    die "$KERNEL_PACKAGE is not installed (apt-get install $KERNEL_PACKAGE)"
}

# One fixed time for everything built from a given source: the tarball's
# mtime, which dpkg takes from the package (Debian clamps it to the
# changelog date), so it changes only with the package version.
reproducible_env() {
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$KERNEL_TARBALL")}
  export SOURCE_DATE_EPOCH
  KBUILD_BUILD_TIMESTAMP=$(date -u -d "@$SOURCE_DATE_EPOCH")
  export KBUILD_BUILD_TIMESTAMP
  export KBUILD_BUILD_USER=nutshell KBUILD_BUILD_HOST=nutshell KBUILD_BUILD_VERSION=1
  export LC_ALL=C TZ=UTC
}
