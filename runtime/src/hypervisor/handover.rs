//! Handing a running VM from one process to another.
//!
//! The warm pool ([`crate::pool`]) boots VMs ahead of time; a pod's process
//! (the shim, `nutshell-runc`'s stand-in) claims one and supervises it from
//! then on, although it is not the VM processes' parent. So a VM meant for
//! a hand-over is started differently ([`super::VmConfig::handover`]):
//! - its processes do not die with the pool (no `PR_SET_PDEATHSIG`, no
//!   kill on drop): a pool killed with SIGKILL leaves claimed VMs to their
//!   owners;
//! - they write stderr to files in the state directory, which a new owner
//!   can read, instead of a pipe only the pool holds;
//! - they run niced ([`POOL_NICE`]) while warm, so that boots for the pool
//!   do not starve running pods; the new owner renices them.
//!
//! The pool [`RunningVm::release`]s the VM: it keeps reaping the
//! processes (only a parent can) and does nothing else with them. The new
//! owner [`RunningVm::adopt`]s it from a [`Handover`]: a record of the
//! processes and files, and a pidfd per process. A pidfd names its
//! process for good, so the owner can wait for it (it becomes readable at
//! exit) and signal it without racing against pid reuse. The exit status
//! stays with the parent, so an adopted process's is reported as unknown.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio::sync::watch;

use super::console::last_lines;
use super::supervisor::{Order, ProcessTree, StateFiles, STDERR_TAIL_LINES};
use super::vm::{Control, ProcessRole, ProcessStatus, RunningVm};
use super::HypervisorError;

/// The niceness of a warm VM's processes until it is claimed.
pub const POOL_NICE: i32 = 10;

/// A process let go of by [`RunningVm::release`].
pub(crate) struct ReleasedProcess {
    pub role: ProcessRole,
    pub program: String,
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// What the supervisor gives up in a release.
pub(crate) struct Released {
    pub vm_id: String,
    pub processes: Vec<ReleasedProcess>,
    pub state: StateFiles,
}

/// One process of a handed-over VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedProcess {
    pub role: ProcessRole,
    pub program: String,
    pub pid: u32,
}

/// Everything about a handed-over VM except its pidfds. Paths are relative
/// to the VM's state directory, which the pool moves to the new owner's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRecord {
    pub vm_id: String,
    pub processes: Vec<HandedProcess>,
    /// Files the VM made there, removed when it ends.
    pub files: Vec<PathBuf>,
    /// Mounts the VM made there, unmounted when it ends.
    pub mounts: Vec<PathBuf>,
    pub console: PathBuf,
    /// The hybrid-vsock socket the agent answers on.
    pub agent: PathBuf,
    pub keep_console: bool,
}

/// A released VM: its record, and one pidfd per process in the record's
/// order.
#[derive(Debug)]
pub struct Handover {
    pub record: HandoverRecord,
    pub pidfds: Vec<OwnedFd>,
}

impl RunningVm {
    /// Stops supervising a VM started with [`super::VmConfig::handover`]
    /// and returns what another process needs to adopt it. From here on
    /// this process only reaps the VM's processes. Fails, with the VM
    /// still supervised, when it was not started for a hand-over or one of
    /// its processes has ended.
    pub async fn release(self) -> Result<Handover, HypervisorError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let refused = || {
            HypervisorError::Handover(format!(
                "VM {} has ended, or was not started for a hand-over",
                self.id
            ))
        };
        if self.control.send(Control::Release(tx)).is_err() {
            return Err(refused());
        }
        let Some(released) = rx.await.ok().flatten() else {
            return Err(refused());
        };
        let dir = &released.state.dir;
        let relative = |p: &Path| {
            p.strip_prefix(dir).map(Path::to_path_buf).map_err(|_| {
                HypervisorError::Handover(format!(
                    "{} is not in the VM's state directory {}",
                    p.display(),
                    dir.display()
                ))
            })
        };
        let record = HandoverRecord {
            vm_id: released.vm_id.clone(),
            processes: released
                .processes
                .iter()
                .map(|p| HandedProcess {
                    role: p.role,
                    program: p.program.clone(),
                    pid: p.pid,
                })
                .collect(),
            files: released
                .state
                .files
                .iter()
                .map(|f| relative(f))
                .collect::<Result<_, _>>()?,
            mounts: released
                .state
                .mounts
                .iter()
                .map(|m| relative(m))
                .collect::<Result<_, _>>()?,
            console: relative(&released.state.console_log)?,
            agent: relative(&self.agent_socket)?,
            keep_console: released.state.keep_console,
        };
        // The supervisor's task has ended without a VmExit; forgetting the
        // handle keeps its drop from asking anything of it.
        let pidfds = released.processes.into_iter().map(|p| p.pidfd).collect();
        Ok(Handover { record, pidfds })
    }

    /// Supervises a VM handed over by another process, its state directory
    /// now at `dir`, under the name `id`. Must run inside a tokio runtime.
    /// The record is checked as input from another process: paths must
    /// stay inside `dir`, and there must be a pidfd per process.
    pub fn adopt(handover: Handover, id: &str, dir: &Path) -> Result<RunningVm, HypervisorError> {
        let Handover { record, pidfds } = handover;
        let bad = |m: String| Err(HypervisorError::Handover(m));
        if record.processes.is_empty() || record.processes.len() != pidfds.len() {
            return bad(format!(
                "{} processes came with {} pidfds",
                record.processes.len(),
                pidfds.len()
            ));
        }
        if !record.processes.iter().any(|p| p.role == ProcessRole::Vmm) {
            return bad("no process is the VMM".into());
        }
        let inside = |p: &Path| -> Result<PathBuf, HypervisorError> {
            if p.as_os_str().is_empty()
                || !p.components().all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(HypervisorError::Handover(format!(
                    "{} is not a path inside the state directory",
                    p.display()
                )));
            }
            Ok(dir.join(p))
        };
        let state = StateFiles {
            dir: dir.to_path_buf(),
            // The new owner made nothing of it; whoever owns `dir` removes it.
            created_dir: false,
            files: record
                .files
                .iter()
                .map(|f| inside(f))
                .collect::<Result<_, _>>()?,
            mounts: record
                .mounts
                .iter()
                .map(|m| inside(m))
                .collect::<Result<_, _>>()?,
            console_log: inside(&record.console)?,
            keep_console: record.keep_console,
        };
        let agent = inside(&record.agent)?;
        let mut tree = ProcessTree::new(id, state, false);
        for (p, fd) in record.processes.iter().zip(pidfds) {
            tree.adopt(
                p.role,
                &p.program,
                p.pid,
                fd,
                dir.join(p.role.stderr_file()),
            )?;
        }
        Ok(tree.into_running(agent))
    }
}

/// The process tree's side of a hand-over.
impl ProcessTree {
    /// Takes over a process another runtime process started and handed
    /// over ([`super::handover`]): it is watched and signalled through
    /// `pidfd`, since only its parent can reap it.
    pub(crate) fn adopt(
        &mut self,
        role: ProcessRole,
        program: &str,
        pid: u32,
        pidfd: OwnedFd,
        stderr_file: PathBuf,
    ) -> Result<(), HypervisorError> {
        let watched = PidFd::new(pidfd).map_err(|source| HypervisorError::Spawn {
            program: program.to_string(),
            source,
        })?;
        self.track(role, program, pid, None, move |signal_rx| async move {
            let status = watch(watched, pid, signal_rx).await;
            (status, last_lines(&stderr_file, STDERR_TAIL_LINES))
        });
        Ok(())
    }

    /// Lets go of every process, if all of them still run: their tasks
    /// only reap them from now on, and the state files stay. `None` when
    /// a process has ended (its exit is put back for [`Self::finish`]) or
    /// the VM was not started for a hand-over.
    pub(super) fn release(&mut self) -> Option<Released> {
        if !self.handover || self.children.iter().any(|c| c.pidfd.is_none()) {
            return None;
        }
        if let Ok(exit) = self.exits_rx.try_recv() {
            let _ = self.exits_tx.send(exit);
            return None;
        }
        let mut processes = Vec::with_capacity(self.children.len());
        for c in &mut self.children {
            let _ = c.signal.send_replace(Some(Order::Release));
            if let Some(pidfd) = c.pidfd.take() {
                processes.push(ReleasedProcess {
                    role: c.role,
                    program: c.program.clone(),
                    pid: c.pid,
                    pidfd,
                });
            }
        }
        let state = std::mem::replace(
            &mut self.state,
            StateFiles {
                dir: PathBuf::new(),
                created_dir: false,
                files: Vec::new(),
                mounts: Vec::new(),
                console_log: PathBuf::new(),
                keep_console: true,
            },
        );
        Some(Released {
            vm_id: self.vm_id.clone(),
            processes,
            state,
        })
    }
}

/// Sets up `cmd` for a VM that may be handed over: stderr appended to
/// `stderr_path`, niced, and not tied to this process's life.
pub(crate) fn detach(cmd: &mut Command, stderr_path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(stderr_path)?;
    cmd.stderr(file).kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls setpriority(2), which is async-signal-safe, and allocates
    // nothing. The child has one thread, so the niceness covers all the
    // threads it will make.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, POOL_NICE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// `pidfd_open(2)`: an fd that names process `pid` for good.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)`.
fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    // SAFETY: the fd is a pidfd we own; a null siginfo asks the kernel to
    // fill in what kill(2) would.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd registered with tokio: readable once its process has exited.
pub(crate) struct PidFd(AsyncFd<OwnedFd>);

impl PidFd {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and
        // names the same pidfd for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map(Self)
            .map_err(|e| e.into_parts().1)
    }

    fn exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }
}

/// Watches an adopted process until it exits, delivering the signals
/// ordered on `signal`. The process leads its group (the VM's processes
/// are started that way); while the leader lives, its pid cannot be
/// reused, so the group is signalled only while the pidfd says the leader
/// runs, and the leader itself always through the pidfd.
pub(crate) async fn watch(
    pidfd: PidFd,
    pid: u32,
    mut signal: watch::Receiver<Option<Order>>,
) -> ProcessStatus {
    let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let send = |sig: Signal| {
        let _ = pidfd_send_signal(pidfd.0.get_ref(), sig);
        if !pidfd.exited() {
            let _ = killpg(pgid, sig);
        }
    };
    loop {
        tokio::select! {
            r = pidfd.0.readable() => {
                match r {
                    Ok(_) => break,
                    Err(e) => return ProcessStatus::Unknown(format!("watching it failed: {e}")),
                }
            }
            changed = signal.changed() => match changed {
                Ok(()) => {
                    if let Some(Order::Signal(sig)) = *signal.borrow_and_update() {
                        send(sig);
                    }
                }
                // The tree is gone without a word: never leave the process.
                Err(_) => {
                    send(Signal::SIGKILL);
                    let _ = pidfd.0.readable().await;
                    break;
                }
            },
        }
    }
    ProcessStatus::Unknown("its exit status went to the pool that started it".into())
}

/// Gives every thread of the processes in the groups led by `leaders`
/// niceness `nice` (Linux keeps a niceness per thread, and a warm VM's
/// threads all inherited [`POOL_NICE`]). Best effort: a thread that ends
/// meanwhile is skipped.
pub fn renice_groups(leaders: &[u32], nice: i32) {
    for pid in super::memory::processes_in_groups(leaders).unwrap_or_default() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Some(tid) = t
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::id_t>().ok())
            {
                // SAFETY: setpriority takes plain integers.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
            }
        }
    }
}

/// Kills the processes of a VM that was released but not taken, and waits
/// (up to five seconds) until they have exited.
pub async fn kill(handover: &Handover) {
    let mut watched = Vec::new();
    for (p, fd) in handover.record.processes.iter().zip(&handover.pidfds) {
        let _ = pidfd_send_signal(fd, Signal::SIGKILL);
        if let Ok(pgid) = i32::try_from(p.pid) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        if let Ok(dup) = fd.try_clone() {
            if let Ok(w) = PidFd::new(dup) {
                watched.push(w);
            }
        }
    }
    let all = async {
        for w in &watched {
            let _ = w.0.readable().await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(files: Vec<PathBuf>) -> HandoverRecord {
        HandoverRecord {
            vm_id: "v".into(),
            processes: vec![HandedProcess {
                role: ProcessRole::Vmm,
                program: "vmm".into(),
                pid: std::process::id(),
            }],
            files,
            mounts: Vec::new(),
            console: "console.log".into(),
            agent: "vsock.sock".into(),
            keep_console: false,
        }
    }

    fn adopt_err(record: HandoverRecord, fds: usize) -> String {
        let pidfds = (0..fds)
            .map(|_| pidfd_open(std::process::id()).unwrap())
            .collect();
        match RunningVm::adopt(Handover { record, pidfds }, "p", Path::new("/run/x")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("adopted"),
        }
    }

    #[test]
    fn a_record_from_another_process_is_checked() {
        assert!(adopt_err(record(Vec::new()), 0).contains("1 processes came with 0 pidfds"));
        for escape in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
            let e = adopt_err(record(vec![escape.into()]), 1);
            assert!(e.contains("not a path inside"), "{escape}: {e}");
        }
        let mut r = record(Vec::new());
        r.processes[0].role = ProcessRole::FsBackend;
        assert!(adopt_err(r, 1).contains("no process is the VMM"));
    }

    #[test]
    fn the_record_travels_as_json() {
        let r = record(vec!["fs.sock".into()]);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"role\":\"vmm\""), "{text}");
        assert_eq!(serde_json::from_str::<HandoverRecord>(&text).unwrap(), r);
    }
}
