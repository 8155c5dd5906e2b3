# shellcheck shell=bash
# Where nutshell's installed files live, for every script. Sourced.
#
# The guest image (vmlinux, initramfs.cpio.gz, VERSION) is in
# $NUTSHELL_GUEST_DIR, by default the directory the runtime's
# GUEST_ASSETS_DIR names (tests/src/lib.rs checks that the two agree).
NUTSHELL_GUEST_DIR=${NUTSHELL_GUEST_DIR:-/usr/share/nutshell}
