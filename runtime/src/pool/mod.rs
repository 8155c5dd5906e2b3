//! The warm pool: VMs booted ahead of time, claimed by pods.
//!
//! `nutshell pool` ([`server::serve`]) keeps, for each size the config
//! names, a number of VMs whose agents answer. A pod's process (the shim,
//! `nutshell-runc`'s stand-in) asks for one over a root-only Unix socket
//! ([`claim::claim`]) instead of booting. A VM serves one pod, once:
//! - the pool takes it off its list, moves its state directory (sockets,
//!   console, the shared directory) to the pod's, moves the taps of its
//!   NICs from the pool's own network namespace into the pod's
//!   ([`crate::network::HoldingNetns`]), and lets go of it
//!   ([`crate::hypervisor::handover`]);
//! - it sends the claimer a record of the VM with a pidfd per process;
//! - the claimer adopts the VM and answers `taken`. Without that answer
//!   the pool kills the VM and removes the directory: a claimer that dies
//!   mid-claim leaks nothing;
//! - the pool boots a replacement in the background, niced.
//!
//! The claimer then sets the VM up as after a cold boot (time, hostname,
//! shared directory through CreateSandbox, the taps joined to the veths and
//! the guest's NICs given the veths' MACs and addresses), so a claimed VM
//! cannot be told apart from a booted one. When anything fails, the pod
//! boots cold.

pub mod claim;
pub mod server;
pub mod wire;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::VmConfig;

/// What makes two VMs interchangeable: a pod gets a warm VM only when it
/// was started exactly as the pod's own would be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmShape {
    /// The backend's name ([`crate::hypervisor::Hypervisor::name`]).
    pub backend: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub debug_console: bool,
}

impl VmShape {
    /// The shape of `vm` on `backend`. NICs are not part of it: a warm
    /// VM's serve any pod with no more interfaces than it has NICs.
    pub fn of(vm: &VmConfig, backend: &str) -> Self {
        Self {
            backend: backend.to_string(),
            kernel: vm.kernel.clone(),
            initrd: vm.initrd.clone(),
            kernel_params: vm.kernel_params.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            debug_console: vm.debug_console,
        }
    }
}

impl std::fmt::Display for VmShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vCPU, {} MiB on {}",
            self.vcpus, self.memory_mib, self.backend
        )
    }
}

/// The shared directory inside a VM's state directory, for the pool's VMs
/// as for pods' (`PodKey::shared_dir`).
pub(crate) fn shared_dir_of(dir: &Path) -> PathBuf {
    dir.join("shared")
}

/// Errors of the pool and of claims.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No pool listens on the socket.
    #[error("no pool listens on {socket}")]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pool has no warm VM for this claim; the message says why.
    #[error("the pool has no VM to give: {0}")]
    Empty(String),
    /// The other side broke the protocol or went away; the message says how.
    #[error("the claim failed: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The pool cannot start; the message says why.
    #[error("{0}")]
    Setup(String),
}

impl PoolError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
