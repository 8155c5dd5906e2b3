//! Containers and processes as the shim tracks them.
//!
//! A [`Process`] is a container's init process (exec id "") or one exec'd
//! into it. Its exit is a `watch` value, so any number of `Wait` calls can
//! block on it while the task service keeps serving every other call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::Status;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use super::stdio::{Relays, StdioConfig};

/// Exit status reported when the VM, and with it every process, is gone.
pub const VM_GONE_EXIT_STATUS: u32 = 255;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Shell convention: the code, or 128 + the signal.
    pub status: u32,
    pub at: SystemTime,
}

impl ExitInfo {
    /// `at` as a protobuf timestamp.
    pub fn timestamp(&self) -> Timestamp {
        timestamp(self.at)
    }
}

/// `t` as a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Where a process is in its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    /// A Start call holds the claim ([`Process::claim_start`]).
    Starting,
    Started,
}

#[derive(Debug)]
struct ProcState {
    pid: u32,
    phase: Phase,
    paused: bool,
}

/// One process of a container.
#[derive(Debug)]
pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioConfig,
    /// An exec's OCI `Process`, JSON (empty for init).
    pub spec_json: Vec<u8>,
    state: Mutex<ProcState>,
    exit: watch::Sender<Option<ExitInfo>>,
    relays: tokio::sync::Mutex<Option<Relays>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioConfig, spec_json: Vec<u8>) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            spec_json,
            state: Mutex::new(ProcState {
                pid: 0,
                phase: Phase::Created,
                paused: false,
            }),
            exit: watch::channel(None).0,
            relays: tokio::sync::Mutex::new(None),
        }
    }

    /// The id containerd's events use for this process: the container id
    /// for init, the exec id otherwise.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    pub fn set_pid(&self, pid: u32) {
        lock(&self.state).pid = pid;
    }

    /// Claims the right to start the process: one caller gets it, any
    /// other concurrent or later one gets `None`. The claim is given back
    /// when dropped uncommitted, so a failed start can be retried.
    pub fn claim_start(self: &Arc<Self>) -> Option<StartClaim> {
        let mut s = lock(&self.state);
        if s.phase != Phase::Created {
            return None;
        }
        s.phase = Phase::Starting;
        Some(StartClaim {
            process: Some(self.clone()),
        })
    }

    /// Whether a start was claimed (running, or about to): such a process
    /// is no longer merely created.
    pub fn started(&self) -> bool {
        lock(&self.state).phase != Phase::Created
    }

    pub fn set_paused(&self, paused: bool) {
        lock(&self.state).paused = paused;
    }

    /// containerd's view of the process.
    pub fn status(&self) -> Status {
        if self.exited().is_some() {
            return Status::STOPPED;
        }
        let s = lock(&self.state);
        match (s.phase, s.paused) {
            (Phase::Created | Phase::Starting, _) => Status::CREATED,
            (Phase::Started, true) => Status::PAUSED,
            (Phase::Started, false) => Status::RUNNING,
        }
    }

    /// The exit, once known.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Records the exit; `false` if it was already recorded (the exit event
    /// must be published once).
    pub fn set_exited(&self, status: u32, at: SystemTime) -> bool {
        let mut first = false;
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(ExitInfo { status, at });
                first = true;
            }
            first
        });
        first
    }

    /// Blocks until the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        // The sender lives in `self`: it cannot be gone while we borrow.
        let seen = rx.wait_for(Option::is_some).await.ok().and_then(|e| *e);
        seen.unwrap_or(ExitInfo {
            status: VM_GONE_EXIT_STATUS,
            at: SystemTime::now(),
        })
    }

    pub async fn set_relays(&self, r: Relays) {
        *self.relays.lock().await = Some(r);
    }

    /// CloseIO.
    pub async fn close_stdin(&self) {
        if let Some(r) = self.relays.lock().await.as_ref() {
            r.close_stdin();
        }
    }

    /// Lets the output relays finish (see [`Relays::drain`]).
    pub async fn drain_output(&self, idle: Duration, limit: Duration) {
        if let Some(r) = self.relays.lock().await.as_mut() {
            r.drain(idle, limit).await;
        }
    }

    /// Stops the relays at once.
    pub async fn stop_relays(&self) {
        if let Some(mut r) = self.relays.lock().await.take() {
            r.stop();
        }
    }
}

/// The one claim on starting a process ([`Process::claim_start`]).
#[derive(Debug)]
pub struct StartClaim {
    process: Option<Arc<Process>>,
}

impl StartClaim {
    /// The process runs as `pid`.
    pub fn commit(mut self, pid: u32) {
        if let Some(p) = self.process.take() {
            let mut s = lock(&p.state);
            s.pid = pid;
            s.phase = Phase::Started;
        }
    }
}

impl Drop for StartClaim {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            lock(&p.state).phase = Phase::Created;
        }
    }
}

/// A container of the pod.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// This container's VM is the pod's: deleting it ends the VM.
    pub owns_pod: bool,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn new(id: &str, bundle: PathBuf, owns_pod: bool, init: Arc<Process>) -> Self {
        Self {
            id: id.to_string(),
            bundle,
            owns_pod,
            init,
            execs: Mutex::new(HashMap::new()),
        }
    }

    /// The process `exec_id` ("" for init).
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            Some(self.init.clone())
        } else {
            lock(&self.execs).get(exec_id).cloned()
        }
    }

    /// Adds an exec; `false` when the id is taken.
    pub fn add_exec(&self, p: Arc<Process>) -> bool {
        let mut execs = lock(&self.execs);
        if execs.contains_key(&p.exec_id) {
            return false;
        }
        execs.insert(p.exec_id.clone(), p);
        true
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).remove(exec_id)
    }

    /// Every process, init first.
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(lock(&self.execs).values().cloned());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_every_waiter() {
        let p = Arc::new(Process::new("c", "", StdioConfig::default(), Vec::new()));
        assert_eq!(p.status(), Status::CREATED);
        p.claim_start().unwrap().commit(42);
        assert_eq!(p.status(), Status::RUNNING);
        assert_eq!(p.pid(), 42);
        p.set_paused(true);
        assert_eq!(p.status(), Status::PAUSED);
        p.set_paused(false);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.wait().await.status })
            })
            .collect();
        tokio::task::yield_now().await;
        let t = SystemTime::now();
        assert!(p.set_exited(7, t));
        assert!(!p.set_exited(9, t), "a second exit is ignored");
        for w in waiters {
            assert_eq!(w.await.unwrap(), 7);
        }
        assert_eq!(p.status(), Status::STOPPED);
        assert_eq!(p.exited().unwrap().status, 7);
    }

    #[test]
    fn one_start_claim_at_a_time_and_a_dropped_one_is_given_back() {
        let p = Arc::new(Process::new("c", "", StdioConfig::default(), Vec::new()));
        let claim = p.claim_start().expect("the first claim");
        assert!(p.claim_start().is_none(), "a second claim while starting");
        assert!(p.started());
        assert_eq!(p.status(), Status::CREATED, "not running yet");
        drop(claim);
        assert!(!p.started(), "a failed start leaves the process created");
        p.claim_start().expect("claimable again").commit(7);
        assert!(
            p.claim_start().is_none(),
            "a started process is not restarted"
        );
    }

    #[test]
    fn execs_are_unique_and_event_ids_follow_containerd() {
        let init = Arc::new(Process::new("c", "", StdioConfig::default(), Vec::new()));
        assert_eq!(init.event_id(), "c");
        let c = Container::new("c", "/b".into(), true, init);
        let e = Arc::new(Process::new(
            "c",
            "e1",
            StdioConfig::default(),
            b"{}".to_vec(),
        ));
        assert_eq!(e.event_id(), "e1");
        assert!(c.add_exec(e.clone()));
        assert!(!c.add_exec(e));
        assert_eq!(c.processes().len(), 2);
        assert!(c.process("e1").is_some());
        assert!(c.process("nope").is_none());
        assert!(c.remove_exec("e1").is_some());
    }

    #[test]
    fn timestamps_convert() {
        let t = UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }
}
