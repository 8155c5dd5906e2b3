//! OOM kill detection for one container.
//!
//! cgroup v2 tells about OOM kills only through the `oom_kill` counter in
//! `memory.events` (and file-modified events on it), so the agent polls the
//! counter every [`POLL_INTERVAL`] while the container runs. A polled
//! counter alone misses a container that is OOM-killed and exits, is waited
//! for and removed within one interval; so the exit of each of its processes
//! checks the counter once more before the exit is reported (and before the
//! cgroup can be removed). Both paths share one last-seen value under a lock,
//! so each increase is reported once.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::cgroup::Cgroup;

/// How often a running container's counter is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The OOM state of one container: its cgroup's counter, the value last
/// reported, and where events go (GetOomEvent's queue).
#[derive(Debug)]
pub struct OomWatch {
    id: String,
    cgroup: Cgroup,
    seen: Mutex<u64>,
    events: mpsc::Sender<String>,
}

impl OomWatch {
    /// Watches the cgroup at `dir`; kills counted before now are not
    /// reported.
    pub fn new(id: &str, dir: &Path, events: mpsc::Sender<String>) -> Arc<Self> {
        let cgroup = Cgroup::at(dir);
        let seen = Mutex::new(cgroup.oom_kills());
        Arc::new(Self {
            id: id.to_string(),
            cgroup,
            seen,
            events,
        })
    }

    /// Reads the counter and queues one event for the container if it grew
    /// since the last check (however much it grew: one event per
    /// observation, as the poll always did). Returns whether it queued one.
    ///
    /// The read and the update happen under one lock, so a poll and an
    /// exit check racing on the same increase report it once.
    pub fn check(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.cgroup.oom_kills();
        if now <= *seen {
            return false;
        }
        *seen = now;
        if let Err(e) = self.events.try_send(self.id.clone()) {
            // 256 unclaimed events: nobody is asking; dropping is better
            // than growing without bound.
            tracing::warn!(container = %self.id, "OOM event dropped: {e}");
            return false;
        }
        true
    }

    /// Starts the poll; it ends when the returned sender is dropped or
    /// sent to.
    pub fn poll(self: &Arc<Self>) -> oneshot::Sender<()> {
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let watch = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                watch.check();
            }
        });
        stop_tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_kills(dir: &Path, n: u64) {
        std::fs::write(
            dir.join("memory.events"),
            format!("low 0\nhigh 0\nmax 3\noom 2\noom_kill {n}\noom_group_kill 0\n"),
        )
        .unwrap();
    }

    fn drain(rx: &mut mpsc::Receiver<String>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(id) = rx.try_recv() {
            out.push(id);
        }
        out
    }

    #[test]
    fn one_event_per_increase_none_without() {
        let dir = tempfile::tempdir().unwrap();
        set_kills(dir.path(), 4);
        let (tx, mut rx) = mpsc::channel(16);
        let w = OomWatch::new("c1", dir.path(), tx);
        // Kills from before the watch are not reported.
        assert!(!w.check());
        assert!(drain(&mut rx).is_empty());
        set_kills(dir.path(), 5);
        assert!(w.check());
        assert_eq!(drain(&mut rx), ["c1"]);
        // Unchanged: nothing.
        assert!(!w.check());
        assert!(drain(&mut rx).is_empty());
        // Grew again (by two): one more.
        set_kills(dir.path(), 7);
        assert!(w.check());
        assert!(!w.check());
        assert_eq!(drain(&mut rx), ["c1"]);
        // A vanished cgroup (removed) reads as no kills: nothing.
        std::fs::remove_file(dir.path().join("memory.events")).unwrap();
        assert!(!w.check());
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn concurrent_checks_report_an_increase_once() {
        let dir = tempfile::tempdir().unwrap();
        set_kills(dir.path(), 0);
        let (tx, mut rx) = mpsc::channel(256);
        let w = OomWatch::new("c2", dir.path(), tx);
        for round in 1..=20 {
            set_kills(dir.path(), round);
            let queued: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4).map(|_| s.spawn(|| w.check())).collect();
                handles
                    .into_iter()
                    .map(|h| usize::from(h.join().unwrap()))
                    .sum()
            });
            assert_eq!(queued, 1, "round {round}");
            assert_eq!(drain(&mut rx), ["c2"], "round {round}");
        }
    }

    #[tokio::test]
    async fn poller_and_exit_check_never_double_report() {
        let dir = tempfile::tempdir().unwrap();
        set_kills(dir.path(), 0);
        let (tx, mut rx) = mpsc::channel(16);
        let w = OomWatch::new("c3", dir.path(), tx);
        let stop = w.poll();

        // The exit check races the poll for the kill (either may see it
        // first); polls after it do not report it again.
        set_kills(dir.path(), 1);
        w.check();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert_eq!(drain(&mut rx), ["c3"]);

        // The poll sees a kill first (an exec killed while the init runs);
        // the exit check after it reports nothing new.
        set_kills(dir.path(), 2);
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert_eq!(drain(&mut rx), ["c3"]);
        assert!(!w.check());
        assert!(drain(&mut rx).is_empty());

        // Stopped: a later kill is left to the exit check alone.
        drop(stop);
        tokio::time::sleep(POLL_INTERVAL).await;
        set_kills(dir.path(), 3);
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(drain(&mut rx).is_empty());
        assert!(w.check());
        assert_eq!(drain(&mut rx), ["c3"]);
    }
}
