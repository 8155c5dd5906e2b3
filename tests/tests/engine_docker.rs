//! Docker 20.10 (a private dockerd inside a network namespace of the
//! test's own: tests/src/engines.rs) running containers with an OCI
//! runtime CLI through its containerd's runc shim: Debian's runc as the
//! control, and nutshell-runc, each container in a microVM. Every check of
//! tests/src/engines/checks.rs that all engines run, and `docker stats`,
//! under both (`<check>::runc`, `<check>::nutshell`), leaving nothing
//! behind.

nutshell_tests::engine_tests!(Docker);
nutshell_tests::engine_tests!(Docker => stats);
