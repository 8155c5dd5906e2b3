//! Podman 4.3 (rootful, fully private: tests/src/engines.rs) running
//! containers with an OCI runtime CLI: Debian's runc as the control, and
//! nutshell-runc, each container in a microVM. Every check of
//! tests/src/engines/checks.rs that all engines run, under both
//! (`<check>::runc`, `<check>::nutshell`), leaving nothing behind.

nutshell_tests::engine_tests!(Podman);
