//! The one place that reaps children: a SIGCHLD-driven `waitpid(-1,
//! WNOHANG)` loop that hands each exit status to whoever waits for that pid.
//!
//! Container processes are not children of a `tokio::process::Child`, so
//! nothing else may call `waitpid`; the reaper also collects orphans that
//! are reparented to the agent (PID 1, or a subreaper on a host).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Shell convention: the exit code, or 128 + the signal.
    pub status: i32,
    /// The signal that killed it, 0 when it exited.
    pub signal: i32,
    /// When the reaper saw it.
    pub at: SystemTime,
}

/// Exits nobody waits for yet are kept this long (a bound, since orphans
/// that nobody will ever ask about also land here).
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

/// Hands out exit statuses by pid.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl Reaper {
    /// Starts the reaping task on the current tokio runtime. Must run before
    /// the first child is spawned.
    pub fn start() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Self::default();
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Collects every child that has exited.
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), code, 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.deliver(pid.as_raw(), 128 + sig as i32, sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    fn deliver(&self, pid: i32, status: i32, signal: i32) {
        let exit = Exit {
            status,
            signal,
            at: SystemTime::now(),
        };
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(waiters) = inner.waiters.remove(&pid) {
            for w in waiters {
                let _ = w.send(exit);
            }
            return;
        }
        if inner.unclaimed.len() >= MAX_UNCLAIMED {
            if let Some(old) = inner.order.pop_front() {
                inner.unclaimed.remove(&old);
            }
        }
        inner.unclaimed.insert(pid, exit);
        inner.order.push_back(pid);
    }

    /// Resolves when `pid` (a child of the agent) exits. An exit reaped
    /// before the call is returned at once.
    pub fn wait(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(exit) = inner.unclaimed.remove(&pid) {
            inner.order.retain(|p| *p != pid);
            let _ = tx.send(exit);
        } else {
            inner.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_before_the_wait_is_kept() {
        let r = Reaper::default();
        r.deliver(42, 3, 0);
        let mut rx = r.wait(42);
        assert_eq!(rx.try_recv().expect("delivered").status, 3);
    }

    #[test]
    fn a_waiter_gets_the_exit() {
        let r = Reaper::default();
        let mut rx = r.wait(7);
        assert!(rx.try_recv().is_err());
        r.deliver(7, 137, 9);
        let e = rx.try_recv().expect("delivered");
        assert_eq!((e.status, e.signal), (137, 9));
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            r.deliver(pid, 0, 0);
        }
        let inner = r.inner.lock().expect("lock");
        assert_eq!(inner.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!inner.unclaimed.contains_key(&0));
    }
}
