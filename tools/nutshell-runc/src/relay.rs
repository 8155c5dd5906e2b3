//! The stand-in's stdio, relayed to and from the guest process: fd 0 to
//! its stdin (end-of-file included), its stdout to fd 1 and its stderr to
//! fd 2 (with a terminal, the one stream goes to fd 1).
//!
//! The fds are whatever the caller gave `create`: pipes (Docker's runc
//! shim, conmon), FIFOs, files, `/dev/null` or a pty slave. Regular files
//! and `/dev/null` cannot be polled, so each fd is driven through tokio's
//! blocking `File` rather than `AsyncFd`. The copying itself is the shim's
//! (`nutshell_runtime::shim::stdio`), which opens containerd's FIFO paths
//! where this has fds.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use nutshell_runtime::agent::AgentClient;
use nutshell_runtime::shim::stdio::{copy_stdin, relay_output, Stream};
use tokio::task::JoinHandle;

/// The running relays of one process.
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
}

/// A copy of our fd `n` as an async file.
fn dup(n: i32) -> Option<tokio::fs::File> {
    // SAFETY: fds 0–2 are open for the process's whole life (the caller's
    // stdio); they are only borrowed for the dup.
    let fd = unsafe { BorrowedFd::borrow_raw(n) };
    let owned: OwnedFd = fd.as_fd().try_clone_to_owned().ok()?;
    Some(tokio::fs::File::from_std(std::fs::File::from(owned)))
}

impl Relays {
    /// Starts relaying this process's fds 0–2 for process `exec_id` of
    /// container `cid`.
    pub fn start(agent: &AgentClient, cid: &str, exec_id: &str, terminal: bool) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let streams: &[(Stream, i32)] = if terminal {
            &[(Stream::Stdout, 1)]
        } else {
            &[(Stream::Stdout, 1), (Stream::Stderr, 2)]
        };
        let outputs = streams
            .iter()
            .filter_map(|&(stream, fd)| {
                let sink = dup(fd)?;
                Some(tokio::spawn(relay_output(
                    agent.clone(),
                    cid.to_string(),
                    exec_id.to_string(),
                    stream,
                    sink,
                    progress.clone(),
                )))
            })
            .collect();
        let stdin = dup(0).map(|src| {
            let (agent, cid, exec_id) = (agent.clone(), cid.to_string(), exec_id.to_string());
            tokio::spawn(async move {
                // Never closed from our side: the caller's end-of-file is.
                let (_keep, mut close) = tokio::sync::watch::channel(false);
                copy_stdin(&agent, &cid, &exec_id, src, &mut close, &progress).await;
                if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
                    tracing::debug!(%cid, %exec_id, error = %e, "CloseStdin");
                }
            })
        });
        Self { outputs, stdin }
    }

    /// Waits for the output to reach end-of-file, at most `limit` (a child
    /// of the process may keep the pipes open), then stops every relay.
    pub async fn drain(mut self, limit: Duration) {
        let outputs = std::mem::take(&mut self.outputs);
        let all = async {
            for h in outputs {
                let _ = h.await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("output still open {limit:?} after the process ended; closing it");
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for h in &self.outputs {
            h.abort();
        }
        if let Some(h) = &self.stdin {
            h.abort();
        }
    }
}
