//! Supervision of a VM's process tree.
//!
//! Each process (the VMM and its vhost-user backends) runs as the leader of
//! its own process group, dies with the runtime (`PR_SET_PDEATHSIG`, and
//! `kill_on_drop`), and has a task that reaps it and reports its exit. The
//! first exit ends the VM: a VM cannot run without any of its processes, so
//! the rest are killed, everything is reaped, the files the VM made in the
//! state directory are removed, and the [`VmExit`] is published to every
//! [`VmEndWatch`]. Nothing here waits without a bound.
//!
//! A VM started for the warm pool ([`ProcessTree::new`] with `handover`)
//! differs in what makes a hand-over possible ([`super::handover`]): its
//! processes outlive this one, write stderr to files, and can be released
//! to another process, which adopts them by pidfd.

use std::collections::VecDeque;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout, Instant};

use super::console::{last_lines, sanitize_line};
use super::handover;
use super::vm::{Control, ProcessRole, ProcessStatus, RunningVm, VmEndWatch, VmExit};
use super::HypervisorError;

/// Console lines kept in a [`VmExit`].
const CONSOLE_TAIL_LINES: usize = 20;
/// How long the VMM gets to follow a backend that ended first.
const VMM_FOLLOWS: Duration = Duration::from_millis(300);
/// Stderr lines kept per process.
pub(super) const STDERR_TAIL_LINES: usize = 10;
/// Longest stderr line buffered before it is cut.
const MAX_STDERR_LINE: usize = 1024;
/// How long killed processes get to be reaped before the supervisor gives up
/// waiting (a process stuck in the kernel); their tasks keep reaping.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Files of one VM in its state directory, removed when it ends.
#[derive(Debug)]
pub(crate) struct StateFiles {
    pub(super) dir: PathBuf,
    pub(super) created_dir: bool,
    pub(super) files: Vec<PathBuf>,
    pub(super) mounts: Vec<PathBuf>,
    pub(super) console_log: PathBuf,
    pub(super) keep_console: bool,
}

impl StateFiles {
    /// Creates `dir` when missing (mode 0700: it holds the VM's sockets).
    pub(crate) fn prepare(dir: &Path, keep_console: bool) -> Result<Self, HypervisorError> {
        use std::os::unix::fs::DirBuilderExt;
        let created_dir = !dir.exists();
        if created_dir {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| HypervisorError::StateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let mut me = Self {
            dir: dir.to_path_buf(),
            created_dir,
            files: Vec::new(),
            mounts: Vec::new(),
            console_log: dir.join("console.log"),
            keep_console,
        };
        let log = me.console_log.clone();
        me.claim(&log)?;
        Ok(me)
    }

    /// Takes `path` (in the state directory) for this VM: removes what a
    /// previous run left there and removes it again when the VM ends.
    pub(crate) fn claim(&mut self, path: &Path) -> Result<PathBuf, HypervisorError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HypervisorError::StateDir {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        if path != self.console_log || !self.keep_console {
            self.files.push(path.to_path_buf());
        }
        Ok(path.to_path_buf())
    }

    /// Records a mount the VM made, unmounted when it ends.
    pub(crate) fn add_mount(&mut self, mount_point: PathBuf) {
        self.mounts.push(mount_point);
    }

    pub(crate) fn console_log(&self) -> &Path {
        &self.console_log
    }

    fn remove(&self) {
        for m in &self.mounts {
            super::shared_dir::release(m);
        }
        for f in &self.files {
            if let Err(e) = std::fs::remove_file(f) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %f.display(), error = %e, "cannot remove a VM file");
                }
            }
        }
        if self.created_dir {
            // Only when empty: the shim may keep its own files there.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

pub(super) struct TreeChild {
    pub(super) role: ProcessRole,
    pub(super) program: String,
    pub(super) pid: u32,
    pub(super) signal: watch::Sender<Option<Order>>,
    exited: bool,
    /// Opened before anything could reap the process, so it names this
    /// process for sure; only for VMs that may be handed over.
    pub(super) pidfd: Option<OwnedFd>,
}

/// What a process's reaping task is told.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Order {
    /// Send this signal to the process's group.
    Signal(Signal),
    /// Another process owns it now: only reap it, never signal it.
    Release,
}

pub(crate) struct ChildExit {
    index: usize,
    status: ProcessStatus,
    stderr_tail: Vec<String>,
}

/// The processes of a VM being started; becomes a [`RunningVm`].
pub(crate) struct ProcessTree {
    pub(super) vm_id: String,
    pub(super) children: Vec<TreeChild>,
    pub(super) exits_tx: mpsc::UnboundedSender<ChildExit>,
    pub(super) exits_rx: mpsc::UnboundedReceiver<ChildExit>,
    pub(super) state: StateFiles,
    /// The VM may be handed to another process (the warm pool's).
    pub(super) handover: bool,
    /// The network namespace its processes start in
    /// ([`super::VmConfig::netns`]).
    netns: Option<Arc<OwnedFd>>,
}

impl ProcessTree {
    pub(crate) fn new(vm_id: &str, state: StateFiles, handover: bool) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            vm_id: vm_id.to_string(),
            children: Vec::new(),
            exits_tx,
            exits_rx,
            state,
            handover,
            netns: None,
        }
    }

    /// Its processes start in the network namespace `netns`.
    pub(crate) fn in_netns(mut self, netns: Option<Arc<OwnedFd>>) -> Self {
        self.netns = netns;
        self
    }

    pub(crate) fn state(&mut self) -> &mut StateFiles {
        &mut self.state
    }

    /// Starts `cmd` as a supervised process of the VM.
    pub(crate) fn spawn(
        &mut self,
        role: ProcessRole,
        program: &str,
        mut cmd: Command,
    ) -> Result<u32, HypervisorError> {
        let spawn_err = |source| HypervisorError::Spawn {
            program: program.to_string(),
            source,
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0);
        let stderr_file = if self.handover {
            let path = self.state.claim(&self.state.dir.join(role.stderr_file()))?;
            handover::detach(&mut cmd, &path).map_err(spawn_err)?;
            Some(path)
        } else {
            cmd.stderr(Stdio::piped()).kill_on_drop(true);
            // SAFETY: the closure runs in the forked child before exec; it
            // only calls prctl(2), which is async-signal-safe, and allocates
            // nothing.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
                });
            }
            None
        };
        if let Some(ns) = &self.netns {
            let fd = ns.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec; it
            // only calls setns(2), which is async-signal-safe, on an fd this
            // tree keeps open, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = spawn_from_keeper(cmd).map_err(spawn_err)?;
        let pid = child
            .id()
            .ok_or_else(|| spawn_err(io::Error::other("it exited before its pid was read")))?;
        // Before the reaping task exists, so the pid cannot be reused yet.
        let pidfd = if self.handover {
            match handover::pidfd_open(pid) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    let _ = child.start_kill();
                    return Err(spawn_err(e));
                }
            }
        } else {
            None
        };
        let stderr = child.stderr.take();
        let name = program.to_string();
        self.track(role, program, pid, pidfd, move |signal_rx| async move {
            let stderr_task = stderr.map(|s| tokio::spawn(read_stderr(s, name)));
            let status = reap(child, pid, signal_rx).await;
            let stderr_tail = match (stderr_task, stderr_file) {
                (Some(t), _) => timeout(Duration::from_millis(200), t)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
                (None, Some(path)) => last_lines(&path, STDERR_TAIL_LINES),
                (None, None) => Vec::new(),
            };
            (status, stderr_tail)
        });
        tracing::debug!(vm = %self.vm_id, program, pid, "started");
        Ok(pid)
    }

    /// Adds a process to the tree: `watch_it`, given the receiver of the
    /// orders for it, returns the task that reports how the process ended
    /// (its status and last stderr lines); that report reaches the tree.
    pub(super) fn track<F>(
        &mut self,
        role: ProcessRole,
        program: &str,
        pid: u32,
        pidfd: Option<OwnedFd>,
        watch_it: impl FnOnce(watch::Receiver<Option<Order>>) -> F,
    ) where
        F: std::future::Future<Output = (ProcessStatus, Vec<String>)> + Send + 'static,
    {
        let (signal, signal_rx) = watch::channel(None);
        let index = self.children.len();
        let exits = self.exits_tx.clone();
        let watched = watch_it(signal_rx);
        tokio::spawn(async move {
            let (status, stderr_tail) = watched.await;
            let _ = exits.send(ChildExit {
                index,
                status,
                stderr_tail,
            });
        });
        self.children.push(TreeChild {
            role,
            program: program.to_string(),
            pid,
            signal,
            exited: false,
            pidfd,
        });
    }

    /// Waits until `socket` exists (a vhost-user backend listens on it).
    /// Fails when any process of the VM ends first, or after `limit`.
    pub(crate) async fn wait_for_socket(
        &mut self,
        program: &str,
        socket: &Path,
        limit: Duration,
    ) -> Result<(), WaitError> {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(1);
        loop {
            if socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout(HypervisorError::SocketTimeout {
                    program: program.to_string(),
                    socket: socket.to_path_buf(),
                    waited: limit,
                }));
            }
            tokio::select! {
                Some(exit) = self.exits_rx.recv() => return Err(WaitError::Ended(exit)),
                _ = sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Gives up on a VM that failed to start: kills and reaps everything,
    /// removes its files, and returns the error to report.
    pub(crate) async fn abort(self, why: WaitError) -> HypervisorError {
        match why {
            WaitError::Ended(first) => {
                let exit = self.finish(first, false).await;
                HypervisorError::EndedWhileStarting(Box::new(exit))
            }
            WaitError::Timeout(e) => {
                self.kill_and_clean().await;
                e
            }
        }
    }

    /// Kills and reaps everything and removes the VM's files.
    pub(crate) async fn kill_and_clean(mut self) {
        self.signal(None, Signal::SIGKILL);
        while self.children.iter().any(|c| !c.exited) {
            match timeout(REAP_TIMEOUT, self.exits_rx.recv()).await {
                Ok(Some(e)) => self.children[e.index].exited = true,
                _ => break,
            }
        }
        self.state.remove();
    }

    /// Hands the started tree to a supervisor task.
    pub(crate) fn into_running(self, agent_socket: PathBuf) -> RunningVm {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (end_tx, end_rx) = watch::channel(None);
        let vm = RunningVm {
            id: self.vm_id.clone(),
            agent_socket,
            console_log: self.state.console_log().to_path_buf(),
            processes: self.children.iter().map(|c| (c.role, c.pid)).collect(),
            control: control_tx,
            end: VmEndWatch(end_rx),
        };
        tokio::spawn(supervise(self, control_rx, end_tx));
        vm
    }

    fn signal(&self, role: Option<ProcessRole>, sig: Signal) {
        for c in &self.children {
            if !c.exited && role.is_none_or(|r| r == c.role) {
                let _ = c.signal.send_replace(Some(Order::Signal(sig)));
            }
        }
    }

    /// Ends the VM after its first process ended: kills the rest, reaps
    /// them (bounded), removes the files, and describes what happened.
    async fn finish(mut self, first: ChildExit, requested: bool) -> VmExit {
        self.children[first.index].exited = true;
        let mut first = first;
        // A backend that exits because the VMM hung up (virtiofsd does, as
        // the guest reboots) can be reaped a moment before the VMM: give the
        // VMM a short while to end by itself, and report it if it does.
        if self.children[first.index].role != ProcessRole::Vmm && !requested {
            let vmm_ended = async {
                while let Some(e) = self.exits_rx.recv().await {
                    self.children[e.index].exited = true;
                    if self.children[e.index].role == ProcessRole::Vmm {
                        return Some(e);
                    }
                }
                None
            };
            if let Ok(Some(vmm)) = timeout(VMM_FOLLOWS, vmm_ended).await {
                first = vmm;
            }
        }
        self.signal(None, Signal::SIGKILL);
        let deadline = Instant::now() + REAP_TIMEOUT;
        while self.children.iter().any(|c| !c.exited) {
            match tokio::time::timeout_at(deadline, self.exits_rx.recv()).await {
                Ok(Some(e)) => self.children[e.index].exited = true,
                _ => {
                    tracing::warn!(vm = %self.vm_id, "VM processes not reaped after SIGKILL");
                    break;
                }
            }
        }
        let console_tail = last_lines(self.state.console_log(), CONSOLE_TAIL_LINES);
        self.state.remove();
        let c = &self.children[first.index];
        let exit = VmExit {
            vm_id: self.vm_id.clone(),
            role: c.role,
            program: c.program.clone(),
            pid: c.pid,
            status: first.status,
            requested,
            stderr_tail: first.stderr_tail,
            console_tail,
        };
        tracing::info!(vm = %self.vm_id, program = %exit.program, pid = exit.pid,
            status = %exit.status, requested, "VM ended");
        exit
    }
}

/// Why waiting during start-up failed.
pub(crate) enum WaitError {
    /// A process of the VM ended.
    Ended(ChildExit),
    /// Something took too long.
    Timeout(HypervisorError),
}

type SpawnJob = (
    Command,
    tokio::runtime::Handle,
    std::sync::mpsc::Sender<io::Result<Child>>,
);

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process: a child forked from a tokio blocking-pool thread (or a
/// worker that `block_in_place` retired) would be killed when that thread
/// idles out. Forking from a thread that never exits ties the VM's life to
/// the runtime process only. The caller's runtime is entered for the spawn,
/// so the child is reaped by that runtime.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    use std::sync::{mpsc as std_mpsc, Mutex, OnceLock};
    static KEEPER: OnceLock<Mutex<std_mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("nutshell-spawner".into())
            .spawn(move || {
                for (mut cmd, handle, reply) in rx {
                    let _entered = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std_mpsc::channel();
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("VM processes must be started inside a tokio runtime"))?;
    let job = (cmd, handle, reply_tx);
    keeper
        .lock()
        .map_err(|_| io::Error::other("the spawner thread's queue is poisoned"))?
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// Waits for `child`, delivering signals sent on `signal` to its whole
/// process group while it runs. The child is only reaped here, so its pid
/// (and group id) cannot be reused while a signal may still be sent to it.
async fn reap(
    mut child: Child,
    pid: u32,
    mut signal: watch::Receiver<Option<Order>>,
) -> ProcessStatus {
    let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let status = loop {
        tokio::select! {
            r = child.wait() => break ProcessStatus::from(r),
            changed = signal.changed() => match changed {
                Ok(()) => {
                    let order = *signal.borrow_and_update();
                    match order {
                        Some(Order::Signal(sig)) => {
                            let _ = killpg(pgid, sig);
                        }
                        // Its new owner signals the group; reaping is all
                        // that is left to do here.
                        Some(Order::Release) => return ProcessStatus::from(child.wait().await),
                        None => {}
                    }
                }
                // The tree is gone without a word: never leave the process.
                Err(_) => {
                    let _ = killpg(pgid, Signal::SIGKILL);
                    break ProcessStatus::from(child.wait().await);
                }
            },
        }
    };
    // Anything the process forked into its group (virtiofsd's sandbox
    // child) goes with it. The group id cannot name another group while any
    // member lives.
    let _ = killpg(pgid, Signal::SIGKILL);
    status
}

/// Reads a process's stderr to its end, logging each line and keeping the
/// last few. Lines are bounded and sanitised.
async fn read_stderr(mut stderr: ChildStderr, program: String) -> Vec<String> {
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut push = |line: &mut Vec<u8>| {
        let text = sanitize_line(&String::from_utf8_lossy(line));
        line.clear();
        if text.trim().is_empty() {
            return;
        }
        tracing::debug!(program = %program, "{text}");
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    };
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                push(&mut line);
            } else if line.len() < MAX_STDERR_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        push(&mut line);
    }
    tail.into()
}

async fn supervise(
    mut tree: ProcessTree,
    mut control: mpsc::UnboundedReceiver<Control>,
    end: watch::Sender<Option<Arc<VmExit>>>,
) {
    let mut requested = false;
    let mut control_open = true;
    let first = loop {
        tokio::select! {
            Some(exit) = tree.exits_rx.recv() => break exit,
            c = control.recv(), if control_open => match c {
                Some(Control::Signal(role, sig)) => {
                    requested = true;
                    tree.signal(role, sig);
                }
                Some(Control::Release(reply)) => {
                    if let Some(released) = tree.release() {
                        let _ = reply.send(Some(released));
                        // The end watch closes unresolved: this process no
                        // longer learns how the VM ends.
                        return;
                    }
                    let _ = reply.send(None);
                }
                // The RunningVm was dropped: nobody can use the VM any more.
                None => {
                    control_open = false;
                    requested = true;
                    tree.signal(None, Signal::SIGKILL);
                }
            },
        }
    };
    let exit = tree.finish(first, requested).await;
    end.send_replace(Some(Arc::new(exit)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // Zombies count as gone: only a reaped or running state matters here.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    fn tree(dir: &Path) -> ProcessTree {
        let state = StateFiles::prepare(&dir.join("state"), false).unwrap();
        ProcessTree::new("t1", state, false)
    }

    #[tokio::test]
    async fn a_dying_backend_ends_the_vm_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let sock = t.state.claim(&dir.path().join("state/x.sock")).unwrap();
        std::fs::write(&sock, b"").unwrap();
        std::fs::write(t.state.console_log(), "booting\nKernel panic - test\n").unwrap();
        let vmm = t
            .spawn(ProcessRole::Vmm, "fake-vmm", sh("exec sleep 30"))
            .unwrap();
        t.spawn(
            ProcessRole::VsockBackend,
            "fake-vsock",
            sh("echo 'backend: lost the guest' >&2; sleep 0.2; exit 3"),
        )
        .unwrap();
        let vm = t.into_running(sock.clone());
        let exit = timeout(Duration::from_secs(10), vm.ended()).await.unwrap();
        assert_eq!(exit.role, ProcessRole::VsockBackend);
        assert_eq!(exit.status, ProcessStatus::Exited(3));
        assert!(!exit.requested);
        assert_eq!(exit.stderr_tail, ["backend: lost the guest"]);
        assert_eq!(exit.console_tail.last().unwrap(), "Kernel panic - test");
        let text = exit.to_string();
        assert!(
            text.contains("fake-vsock") && text.contains("exited with status 3"),
            "{text}"
        );
        assert!(text.contains("Kernel panic - test"), "{text}");
        assert!(!alive(vmm), "the VMM survived its backend");
        assert!(!sock.exists() && !dir.path().join("state").exists());
    }

    #[tokio::test]
    async fn a_vmm_that_ends_just_after_its_backend_is_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        t.spawn(ProcessRole::FsBackend, "fake-fs", sh("sleep 0.3; exit 0"))
            .unwrap();
        t.spawn(ProcessRole::Vmm, "fake-vmm", sh("sleep 0.4; exit 0"))
            .unwrap();
        let vm = t.into_running(dir.path().join("none"));
        let exit = timeout(Duration::from_secs(5), vm.ended()).await.unwrap();
        assert_eq!(exit.role, ProcessRole::Vmm);
        assert!(exit.is_clean_poweroff(), "{exit}");
    }

    #[tokio::test]
    async fn an_outside_sigkill_is_reported_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let vmm = t
            .spawn(ProcessRole::Vmm, "fake-vmm", sh("exec sleep 30"))
            .unwrap();
        let backend = t
            .spawn(ProcessRole::FsBackend, "fake-fs", sh("exec sleep 30"))
            .unwrap();
        let vm = t.into_running(dir.path().join("none"));
        assert_eq!(vm.host_memory().unwrap().processes, 2);
        let pid = nix::unistd::Pid::from_raw(vmm as i32);
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        let exit = timeout(Duration::from_secs(1), vm.ended()).await.unwrap();
        assert_eq!(exit.role, ProcessRole::Vmm);
        assert_eq!(exit.status, ProcessStatus::Signaled(9));
        assert!(exit.to_string().contains("SIGKILL"), "{exit}");
        assert!(!alive(backend));
    }

    /// Both backends start their vhost-user backends before the VMM (QEMU:
    /// vsock then virtio-fs; nutshell-vmm: virtio-fs), so the VMM's pid is
    /// never simply the first one.
    #[tokio::test]
    async fn the_vmm_pid_is_the_vmm_whatever_started_first() {
        let orders: [&[ProcessRole]; 2] = [
            &[
                ProcessRole::VsockBackend,
                ProcessRole::FsBackend,
                ProcessRole::Vmm,
            ],
            &[ProcessRole::FsBackend, ProcessRole::Vmm],
        ];
        for order in orders {
            let dir = tempfile::tempdir().unwrap();
            let mut t = tree(dir.path());
            let mut vmm = None;
            for &role in order {
                let pid = t.spawn(role, "fake", sh("exec sleep 30")).unwrap();
                if role == ProcessRole::Vmm {
                    vmm = Some(pid);
                }
            }
            let vm = t.into_running(dir.path().join("none"));
            assert_ne!(vm.processes()[0].0, ProcessRole::Vmm);
            assert_eq!(vm.vmm_pid(), vmm, "{order:?}");
            vm.kill().await;
        }
    }

    #[tokio::test]
    async fn shutdown_terms_the_vmm_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let vmm = t
            .spawn(ProcessRole::Vmm, "fake-vmm", sh("exec sleep 30"))
            .unwrap();
        let vm = t.into_running(dir.path().join("none"));
        let start = Instant::now();
        let exit = vm.shutdown(Duration::from_millis(100)).await;
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(exit.status, ProcessStatus::Signaled(15));
        assert!(exit.requested);
        assert!(!alive(vmm));
        // Later calls return the same exit at once.
        assert_eq!(vm.kill().await.pid, vmm);
    }

    #[tokio::test]
    async fn shutdown_kills_a_vmm_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let vmm = t
            .spawn(
                ProcessRole::Vmm,
                "stubborn",
                sh("trap '' TERM; while :; do sleep 0.05; done"),
            )
            .unwrap();
        let vm = t.into_running(dir.path().join("none"));
        let exit = vm.shutdown(Duration::from_millis(50)).await;
        assert_eq!(exit.status, ProcessStatus::Signaled(9));
        assert!(!alive(vmm));
    }

    #[tokio::test]
    async fn processes_start_in_the_trees_network_namespace() {
        let ns = crate::network::HoldingNetns::new().unwrap().netns();
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path()).in_netns(Some(ns.clone()));
        let vmm = t
            .spawn(ProcessRole::Vmm, "fake-vmm", sh("exec sleep 30"))
            .unwrap();
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/net")).unwrap();
        let inode = nix::sys::stat::fstat(&*ns).unwrap().st_ino;
        assert_eq!(theirs, PathBuf::from(format!("net:[{inode}]")));
        assert_ne!(theirs, std::fs::read_link("/proc/self/ns/net").unwrap());
        drop(t.into_running(dir.path().join("none")));
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let vmm = t
            .spawn(ProcessRole::Vmm, "fake-vmm", sh("exec sleep 30"))
            .unwrap();
        let vm = t.into_running(dir.path().join("none"));
        let watch = vm.end_watch();
        drop(vm);
        let exit = timeout(Duration::from_secs(5), watch.wait()).await.unwrap();
        assert!(exit.requested);
        assert!(!alive(vmm));
    }

    #[tokio::test]
    async fn a_backend_dying_before_its_socket_fails_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        t.spawn(
            ProcessRole::FsBackend,
            "fake-fs",
            sh("echo 'cannot open shared dir' >&2; exit 1"),
        )
        .unwrap();
        let sock = dir.path().join("state/fs.sock");
        let why = match t
            .wait_for_socket("fake-fs", &sock, Duration::from_secs(5))
            .await
        {
            Err(w) => w,
            Ok(()) => panic!("socket appeared"),
        };
        let e = t.abort(why).await.to_string();
        assert!(
            e.contains("fake-fs") && e.contains("cannot open shared dir"),
            "{e}"
        );
        assert!(!dir.path().join("state").exists());
    }

    #[tokio::test]
    async fn a_missing_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree(dir.path());
        let pid = t
            .spawn(ProcessRole::VsockBackend, "idle", sh("exec sleep 30"))
            .unwrap();
        let sock = dir.path().join("state/never.sock");
        let why = match t
            .wait_for_socket("idle", &sock, Duration::from_millis(100))
            .await
        {
            Err(w) => w,
            Ok(()) => panic!("socket appeared"),
        };
        let e = t.abort(why).await;
        assert!(matches!(e, HypervisorError::SocketTimeout { .. }), "{e}");
        assert!(!alive(pid));
    }
}
