//! `nutshell pool`: keeps warm VMs and hands them to claimers.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::Notify;

use super::wire::{self, Offer, Reply, Request, Taken};
use super::{shared_dir_of, PoolError, VmShape};
use crate::agent::{AgentAddress, AgentClient, DialOptions};
use crate::config::Config;
use crate::hypervisor::handover::{self, Handover};
use crate::hypervisor::select::select_backend;
use crate::hypervisor::{Hypervisor, Nic, RunningVm};
use crate::mounts::{prepare_shared_dir, remove_tree, unmount_below};
use crate::network::{open_netns, HoldingNetns, WarmTap};
use crate::shim::state::{
    check_id, kill_recorded, process_start_time, record_processes, PodRecord, RUN_DIR,
};

/// How long a claimer gets to send its claim, and then to confirm.
const CLAIMER_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait after a failed boot before the next one.
const BOOT_BACKOFF: Duration = Duration::from_secs(5);

/// One size the pool keeps warm.
#[derive(Debug, Clone)]
struct Class {
    shape: VmShape,
    vcpus: u32,
    memory_mib: u32,
    warm: usize,
}

/// A booted VM waiting for a claim.
struct Warm {
    seq: u64,
    vm: RunningVm,
    dir: PathBuf,
    /// Its NICs' taps, in the holding namespace.
    taps: Vec<WarmTap>,
}

struct Pool {
    config: Config,
    hypervisor: Box<dyn Hypervisor>,
    classes: Vec<Class>,
    /// Where warm VMs' taps wait; `None` when they have no NICs.
    holding: Option<HoldingNetns>,
    /// Where the warm VMs' state directories are.
    dir: PathBuf,
    /// This pool's prefix for them: its pid and start time, so that a
    /// later pool can tell a dead pool's leftovers from a live pool's VMs.
    prefix: String,
    seq: AtomicU64,
    warm: Mutex<HashMap<VmShape, Vec<Warm>>>,
    refill: Notify,
}

/// Where every pool keeps its warm VMs: beside the pods' directories, on
/// the same file system, so that a VM's directory moves to its pod's by
/// rename.
pub fn pool_dir() -> PathBuf {
    Path::new(RUN_DIR).join("pool")
}

/// Runs the pool until `stop` resolves: binds `config.pool.socket`, keeps
/// `config.pool.warm` VMs of the default size (and those of
/// `config.pool.sizes`) booted, and serves claims. On the way out the
/// warm VMs are killed and their directories and the socket removed;
/// claimed VMs are their owners' and stay.
pub async fn serve(config: Config, stop: impl Future<Output = ()>) -> Result<(), PoolError> {
    let hypervisor = select_backend(config.vm.backend).await.map_err(|e| {
        PoolError::Setup(format!(
            "vm.backend = \"{}\" in {}: {e}",
            config.vm.backend,
            config.source_name()
        ))
    })?;
    let mut classes = vec![(config.vm.vcpus, config.vm.memory_mib, config.pool.warm)];
    classes.extend(
        config
            .pool
            .sizes
            .iter()
            .map(|s| (s.vcpus, s.memory_mib, s.warm)),
    );
    let probe_dir = Path::new("/");
    let classes: Vec<Class> = classes
        .into_iter()
        .map(|(vcpus, memory_mib, warm)| {
            let vm = config.vm_config("probe", probe_dir, probe_dir, vcpus, memory_mib);
            Class {
                shape: VmShape::of(&vm, hypervisor.name()),
                vcpus,
                memory_mib,
                warm: warm as usize,
            }
        })
        .collect();
    let holding = match config.pool.nics {
        0 => None,
        _ => Some(HoldingNetns::new().map_err(|e| {
            PoolError::Setup(format!(
                "cannot make the pool's network namespace for warm VMs' NICs: {}; pool.nics = 0 in {} keeps warm VMs without NICs",
                crate::shim::pod::chain(&e),
                config.source_name()
            ))
        })?),
    };
    let dir = pool_dir();
    std::fs::create_dir_all(&dir).map_err(PoolError::io(format!("create {}", dir.display())))?;
    clean_leftovers(&dir);
    let listener = bind(&config.pool.socket)?;
    let me = std::process::id();
    let start = process_start_time(me).unwrap_or(0);
    let pool = Arc::new(Pool {
        config,
        hypervisor,
        classes,
        holding,
        dir,
        prefix: format!("{me}.{start}"),
        seq: AtomicU64::new(0),
        warm: Mutex::new(HashMap::new()),
        refill: Notify::new(),
    });
    tracing::info!(socket = %pool.config.pool.socket.display(), backend = pool.hypervisor.name(), nics = pool.config.pool.nics,
        sizes = ?pool.classes.iter().map(|c| format!("{}x {}", c.warm, c.shape)).collect::<Vec<_>>(), "pool serving");
    let refill = tokio::spawn(pool.clone().keep_warm());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(pool.clone().serve_claim(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a claimer failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Cancelled, not just asked to be: a boot still running on another
    // worker could start VM processes after the clean-up below.
    refill.abort();
    let _ = refill.await;
    let _ = std::fs::remove_file(&pool.config.pool.socket);
    let warm: Vec<Warm> = match pool.warm.lock() {
        Ok(mut w) => w.drain().flat_map(|(_, v)| v).collect(),
        Err(_) => Vec::new(),
    };
    for w in warm {
        w.vm.kill().await;
        undo_dir(&w.dir);
    }
    // A boot cut short by the stop left a directory, maybe processes.
    if let Ok(entries) = std::fs::read_dir(&pool.dir) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}.", pool.prefix))
            {
                kill_and_remove(&e.path());
            }
        }
    }
    // Only when empty: another pool may still keep VMs there.
    let _ = std::fs::remove_dir(&pool.dir);
    tracing::info!("pool stopped");
    Ok(())
}

/// Binds the pool's socket, root only. A socket another pool answers on
/// is an error; a stale one is replaced.
fn bind(socket: &Path) -> Result<UnixListener, PoolError> {
    use std::os::unix::fs::PermissionsExt;
    if UnixStream::connect(socket).is_ok() {
        return Err(PoolError::Setup(format!(
            "another pool already listens on {}; stop it first, or give this one another pool.socket",
            socket.display()
        )));
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .map_err(PoolError::io(format!("create {}", parent.display())))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(PoolError::io(format!(
                "remove the stale {}",
                socket.display()
            ))(e))
        }
        _ => {}
    }
    let listener = UnixListener::bind(socket)
        .map_err(PoolError::io(format!("listen on {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(
        PoolError::io(format!("make {} root-only", socket.display())),
    )?;
    Ok(listener)
}

/// Kills and removes what pools that are gone left in `dir`: VMs they
/// booted and never gave away.
fn clean_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('.');
        let owner = parts.next().and_then(|p| p.parse::<u32>().ok());
        let start = parts.next().and_then(|s| s.parse::<u64>().ok());
        if let (Some(pid), Some(start)) = (owner, start) {
            if process_start_time(pid) == Some(start) {
                continue;
            }
        }
        tracing::info!(dir = %e.path().display(), "removing a warm VM a stopped pool left");
        kill_and_remove(&e.path());
    }
}

/// Kills a warm VM that has no supervisor (its pool died, or its boot
/// was cut short) and removes its directory. The VM's processes are
/// found by its record, or, when the pool died before writing one, by the
/// directory their command lines name (root's processes only).
fn kill_and_remove(dir: &Path) {
    if let Some(record) = PodRecord::load(dir) {
        kill_recorded(&record, Duration::from_secs(5));
    }
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        undo_dir(dir);
        return;
    };
    for p in procs.flatten() {
        use std::os::unix::fs::MetadataExt;
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if p.metadata().map(|m| m.uid()).ok() != Some(0) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            tracing::info!(pid, "killing a process of a warm VM that lost its pool");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    undo_dir(dir);
}

fn undo_dir(dir: &Path) {
    if let Err(e) = unmount_below(dir).and_then(|()| remove_tree(dir)) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a warm VM's directory");
    }
}

impl Pool {
    /// Boots VMs, one at a time, until every size has its count; then
    /// waits for a claim or a dead VM.
    async fn keep_warm(self: Arc<Self>) {
        loop {
            let short = self
                .classes
                .iter()
                .find(|c| self.count(&c.shape) < c.warm)
                .cloned();
            match short {
                Some(class) => {
                    if let Err(e) = self.boot(&class).await {
                        tracing::warn!(size = %class.shape, error = %crate::shim::pod::chain(&e), "booting a warm VM failed");
                        tokio::time::sleep(BOOT_BACKOFF).await;
                    }
                }
                None => self.refill.notified().await,
            }
        }
    }

    fn count(&self, shape: &VmShape) -> usize {
        self.warm
            .lock()
            .map(|w| w.get(shape).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    async fn boot(self: &Arc<Self>, class: &Class) -> Result<(), PoolError> {
        let started = Instant::now();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{}.{seq}", self.prefix));
        let shared = shared_dir_of(&dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(PoolError::io(format!("create {}", dir.display())))?;
        }
        let undo = |e: PoolError| {
            undo_dir(&dir);
            e
        };
        prepare_shared_dir(&shared)
            .map_err(|e| undo(PoolError::Setup(crate::shim::pod::chain(&e))))?;
        let id = format!("pool-{}.{seq}", self.prefix);
        let mut cfg = self
            .config
            .vm_config(&id, &dir, &shared, class.vcpus, class.memory_mib);
        cfg.handover = true;
        let mut taps = Vec::new();
        if let Some(holding) = &self.holding {
            cfg.netns = Some(holding.netns());
            let made = holding
                .make_taps(seq, self.config.pool.nics as usize)
                .await
                .map_err(|e| undo(PoolError::Setup(crate::shim::pod::chain(&e))))?;
            for (tap, fd) in made {
                cfg.nics.push(Nic {
                    mac: tap.mac,
                    tap: Arc::new(fd),
                });
                taps.push(tap);
            }
        }
        // The VMM holds its own copies of the taps; closing ours (with
        // `cfg`) ties each tap's life to the VM's.
        let launched = self.hypervisor.launch(&cfg).await;
        drop(cfg);
        let vm = launched.map_err(|e| undo(PoolError::Setup(crate::shim::pod::chain(&e))))?;
        let record = PodRecord {
            shim_pid: std::process::id(),
            processes: record_processes(
                &vm.processes()
                    .iter()
                    .map(|(role, pid)| (role.to_string(), *pid))
                    .collect::<Vec<_>>(),
            ),
        };
        if let Err(e) = record.save(&dir) {
            vm.kill().await;
            return Err(undo(PoolError::Setup(crate::shim::pod::chain(&e))));
        }
        let dial = DialOptions {
            deadline: self.config.agent.dial_timeout,
            ..DialOptions::default()
        };
        let address = AgentAddress::hybrid_vsock(vm.agent_socket());
        // A pod's first create then runs code its guest has run before; a
        // VM whose warm-up fails is not trusted with a pod.
        let ready = match AgentClient::connect(&address, &dial, Some(vm.end_watch())).await {
            Ok(agent) if self.config.pool.warm_up => {
                let booted = started.elapsed();
                agent.warm_up().await.map(|()| booted)
            }
            Ok(_) => Ok(started.elapsed()),
            Err(e) => Err(e),
        };
        let booted = match ready {
            Ok(booted) => booted,
            Err(e) => {
                let exit = vm.kill().await;
                return Err(undo(PoolError::Setup(format!(
                    "{}; {exit}",
                    crate::shim::pod::chain(&e)
                ))));
            }
        };
        tracing::info!(
            vm = %id,
            size = %class.shape,
            boot_ms = booted.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "warm VM ready"
        );
        let end = vm.end_watch();
        if let Ok(mut w) = self.warm.lock() {
            w.entry(class.shape.clone())
                .or_default()
                .push(Warm { seq, vm, dir, taps });
        }
        // A warm VM that dies is replaced. (A claimed one's watch closes
        // without an exit, and it is not on the list any more.)
        let me = self.clone();
        let shape = class.shape.clone();
        tokio::spawn(async move {
            let exit = end.wait().await;
            let gone = me.take_seq(&shape, seq);
            if let Some(w) = gone {
                tracing::warn!(vm = %w.vm.id(), %exit, "a warm VM ended; booting another");
                undo_dir(&w.dir);
                me.refill.notify_one();
            }
        });
        Ok(())
    }

    fn take_seq(&self, shape: &VmShape, seq: u64) -> Option<Warm> {
        let mut w = self.warm.lock().ok()?;
        let list = w.get_mut(shape)?;
        let i = list.iter().position(|x| x.seq == seq)?;
        Some(list.remove(i))
    }

    /// A warm VM of `shape` that still runs, off the list.
    fn take(&self, shape: &VmShape) -> Option<Warm> {
        let mut w = self.warm.lock().ok()?;
        let list = w.get_mut(shape)?;
        while let Some(x) = list.pop() {
            if x.vm.try_ended().is_none() {
                return Some(x);
            }
        }
        None
    }

    fn put_back(&self, shape: VmShape, warm: Warm) {
        if let Ok(mut w) = self.warm.lock() {
            w.entry(shape).or_default().push(warm);
        }
    }

    /// One claimer's connection: its claim, the offer, its confirmation.
    async fn serve_claim(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(CLAIMER_TIMEOUT))?;
            s.set_write_timeout(Some(CLAIMER_TIMEOUT))?;
            Ok(s)
        }) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot set a claimer's connection up");
                return;
            }
        };
        let s = stream.clone();
        let request = tokio::task::spawn_blocking(move || -> Result<Request, PoolError> {
            if wire::peer_uid(s.as_ref())? != 0 {
                return Err(PoolError::Protocol("only root may claim a VM".into()));
            }
            wire::receive_plain(&s)
        })
        .await
        .map_err(|e| PoolError::Protocol(e.to_string()))
        .and_then(|r| r);
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a claim was refused");
                let s = stream.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    wire::send(&s, &Reply::None(e.to_string()), &[])
                })
                .await;
                return;
            }
        };
        let (reply, nic_macs) = match self.offer(&request).await {
            Ok(h) => h,
            Err(why) => {
                tracing::debug!(%why, size = %request.shape, "no VM for a claim");
                let s = stream.clone();
                let _ = tokio::task::spawn_blocking(move || wire::send(&s, &Reply::None(why), &[]))
                    .await;
                return;
            }
        };
        // The pidfds stay ours until the claimer confirms: a claim that
        // fails in any way (even a panicking task) leaves them here to
        // kill the VM with.
        let s = stream.clone();
        let fds: Vec<_> = reply.pidfds.iter().map(AsRawFd::as_raw_fd).collect();
        let offer = Reply::Offer(Offer {
            vm: reply.record.clone(),
            nic_macs,
        });
        let confirm = tokio::task::spawn_blocking(move || -> Result<(), PoolError> {
            wire::send(&s, &offer, &fds)?;
            match wire::receive_plain::<Taken>(&s)? {
                Taken { taken: true } => Ok(()),
                Taken { taken: false } => {
                    Err(PoolError::Protocol("the claimer turned the VM down".into()))
                }
            }
        })
        .await
        .map_err(|e| PoolError::Protocol(format!("the claim's task failed: {e}")))
        .and_then(|r| r);
        let target = &request.target;
        match confirm {
            Ok(()) => {
                tracing::info!(vm = %reply.record.vm_id, pod = %request.id, dir = %target.display(), "VM claimed");
            }
            Err(e) => {
                tracing::warn!(vm = %reply.record.vm_id, error = %e, "the claimer did not take its VM; the VM is killed");
                handover::kill(&reply).await;
                undo_dir(target);
            }
        }
    }

    /// Takes a warm VM for `request`, moves its directory to the target
    /// and its taps to the pod's network namespace, and lets go of it; with
    /// it, the guest MACs of the NICs the pod gets. `Err` says why there is
    /// none.
    async fn offer(&self, request: &Request) -> Result<(Handover, Vec<String>), String> {
        if !is_state_dir(&request.target) {
            return Err(format!(
                "{} is not a state directory of a pod or run (a name directly in {RUN_DIR})",
                request.target.display()
            ));
        }
        check_id(&request.id).map_err(|e| e.to_string())?;
        let nics = request.network.as_ref().map_or(0, |n| n.nics);
        if nics > self.config.pool.nics as usize {
            return Err(format!(
                "the pod mirrors {nics} interfaces, and warm VMs have {} NICs (pool.nics)",
                self.config.pool.nics
            ));
        }
        // Opened before a VM is taken: a namespace that is gone costs none.
        let netns = match &request.network {
            Some(n) if nics > 0 => {
                Some(open_netns(&n.netns).map_err(|e| crate::shim::pod::chain(&e))?)
            }
            _ => None,
        };
        let Some(warm) = self.take(&request.shape) else {
            return Err(format!("no warm VM of {}", request.shape));
        };
        self.refill.notify_one();
        if let Err(e) = rename_noreplace(&warm.dir, &request.target) {
            let why = format!(
                "cannot move {} to {}: {e}",
                warm.dir.display(),
                request.target.display()
            );
            self.put_back(request.shape.clone(), warm);
            return Err(why);
        }
        if let Some(holding) = &self.holding {
            if let Err(e) = holding.hand_over(&warm.taps, nics, netns).await {
                // Some taps may be the pod's already: the VM cannot go back.
                warm.vm.kill().await;
                undo_dir(&request.target);
                return Err(crate::shim::pod::chain(&e));
            }
        }
        let nic_macs = warm.taps[..nics]
            .iter()
            .map(|t| t.mac.to_string())
            .collect();
        match warm.vm.release().await {
            Ok(h) => Ok((h, nic_macs)),
            Err(e) => {
                undo_dir(&request.target);
                Err(e.to_string())
            }
        }
    }
}

/// Whether a claim may move a VM to `path`: an entry directly in
/// [`RUN_DIR`], as pods' (`PodKey::dir`) and `nutshell run`'s directories
/// are, other than the pool's own. It must not exist; the rename checks.
fn is_state_dir(path: &Path) -> bool {
    path.parent() == Some(Path::new(RUN_DIR))
        && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            check_id(n).is_ok() && !n.starts_with('.') && Path::new(RUN_DIR).join(n) != pool_dir()
        })
}

/// `renameat2(RENAME_NOREPLACE)`: the pod's directory is never overwritten.
fn rename_noreplace(from: &Path, to: &Path) -> nix::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_moves_vms_only_to_state_directories() {
        for good in ["0123456789abcdef0123456789abcdef", "run-123"] {
            assert!(is_state_dir(&Path::new(RUN_DIR).join(good)), "{good}");
        }
        for bad in [
            "/run/nutshell/pool",
            "/run/nutshell/.hidden",
            "/run/nutshell/a/b",
            "/run/nutshell/..",
            "/etc/nutshell",
            "/run/other/abc",
            "relative",
        ] {
            assert!(!is_state_dir(Path::new(bad)), "{bad}");
        }
    }
}
