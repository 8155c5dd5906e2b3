//! The container engine: containers and their processes, the sandbox, and
//! the operations the ttrpc service exposes.
//!
//! Every container process is the agent binary re-executed in its `init`
//! mode ([`init`]); the engine talks to it over a control socket
//! ([`channel`]) and learns about exits from the one [`Reaper`].

pub mod caps;
pub mod channel;
pub mod config;
pub mod devices;
pub mod execs;
pub mod init;
pub mod mounts;
pub mod namespaces;
pub mod process;
pub mod rlimits;
pub mod sandbox;
pub mod seccomp;
pub mod spawn;
pub mod spec;
mod warm_up;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Spec};
use tokio::sync::{mpsc, watch};

use crate::cgroup::{self, Cgroup};
use crate::error::{AgentError, Result};
use crate::oom::OomWatch;
use crate::reaper::{Exit, Reaper};
use crate::stdio::{OutputBuffer, StdinWriter};
use channel::Channel;
use config::{BpfInsn, InitConfig};
use sandbox::Sandbox;

/// How long RemoveContainer waits for killed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// One process the agent started: a container's init or an exec.
pub struct Process {
    /// Empty for the container's init.
    pub exec_id: String,
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    stdin: tokio::sync::Mutex<Option<StdinWriter>>,
    stdout: Arc<OutputBuffer>,
    stderr: Arc<OutputBuffer>,
    pty: Option<OwnedFd>,
    /// The control channel until Start.
    channel: tokio::sync::Mutex<Option<Channel>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    /// `oom` is the container's OOM watch (with a cgroup): checked at the
    /// exit, before anyone learns of it.
    fn new(
        exec_id: String,
        s: spawn::Spawned,
        reaper: &Reaper,
        oom: Option<Arc<OomWatch>>,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let waiter = reaper.wait(s.pid);
        let pid = s.pid;
        tokio::spawn(async move {
            if let Ok(exit) = waiter.await {
                // An OOM kill that ends the process is queued before
                // WaitProcess returns and before RemoveContainer (which
                // waits for this exit) can remove the cgroup, so a client
                // that asks GetOomEvent after either gets it, even when
                // the poll never ran in between.
                if oom.as_ref().is_some_and(|o| o.check()) {
                    tracing::info!(pid, "OOM kill found at the exit");
                }
                let _ = tx.send(Some(exit));
            }
        });
        Arc::new(Self {
            exec_id,
            pid: s.pid,
            stdin: tokio::sync::Mutex::new(s.stdin),
            stdout: s.stdout,
            stderr: s.stderr,
            pty: s.pty,
            channel: tokio::sync::Mutex::new(Some(s.channel)),
            exit: rx,
        })
    }

    /// The exit, if it happened.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Result<Exit> {
        let mut rx = self.exit.clone();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| AgentError::internal("the reaper stopped"))?;
        exit.ok_or_else(|| AgentError::internal("the reaper stopped"))
    }

    async fn start(&self, id: &str) -> Result<()> {
        let channel = self.channel.lock().await.take().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "container {id}: the process was already started"
            ))
        })?;
        spawn::start(id, channel).await
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::NotFound(format!(
                "process {} has already exited",
                self.pid
            )));
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid), sig)
            .map_err(|e| AgentError::internal(format!("signalling pid {}: {e}", self.pid)))
    }

    fn close_output(&self) {
        self.stdout.close();
        self.stderr.close();
    }
}

/// One container.
pub struct Container {
    /// The container id.
    pub id: String,
    spec: Spec,
    seccomp: Vec<Vec<BpfInsn>>,
    cgroup: Option<Cgroup>,
    init: Arc<Process>,
    execs: execs::Execs<Arc<Process>>,
    oom: Option<Arc<OomWatch>>,
    oom_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs.get(&self.id, exec_id)
    }

    fn cgroup(&self, what: &str) -> Result<&Cgroup> {
        self.cgroup
            .as_ref()
            .ok_or_else(|| cgroup::unavailable(what))
    }

    /// Pids of every process of the container: its cgroup's, or else every
    /// process in its mount namespace (each container has its own, and
    /// execs join it).
    fn pids(&self) -> Vec<i32> {
        if let Some(cg) = &self.cgroup {
            return cg.procs();
        }
        if self.init.exited().is_some() {
            return Vec::new();
        }
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", self.init.pid)) else {
            return Vec::new();
        };
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|l| l == ns))
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// The engine behind the ttrpc service.
pub struct Engine {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created or removed, so concurrent requests see them taken.
    busy: Mutex<HashSet<String>>,
    sandbox: tokio::sync::Mutex<Sandbox>,
    cgroup_v2: bool,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

impl Engine {
    /// Creates the engine; starts the reaper (call inside the runtime,
    /// before any child exists).
    pub fn new(pid1: bool) -> std::io::Result<Self> {
        let (oom_tx, oom_rx) = mpsc::channel(256);
        Ok(Self {
            reaper: Reaper::start()?,
            containers: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            sandbox: tokio::sync::Mutex::new(Sandbox::new(pid1)),
            cgroup_v2: cgroup::available(),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?} does not exist")))
    }

    fn reserve(&self, id: &str) -> Result<()> {
        let containers = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if containers.contains_key(id) || !busy.insert(id.to_string()) {
            return Err(AgentError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        Ok(())
    }

    fn release(&self, id: &str) {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// CreateSandbox.
    pub async fn create_sandbox(
        &self,
        req: &nutshell_protocol::agent::CreateSandboxRequest,
    ) -> Result<()> {
        self.sandbox.lock().await.create(req)
    }

    /// CreateContainer: everything up to the init waiting for Start.
    pub async fn create_container(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        want_stdin: bool,
    ) -> Result<i32> {
        spec::check_id("container id", id, false)?;
        self.reserve(id)?;
        // Released even if the caller's deadline drops this future.
        let _busy = Busy { engine: self, id };
        self.create_inner(id, spec_json, rootfs, want_stdin).await
    }

    async fn create_inner(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        want_stdin: bool,
    ) -> Result<i32> {
        let spec = spec::parse_spec(id, spec_json)?;
        spec::check_supported(id, &spec)?;
        // Not held across the spawn: one slow set-up must not block others.
        let (shared_dir, sandbox_ns, sandbox_hostname) = {
            let sb = self.sandbox.lock().await;
            (
                sb.shared_dir().to_path_buf(),
                sb.namespaces(),
                sb.hostname(),
            )
        };
        let rootfs = spec::rootfs(id, rootfs, &spec, &shared_dir)?;
        let (join, unshare) = spec::plan_namespaces(id, &spec, &sandbox_ns)?;
        let linux = spec.linux().as_ref();
        let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
            Some(profile) => seccomp::compile(profile)
                .map_err(|e| AgentError::invalid(format!("container {id}: {e}")))?,
            None => Vec::new(),
        };
        let resources = linux.and_then(|l| l.resources().clone());
        let needs_cgroup = resources
            .as_ref()
            .is_some_and(cgroup::resources_need_cgroup);
        if needs_cgroup && !self.cgroup_v2 {
            return Err(cgroup::unavailable(&format!(
                "container {id}: applying linux.resources"
            )));
        }
        let process = spec.process().clone().ok_or_else(|| {
            AgentError::invalid(format!("container {id}: the spec has no process"))
        })?;
        let hostname = if unshare & libc::CLONE_NEWUTS != 0 {
            spec.hostname().clone().or(sandbox_hostname)
        } else {
            None
        };
        let cgroup = if self.cgroup_v2 {
            Some(Cgroup::create(id)?)
        } else {
            None
        };
        if let (Some(cg), Some(r)) = (&cgroup, &resources) {
            if let Err(e) = cg.apply(r) {
                let _ = cg.remove().await;
                return Err(e);
            }
        }
        let cfg = InitConfig {
            exec: false,
            rootfs,
            terminal: process.terminal().unwrap_or(false),
            process,
            spec: spec.clone(),
            join,
            unshare,
            hostname,
            seccomp: seccomp.clone(),
            cgroup_v2: self.cgroup_v2,
        };
        // The baseline is read before any process of the container exists.
        let oom = cgroup
            .as_ref()
            .map(|cg| OomWatch::new(id, cg.path(), self.oom_tx.clone()));
        let spawned = match spawn::spawn(id, cfg, want_stdin, cgroup.as_ref(), &self.reaper).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove().await;
                }
                return Err(e);
            }
        };
        let init = Process::new(String::new(), spawned, &self.reaper, oom.clone());
        let pid = init.pid;
        self.sandbox.lock().await.container_created(pid);
        // The poll catches kills of other processes while the init runs.
        let oom_stop = oom.as_ref().map(|o| o.poll());
        let container = Arc::new(Container {
            id: id.to_string(),
            spec,
            seccomp,
            cgroup,
            init,
            execs: execs::Execs::default(),
            oom,
            oom_stop,
        });
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), container);
        tracing::info!(container = id, pid, "container created");
        Ok(pid)
    }

    /// StartContainer.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        c.init.start(id).await?;
        tracing::info!(container = id, "container started");
        Ok(())
    }

    /// ExecProcess: a new process in the running container's namespaces.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        want_stdin: bool,
    ) -> Result<i32> {
        spec::check_id("exec id", exec_id, false)?;
        let c = self.container(id)?;
        let process = spec::parse_process(id, process_json)?;
        if c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if c.init.channel.lock().await.is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} has not been started"
            )));
        }
        let slot = c.execs.reserve(id, exec_id)?;
        let p = self.exec_inner(&c, exec_id, process, want_stdin).await?;
        let pid = p.pid;
        slot.fill(p);
        Ok(pid)
    }

    async fn exec_inner(
        &self,
        c: &Container,
        exec_id: &str,
        process: oci_spec::runtime::Process,
        want_stdin: bool,
    ) -> Result<Arc<Process>> {
        let cfg = InitConfig {
            exec: true,
            rootfs: PathBuf::from("/"),
            terminal: process.terminal().unwrap_or(false),
            process,
            spec: c.spec.clone(),
            join: namespaces::joins_for_exec(c.init.pid),
            unshare: 0,
            hostname: None,
            seccomp: c.seccomp.clone(),
            cgroup_v2: self.cgroup_v2,
        };
        let spawned = spawn::spawn(&c.id, cfg, want_stdin, c.cgroup.as_ref(), &self.reaper).await?;
        let p = Process::new(exec_id.to_string(), spawned, &self.reaper, c.oom.clone());
        if let Err(e) = p.start(&c.id).await {
            let _ = p.signal(Signal::SIGKILL);
            return Err(e);
        }
        tracing::info!(container = %c.id, exec_id, pid = p.pid, "exec started");
        Ok(p)
    }

    /// WaitProcess.
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let p = self.container(id)?.process(exec_id)?;
        p.wait().await
    }

    /// SignalProcess.
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| AgentError::invalid(format!("signal {signal} is not a valid signal")))?;
        let c = self.container(id)?;
        if all {
            for pid in c.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        c.process(exec_id)?.signal(sig)
    }

    /// ListProcesses.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<(i32, String)>> {
        let c = self.container(id)?;
        let known: HashMap<i32, String> = c
            .execs
            .running()
            .iter()
            .map(|p| (p.pid, p.exec_id.clone()))
            .collect();
        Ok(c.pids()
            .into_iter()
            .map(|pid| (pid, known.get(&pid).cloned().unwrap_or_default()))
            .collect())
    }

    /// WriteStdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let p = self.container(id)?.process(exec_id)?;
        let stdin = p.stdin.lock().await;
        let w = stdin.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "container {id}: stdin of {exec_id:?} is closed or was not requested"
            ))
        })?;
        w.write_all(data).await.map_err(|e| {
            AgentError::FailedPrecondition(format!("container {id}: writing stdin: {e}"))
        })
    }

    /// CloseStdin: EOF for a pipe, ^D for a terminal.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.container(id)?.process(exec_id)?;
        let mut stdin = p.stdin.lock().await;
        if let Some(w) = stdin.as_ref() {
            if w.is_terminal() {
                let _ = w.write_all(&[4]).await;
                return Ok(());
            }
        }
        stdin.take();
        Ok(())
    }

    /// ReadStdout/ReadStderr.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: u32,
    ) -> Result<(Vec<u8>, bool)> {
        let p = self.container(id)?.process(exec_id)?;
        let cap = if max == 0 {
            nutshell_protocol::MAX_STDIO_CHUNK
        } else {
            max.min(nutshell_protocol::MAX_STDIO_CHUNK)
        };
        let buf = if stderr {
            p.stderr.clone()
        } else {
            p.stdout.clone()
        };
        Ok(buf.read(cap as usize).await)
    }

    /// ResizeTerminal.
    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let p = self.container(id)?.process(exec_id)?;
        let pty = p.pty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "container {id}: process {exec_id:?} has no terminal"
            ))
        })?;
        let (Ok(rows), Ok(cols)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(AgentError::invalid(format!(
                "terminal size {rows}x{cols} is out of range"
            )));
        };
        crate::pty::resize(pty.as_fd(), rows, cols)
            .map_err(|e| AgentError::internal(format!("resizing the terminal: {e}")))
    }

    /// PauseContainer/ResumeContainer.
    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let c = self.container(id)?;
        c.cgroup(if frozen {
            "pausing a container"
        } else {
            "resuming a container"
        })?
        .freeze(frozen)
        .await
    }

    /// UpdateContainer.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.container(id)?;
        let r: LinuxResources = serde_json::from_slice(resources_json).map_err(|e| {
            AgentError::invalid(format!("container {id}: the resources are malformed: {e}"))
        })?;
        c.cgroup("updating resources")?.apply(&r)
    }

    /// StatsContainer.
    pub async fn stats(
        &self,
        id: &str,
    ) -> Result<nutshell_protocol::agent::StatsContainerResponse> {
        let c = self.container(id)?;
        Ok(c.cgroup("container statistics")?.stats())
    }

    /// GetOomEvent: blocks until a container is OOM-killed.
    pub async fn next_oom(&self) -> Result<String> {
        self.oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| AgentError::internal("the OOM event stream ended"))
    }

    /// RemoveContainer with an exec id: forgets one exec process (killing
    /// it first if it still runs), so long-lived containers with many execs
    /// (probes) do not accumulate them.
    pub async fn remove_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Err(AgentError::invalid(format!(
                "container {id}: removing an exec needs its exec id"
            )));
        }
        let p = c.process(exec_id)?;
        let _ = p.signal(Signal::SIGKILL);
        if tokio::time::timeout(KILL_TIMEOUT, p.wait()).await.is_err() {
            return Err(AgentError::internal(format!(
                "container {id}: exec {exec_id:?} (pid {}) did not exit after SIGKILL",
                p.pid
            )));
        }
        p.close_output();
        c.execs.remove(exec_id);
        Ok(())
    }

    /// RemoveContainer: kills what is left, waits for it, frees the rest.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        self.reserve_for_removal(id)?;
        let _busy = Busy { engine: self, id };
        let res = self.remove_inner(&c).await;
        if res.is_ok() {
            self.containers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
            self.sandbox.lock().await.container_removed(c.init.pid);
            tracing::info!(container = id, "container removed");
        }
        res
    }

    fn reserve_for_removal(&self, id: &str) -> Result<()> {
        if !self
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string())
        {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is already being removed"
            )));
        }
        Ok(())
    }

    async fn remove_inner(&self, c: &Container) -> Result<()> {
        let execs = c.execs.running();
        if let Some(cg) = &c.cgroup {
            // A frozen cgroup would keep SIGKILL from being delivered.
            let _ = cg.freeze(false).await;
        }
        for pid in c.pids() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for p in std::iter::once(&c.init).chain(execs.iter()) {
            let _ = p.signal(Signal::SIGKILL);
            if tokio::time::timeout(KILL_TIMEOUT, p.wait()).await.is_err() {
                return Err(AgentError::internal(format!(
                    "container {}: pid {} did not exit after SIGKILL",
                    c.id, p.pid
                )));
            }
            p.close_output();
        }
        if let Some(cg) = &c.cgroup {
            cg.remove().await?;
        }
        Ok(())
    }

    /// Removes every container and the sandbox (DestroySandbox, shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id).await {
                tracing::warn!("removing container {id} failed: {e}");
            }
        }
        self.sandbox.lock().await.destroy();
    }
}

/// Marks an id busy for as long as it lives.
struct Busy<'a> {
    engine: &'a Engine,
    id: &'a str,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.engine.release(self.id);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(stop) = self.oom_stop.take() {
            let _ = stop.send(());
        }
    }
}
