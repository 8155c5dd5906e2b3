# shellcheck shell=bash
# The one debug build that the tests run. Sourced.
#
# Cargo resolves features for what a call selects, so a call that names
# packages (-p) or leaves the tests out builds the dependency graph once more,
# into its own copies. Four such copies once filled a CI disk. Every debug
# build the test command needs goes through here instead: the whole
# workspace, every target, one feature set.
build_debug() {
  cargo build --workspace --all-targets "$@"
}
