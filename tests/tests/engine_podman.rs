//! Podman 4.3 (rootful, fully private: tests/src/engines.rs) running
//! containers with an OCI runtime CLI: Debian's runc as the control, and
//! nutshell-runc, each container in a microVM. Every check runs under
//! both (`<check>::runc`, `<check>::nutshell`) and leaves nothing behind.

nutshell_tests::engine_tests!(Podman =>
    run_rm_exit_code,
    stdin_piped,
    tty,
    exec,
    stop_kills_after_the_timeout,
    volume_read_write,
    read_only_root,
    kernel_and_runtime,
    bridge_network,
);
