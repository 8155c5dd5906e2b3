//! The start every backend shares, around its own programs: the VM's files
//! in its state directory, the state directory itself, virtiofsd for the
//! shared directory, and the rule that a step that fails kills and cleans
//! what the steps before it started. Each backend's `launch` then reads as
//! the order in which it starts its programs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::supervisor::{ProcessTree, StateFiles};
use super::vm::{ProcessRole, RunningVm};
use super::{virtiofsd, HypervisorError, VmConfig};

/// The files of one VM in its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmFiles {
    /// Hybrid-vsock socket the host dials to reach guest ports.
    pub agent: PathBuf,
    /// vhost-user socket of a separate vsock backend (QEMU's; nutshell-vmm
    /// has the device inside and makes no such socket).
    pub vhost_vsock: PathBuf,
    /// vhost-user socket of virtiofsd, when a directory is shared.
    pub fs: Option<PathBuf>,
    /// Serial console log.
    pub console: PathBuf,
}

impl VmFiles {
    pub(crate) fn new(config: &VmConfig) -> Self {
        let d = &config.state_dir;
        Self {
            agent: d.join("vsock.sock"),
            vhost_vsock: d.join("vhu.sock"),
            fs: config.shared_dir.as_ref().map(|_| d.join("fs.sock")),
            console: d.join("console.log"),
        }
    }
}

/// Lets `cmd` inherit the VM's tap fds (see [`VmConfig::nics`]) under
/// their own numbers, which the VMM's arguments name. They stay
/// close-on-exec in this process, so no other child can inherit them.
pub(crate) fn inherit_taps(cmd: &mut Command, config: &VmConfig) {
    use std::os::fd::AsRawFd;
    let fds: Vec<i32> = config.nics.iter().map(|n| n.tap.as_raw_fd()).collect();
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls fcntl(2), which is async-signal-safe, on fds the parent keeps
    // open across the spawn (VmConfig holds them), and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A VM being started: its files and the processes started so far.
pub(crate) struct Launch {
    pub files: VmFiles,
    tree: ProcessTree,
}

impl Launch {
    /// Checks `config`, prepares its state directory and claims the files
    /// every VM makes, plus `extra` (a backend's own sockets), so that they
    /// are removed when the VM ends.
    pub(crate) fn prepare(config: &VmConfig, extra: &[&Path]) -> Result<Self, HypervisorError> {
        config.validate()?;
        let files = VmFiles::new(config);
        let mut state = StateFiles::prepare(&config.state_dir, config.debug_console)?;
        state.claim(&files.agent)?;
        for path in extra {
            state.claim(path)?;
        }
        if let Some(fs) = &files.fs {
            virtiofsd::claim_files(&mut state, fs)?;
        }
        Ok(Self {
            files,
            tree: ProcessTree::new(&config.id, state, config.handover)
                .in_netns(config.netns.clone()),
        })
    }

    /// Starts `cmd` as the VM's `role`.
    pub(crate) async fn spawn(
        mut self,
        role: ProcessRole,
        program: &str,
        cmd: Command,
    ) -> Result<Self, HypervisorError> {
        match self.tree.spawn(role, program, cmd) {
            Ok(_) => Ok(self),
            Err(e) => {
                self.tree.kill_and_clean().await;
                Err(e)
            }
        }
    }

    /// Starts virtiofsd on the shared directory, if the VM has one. The
    /// caller waits for its socket ([`VmFiles::fs`]) with the others.
    pub(crate) async fn start_virtiofsd(
        mut self,
        program: &Path,
        config: &VmConfig,
    ) -> Result<Self, HypervisorError> {
        let (Some(dir), Some(socket)) = (&config.shared_dir, &self.files.fs) else {
            return Ok(self);
        };
        match virtiofsd::start(&mut self.tree, program, dir, socket) {
            Ok(()) => Ok(self),
            Err(e) => {
                self.tree.kill_and_clean().await;
                Err(e)
            }
        }
    }

    /// Waits until each `(program, socket)` exists, for at most `limit`
    /// each. A program that ends first fails the start with its exit.
    pub(crate) async fn wait_for_sockets(
        mut self,
        sockets: &[(&str, &Path)],
        limit: Duration,
    ) -> Result<Self, HypervisorError> {
        for (program, socket) in sockets {
            if let Err(why) = self.tree.wait_for_socket(program, socket, limit).await {
                return Err(self.tree.abort(why).await);
            }
        }
        Ok(self)
    }

    /// Hands the started VM to its supervisor.
    pub(crate) fn into_running(self) -> RunningVm {
        self.tree.into_running(self.files.agent)
    }
}
