//! What the agent tells a container's init process: the validated spec plus
//! the decisions the agent already made (namespaces to join or create, the
//! compiled seccomp program, terminal or pipes).

use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

/// A namespace to enter with setns(2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NsJoin {
    /// The name for messages ("net", "pid", ...).
    pub kind: String,
    /// The CLONE_NEW* flag.
    pub flag: i32,
    /// The namespace file.
    pub path: PathBuf,
}

/// One BPF instruction (`struct sock_filter`).
pub type BpfInsn = (u16, u8, u8, u32);

/// The full instructions for the init process.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// Exec into a running container rather than create one.
    pub exec: bool,
    /// Absolute path of the rootfs (create only).
    pub rootfs: PathBuf,
    /// The container's spec (mounts, sysctls, masked paths...).
    pub spec: Spec,
    /// The process to run.
    pub process: Process,
    /// Namespaces to join, in order.
    pub join: Vec<NsJoin>,
    /// CLONE_NEW* flags of the namespaces to create.
    pub unshare: i32,
    /// Hostname to set (only when the UTS namespace is new).
    pub hostname: Option<String>,
    /// Allocate a pty inside the container.
    pub terminal: bool,
    /// Seccomp programs to install, in order (they stack).
    pub seccomp: Vec<Vec<BpfInsn>>,
    /// Whether cgroup v2 is mounted (decides how `cgroup` mounts are made).
    pub cgroup_v2: bool,
}
