//! Starting and supervising a pod's VM.
//!
//! A backend ([`Hypervisor`]) turns a [`VmConfig`] into a [`RunningVm`]: a
//! supervised tree of host processes (the VMM and its vhost-user backends)
//! plus the paths the rest of the runtime needs (the hybrid-vsock socket the
//! agent answers on, the console log). Every backend runs its VM as child
//! processes, so supervision, shutdown and clean-up live once, in
//! [`RunningVm`], and the trait stays a single `launch`.
//!
//! Two backends: nutshell's own VMM ([`nutshell_vmm::VmmHypervisor`],
//! `vmm/`) wherever KVM can run Linux, and QEMU ([`qemu::QemuHypervisor`])
//! everywhere else; [`select::select_backend`] chooses.

pub mod cgroups;
mod cmdline;
mod console;
pub mod handover;
mod launch;
mod memory;
pub mod nutshell_vmm;
mod programs;
pub mod qemu;
pub mod select;
mod shared_dir;
pub(crate) mod supervisor;
mod virtiofsd;
pub(crate) mod vm;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::network::Mac;

pub use console::sanitize_line;
pub(crate) use console::{format_tail, last_lines};
pub use memory::{host_memory, pss_by_cause, Cause, HostMemory};
pub use vm::{ProcessRole, ProcessStatus, RunningVm, VmEndWatch, VmExit};

/// Directory of the installed guest assets.
pub const GUEST_ASSETS_DIR: &str = "/usr/share/nutshell";

/// The guest's vsock context id. Each VM has its own vsock device (inside
/// nutshell-vmm, or QEMU's vhost-user backend), so every VM uses the same one.
pub const GUEST_CID: u32 = 3;

/// The virtio-fs tag of the pod's shared directory; the agent mounts it with
/// `mount -t virtiofs nutshell <dir>`.
pub const SHARED_DIR_TAG: &str = "nutshell";

/// How the VM's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// Software emulation (QEMU TCG): slow, but runs anywhere.
    Tcg,
    /// KVM when the backend was told KVM can run a Linux guest here, TCG
    /// otherwise (see [`qemu::QemuHypervisor::with_kvm_usable`]).
    #[default]
    Auto,
}

impl std::str::FromStr for Accel {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            "auto" => Ok(Self::Auto),
            other => Err(HypervisorError::InvalidConfig(format!(
                "unknown accelerator {other:?} (expected kvm, tcg or auto)"
            ))),
        }
    }
}

/// Everything a backend needs to start one pod's VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The pod (sandbox) id; names the VM in logs and process titles.
    pub id: String,
    /// Uncompressed guest kernel (`vmlinux`, PVH entry).
    pub kernel: PathBuf,
    /// Initramfs holding the agent as `/init`.
    pub initrd: PathBuf,
    /// Extra kernel command-line words, appended after the runtime's own.
    pub kernel_params: Vec<String>,
    /// Number of vCPUs (at least 1).
    pub vcpus: u32,
    /// Guest memory in MiB. Host memory is only used as the guest touches it.
    pub memory_mib: u32,
    /// Per-pod state directory (the shim's is `/run/nutshell/<hash>/`): sockets and the
    /// console log go here. Created when missing; what the VM put there is
    /// removed when it ends.
    pub state_dir: PathBuf,
    /// Host directory shared into the guest over virtio-fs with tag
    /// [`SHARED_DIR_TAG`]; `None` for no shared directory.
    pub shared_dir: Option<PathBuf>,
    /// CPU accelerator.
    pub accel: Accel,
    /// Verbose guest kernel console, and the console log is kept after the
    /// VM ends (for debugging).
    pub debug_console: bool,
    /// Network cards (virtio-net), each on a tap the runtime opened in the
    /// pod's network namespace ([`crate::network::plumb`]); the VMM
    /// inherits the fds.
    pub nics: Vec<Nic>,
    /// Started for the warm pool, to be handed to another process
    /// ([`handover`]): the VM's processes outlive this one, run niced until
    /// claimed, and write stderr to files in the state directory.
    pub handover: bool,
    /// The network namespace the VM's processes run in; `None`: this
    /// process's. A warm VM's run in the pool's holding namespace
    /// ([`crate::network::HoldingNetns`]), which so lives as long as they
    /// do, and with it the taps of NICs its pod did not need: a VMM whose
    /// tap vanished would find its fd in error for good.
    pub netns: Option<Arc<OwnedFd>>,
}

/// A virtio-net card of the VM.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The guest's MAC: the mirrored veth's.
    pub mac: Mac,
    /// The open tap. The VMM gets its own copy; the runtime's is closed
    /// once the VM runs, so the tap lasts exactly as long as the VM.
    pub tap: Arc<OwnedFd>,
}

impl VmConfig {
    /// A configuration with the installed guest assets
    /// ([`GUEST_ASSETS_DIR`]), 1 vCPU, 256 MiB, no shared directory and
    /// [`Accel::Auto`].
    pub fn new(id: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let assets = Path::new(GUEST_ASSETS_DIR);
        Self {
            id: id.into(),
            kernel: assets.join("vmlinux"),
            initrd: assets.join("initramfs.cpio.gz"),
            kernel_params: Vec::new(),
            vcpus: 1,
            memory_mib: 256,
            state_dir: state_dir.into(),
            shared_dir: None,
            accel: Accel::Auto,
            debug_console: false,
            nics: Vec::new(),
            handover: false,
            netns: None,
        }
    }

    /// Checks what can be checked before starting anything.
    pub fn validate(&self) -> Result<(), HypervisorError> {
        let bad = |m: String| Err(HypervisorError::InvalidConfig(m));
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(format!(
                "VM id {:?} must be 1 to 128 characters of [A-Za-z0-9._-]",
                self.id
            ));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return bad(format!("vcpus must be 1 to 255, not {}", self.vcpus));
        }
        if self.memory_mib < 64 {
            return bad(format!(
                "memory must be at least 64 MiB, not {} MiB",
                self.memory_mib
            ));
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if !path.is_file() {
                return bad(format!(
                    "the guest {what} {} does not exist",
                    path.display()
                ));
            }
        }
        if let Some(dir) = &self.shared_dir {
            if !dir.is_dir() {
                return bad(format!(
                    "the shared directory {} does not exist",
                    dir.display()
                ));
            }
        }
        for p in &self.kernel_params {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(format!(
                    "kernel parameter {p:?} is empty or holds whitespace"
                ));
            }
        }
        Ok(())
    }
}

/// Errors starting or controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The configuration cannot work; the message says why.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// A program the backend needs is not installed.
    #[error("{program} was not found (looked in {looked_in})")]
    MissingProgram {
        program: &'static str,
        looked_in: String,
    },
    /// The state directory or a file in it could not be prepared.
    #[error("cannot prepare {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The shared directory could not be made a shared mount.
    #[error("cannot prepare the shared directory {path} ({what})")]
    SharedDir {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A process of the VM could not be started.
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user backend did not create its socket in time.
    #[error("{program} did not create {socket} within {waited:?}")]
    SocketTimeout {
        program: String,
        socket: PathBuf,
        waited: Duration,
    },
    /// The own VMM was asked for on a host whose KVM cannot run Linux.
    #[error("the nutshell-vmm backend needs a KVM that can run a Linux guest, and this host's cannot ({detail}); use the qemu backend, which falls back to software emulation")]
    KvmCannotRunLinux { detail: String },
    /// A process of the VM ended while the VM was starting.
    #[error("the VM ended while starting: {0}")]
    EndedWhileStarting(Box<VmExit>),
    /// A VM could not be handed from one process to another; the message
    /// says why.
    #[error("cannot hand the VM over: {0}")]
    Handover(String),
}

/// A way to run VMs. Implementations start the VM's processes and hand the
/// running tree to [`RunningVm`], which supervises it.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name for logs and configuration ("qemu", "vmm").
    fn name(&self) -> &'static str;

    /// Starts a VM. Returns once every process of it runs; the agent is not
    /// necessarily listening yet (dial it with
    /// [`crate::agent::AgentClient::connect`]).
    async fn launch(&self, config: &VmConfig) -> Result<RunningVm, HypervisorError>;
}

/// Helpers for the backends' command-line tests.
#[cfg(test)]
pub(crate) mod arg_tests {
    use std::ffi::OsString;

    /// Arguments as strings (test paths are UTF-8).
    pub(crate) fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.into_string().expect("UTF-8 argument"))
            .collect()
    }

    /// Every value that follows `flag`.
    pub(crate) fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_files() -> (tempfile::TempDir, VmConfig) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new("pod-1", dir.path().join("state"));
        c.kernel = dir.path().join("vmlinux");
        c.initrd = dir.path().join("initrd");
        std::fs::write(&c.kernel, b"k").unwrap();
        std::fs::write(&c.initrd, b"i").unwrap();
        (dir, c)
    }

    #[test]
    fn validate_accepts_a_sane_config() {
        let (_d, c) = config_with_files();
        c.validate().unwrap();
    }

    #[test]
    fn validate_refuses_bad_ids_params_and_sizes() {
        let (_d, c) = config_with_files();
        for id in ["", "a/b", "x y", "../up"] {
            let mut c = c.clone();
            c.id = id.into();
            assert!(c.validate().is_err(), "id {id:?} accepted");
        }
        let mut p = c.clone();
        p.kernel_params = vec!["a b".into()];
        assert!(p.validate().is_err());
        let mut m = c.clone();
        m.memory_mib = 16;
        assert!(m.validate().is_err());
        let mut v = c.clone();
        v.vcpus = 0;
        assert!(v.validate().is_err());
        let mut k = c;
        k.kernel = "/nonexistent/vmlinux".into();
        let e = k.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn accel_parses() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        assert!("xen".parse::<Accel>().is_err());
    }
}
