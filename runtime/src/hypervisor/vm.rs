//! A running VM as the rest of the runtime sees it: [`RunningVm`], and how
//! it ended ([`VmExit`], [`VmEndWatch`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use super::console::{format_tail, last_lines};
use super::memory::{host_memory, HostMemory};

/// How long the VMM gets between SIGTERM and SIGKILL in a shutdown.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// What a process of the VM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRole {
    /// The virtual machine monitor (QEMU, or nutshell-vmm).
    Vmm,
    /// The vhost-user vsock backend (the agent's channel).
    VsockBackend,
    /// The vhost-user virtio-fs backend (the pod's shared directory).
    FsBackend,
}

impl ProcessRole {
    /// The file in the state directory that a handed-over VM's process
    /// writes its stderr to.
    pub(crate) fn stderr_file(self) -> &'static str {
        match self {
            Self::Vmm => "vmm.stderr",
            Self::VsockBackend => "vsock.stderr",
            Self::FsBackend => "fs.stderr",
        }
    }
}

impl fmt::Display for ProcessRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vmm => "the VMM",
            Self::VsockBackend => "the vsock backend",
            Self::FsBackend => "the virtio-fs backend",
        })
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessStatus {
    /// It exited with this status code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
    /// Its status could not be learnt; the message says why.
    Unknown(String),
}

impl From<io::Result<ExitStatus>> for ProcessStatus {
    fn from(r: io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match r {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => Self::Exited(c),
                (None, Some(sig)) => Self::Signaled(sig),
                (None, None) => Self::Unknown(format!("{s}")),
            },
            Err(e) => Self::Unknown(format!("waiting for it failed: {e}")),
        }
    }
}

impl fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(c) => write!(f, "exited with status {c}"),
            Self::Signaled(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "was killed by signal {s} ({sig})"),
                Err(_) => write!(f, "was killed by signal {s}"),
            },
            Self::Unknown(why) => write!(f, "ended ({why})"),
        }
    }
}

/// Why a VM ended: the first of its processes that ended, and how.
#[derive(Debug, Clone)]
pub struct VmExit {
    /// The VM's id.
    pub vm_id: String,
    /// What the first process to end did.
    pub role: ProcessRole,
    /// Its program name.
    pub program: String,
    /// Its host pid.
    pub pid: u32,
    /// How it ended.
    pub status: ProcessStatus,
    /// The runtime had signalled the VM's processes (shutdown after its
    /// grace, kill, or the handle was dropped) before it ended.
    pub requested: bool,
    /// Its last stderr lines, sanitised.
    pub stderr_tail: Vec<String>,
    /// The last lines of the guest console, sanitised, read as the VM ended.
    pub console_tail: Vec<String>,
}

impl VmExit {
    /// The VMM ended by itself with status 0, unsignalled: the guest
    /// rebooted (`-no-reboot`), as it does after DestroySandbox. (QEMU also
    /// exits 0 on SIGTERM, hence the `requested` check.)
    pub fn is_clean_poweroff(&self) -> bool {
        self.role == ProcessRole::Vmm && self.status == ProcessStatus::Exited(0) && !self.requested
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM {}: {} ({}, pid {}) {}",
            self.vm_id, self.program, self.role, self.pid, self.status
        )?;
        if self.requested {
            f.write_str(" after the runtime asked it to stop")?;
        }
        if !self.stderr_tail.is_empty() {
            write!(f, "; its last stderr lines:")?;
            for l in &self.stderr_tail {
                write!(f, "\n  ! {l}")?;
            }
        }
        write!(f, "; {}", format_tail(&self.console_tail))
    }
}

/// Something that resolves when a VM has ended; clone it freely (e.g. into
/// the agent client, so calls fail at once when the VM dies).
#[derive(Debug, Clone)]
pub struct VmEndWatch(pub(crate) watch::Receiver<Option<Arc<VmExit>>>);

impl VmEndWatch {
    /// The exit, once the VM has ended and been cleaned up.
    pub fn get(&self) -> Option<VmExit> {
        self.0.borrow().as_deref().cloned()
    }

    /// Waits until the VM has ended and every process is reaped.
    pub async fn wait(&self) -> VmExit {
        let mut rx = self.0.clone();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.as_deref().cloned(),
            Err(_) => None,
        };
        exit.unwrap_or_else(lost_supervisor)
    }
}

#[cfg(test)]
impl VmEndWatch {
    /// A watch ended by hand, for tests of code that races against a VM.
    pub(crate) fn for_test() -> (impl FnOnce(VmExit), Self) {
        let (tx, rx) = watch::channel(None);
        (move |e| drop(tx.send_replace(Some(Arc::new(e)))), Self(rx))
    }
}

/// The exit reported when the supervisor task vanished (its runtime was shut
/// down): `kill_on_drop` has killed the processes by then.
pub(crate) fn lost_supervisor() -> VmExit {
    VmExit {
        vm_id: String::new(),
        role: ProcessRole::Vmm,
        program: "?".into(),
        pid: 0,
        status: ProcessStatus::Unknown("the runtime stopped supervising the VM".into()),
        requested: true,
        stderr_tail: Vec::new(),
        console_tail: Vec::new(),
    }
}

/// What a [`RunningVm`] asks its supervisor.
pub(crate) enum Control {
    /// Marks the end as requested, then signals processes (`None`: all).
    Signal(Option<ProcessRole>, Signal),
    /// Lets go of the VM for a hand-over ([`super::handover`]).
    Release(tokio::sync::oneshot::Sender<Option<super::handover::Released>>),
}

/// A started VM: its processes run under a supervisor task. Dropping it
/// kills the VM.
#[derive(Debug)]
pub struct RunningVm {
    pub(crate) id: String,
    pub(crate) agent_socket: PathBuf,
    pub(crate) console_log: PathBuf,
    pub(crate) processes: Vec<(ProcessRole, u32)>,
    pub(crate) control: mpsc::UnboundedSender<Control>,
    pub(crate) end: VmEndWatch,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Signal(r, s) => write!(f, "Signal({r:?}, {s})"),
            Self::Release(_) => f.write_str("Release"),
        }
    }
}

impl RunningVm {
    /// The VM's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hybrid-vsock Unix socket: connect, send `CONNECT <port>\n`.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// The guest console log (removed when the VM ends, unless
    /// `debug_console`).
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// The last `n` lines of the guest console, sanitised.
    pub fn last_console_lines(&self, n: usize) -> Vec<String> {
        last_lines(&self.console_log, n)
    }

    /// Host pid of each process of the VM (each leads its process group).
    pub fn processes(&self) -> &[(ProcessRole, u32)] {
        &self.processes
    }

    /// Host pid of the VMM itself; `None` only for a VM built without one.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.processes
            .iter()
            .find(|(role, _)| *role == ProcessRole::Vmm)
            .map(|(_, pid)| *pid)
    }

    /// Host memory of the VM's whole process tree.
    pub fn host_memory(&self) -> io::Result<HostMemory> {
        let pgids: Vec<u32> = self.processes.iter().map(|(_, p)| *p).collect();
        host_memory(&pgids)
    }

    /// A handle that resolves when the VM has ended.
    pub fn end_watch(&self) -> VmEndWatch {
        self.end.clone()
    }

    /// Waits until the VM has ended (and is cleaned up).
    pub async fn ended(&self) -> VmExit {
        self.end.wait().await
    }

    /// The exit, if the VM has ended.
    pub fn try_ended(&self) -> Option<VmExit> {
        self.end.get()
    }

    /// Stops the VM: waits up to `grace` for it to end by itself (the caller
    /// has asked the guest to power off, e.g. with DestroySandbox), then
    /// sends the VMM SIGTERM, and two seconds later kills every process.
    /// Returns once every process is reaped and the files are removed.
    pub async fn shutdown(&self, grace: Duration) -> VmExit {
        if let Some(e) = self.end.get() {
            return e;
        }
        if let Ok(e) = timeout(grace, self.end.wait()).await {
            return e;
        }
        let _ = self
            .control
            .send(Control::Signal(Some(ProcessRole::Vmm), Signal::SIGTERM));
        if let Ok(e) = timeout(TERM_GRACE, self.end.wait()).await {
            return e;
        }
        self.kill().await
    }

    /// Kills every process of the VM at once; returns once they are reaped
    /// and the files are removed.
    pub async fn kill(&self) -> VmExit {
        let _ = self.control.send(Control::Signal(None, Signal::SIGKILL));
        self.end.wait().await
    }
}
