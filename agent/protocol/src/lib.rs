//! The protocol between the nutshell runtime (host) and `nutshell-agent`
//! (PID 1 of the guest): protobuf messages and an async ttrpc service,
//! generated at build time from `proto/agent.proto`.
//!
//! Both sides depend on this crate, so a change to the protocol is one change
//! to the `.proto` file; bump [`PROTOCOL_VERSION`] when it breaks
//! compatibility.

#![allow(missing_docs)]

// `agent` (messages) and `agent_ttrpc` (async client and server), declared by
// the build script with `#[path]` so the generated files keep their inner
// attributes.
include!(concat!(env!("OUT_DIR"), "/mods.rs"));

/// Version of the wire protocol; the runtime refuses an agent that reports
/// another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on unless the kernel command line says
/// `nutshell.agent_port=<n>`.
pub const DEFAULT_AGENT_VSOCK_PORT: u32 = 1024;

/// What the agent logs on the guest console once it listens. The runtime
/// looks for it: a VM whose agent logged it but whose vsock backend still
/// answers no CONNECT is replaced before the dial's whole deadline.
pub const AGENT_SERVING_LOG: &str = "agent serving";

/// Largest stdio chunk one ReadStdout/ReadStderr/WriteStdin call carries. Well
/// below ttrpc's 4 MiB message limit.
pub const MAX_STDIO_CHUNK: u32 = 1024 * 1024;
