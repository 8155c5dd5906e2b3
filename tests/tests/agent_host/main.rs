//! nutshell-agent on this host, as root, driven through its ttrpc protocol
//! on a Unix socket: containers from a busybox rootfs, stdio, terminals,
//! exec, signals, security settings, bad input and leaks. One test binary
//! (`cargo test -p nutshell-tests --test agent_host`), a module per concern
//! and the harness they share.

mod agent;
mod procfs;

mod bad_input;
mod cgroups;
mod isolation;
mod lifecycle;
mod network;
mod process_settings;
mod reach;
mod stdio;
mod warm_up;
