//! `nutshell-agent`: PID 1 of a nutshell guest and its container engine.
//!
//! The agent serves the ttrpc `Agent` service of `nutshell-protocol` on vsock
//! (in a guest) or on a Unix socket (on a host, for tests and debugging). It
//! runs OCI containers itself: each container process is this same binary
//! re-executed in an internal `init` mode (see [`container::init`]), so no
//! complex code ever runs between `fork` and `exec` in the multi-threaded
//! server.

pub mod cgroup;
pub mod container;
pub mod error;
pub mod listen;
pub mod network;
pub mod oom;
pub mod pid1;
pub mod pty;
pub mod reaper;
pub mod server;
pub mod stdio;

/// The agent's version, reported by Health and GuestDetails.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The argument that selects the internal container-init mode.
pub const INIT_ARG: &str = "__nutshell_init";
