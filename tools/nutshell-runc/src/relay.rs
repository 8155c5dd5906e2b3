//! The stand-in's stdio, relayed to and from the guest process: fd 0 to
//! its stdin (end-of-file included), its stdout to fd 1 and its stderr to
//! fd 2 (with a terminal, the one stream goes to fd 1).
//!
//! The fds are whatever the caller gave `create`: pipes (Docker's runc
//! shim, conmon), FIFOs, files, `/dev/null` or a pty slave. Regular files
//! and `/dev/null` cannot be polled, so each fd is driven through tokio's
//! blocking file wrapper rather than `AsyncFd`. The shim's relays
//! (`nutshell_runtime::shim::stdio`) open containerd's FIFO paths instead;
//! what both share is the agent's pull protocol.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nutshell_runtime::agent::AgentClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Largest chunk asked of the agent or read from stdin at once.
const CHUNK: u32 = 256 * 1024;

/// The running relays of one process.
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
}

impl Relays {
    /// Starts relaying this process's fds 0–2 for process `exec_id` of
    /// container `cid`.
    pub fn start(agent: &AgentClient, cid: &str, exec_id: &str, terminal: bool) -> Self {
        let dup = |n: i32| -> Option<tokio::fs::File> {
            // SAFETY: fds 0–2 are open for the process's whole life (the
            // caller's stdio); they are only borrowed for the dup.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
            let owned: OwnedFd = fd.as_fd().try_clone_to_owned().ok()?;
            Some(tokio::fs::File::from_std(std::fs::File::from(owned)))
        };
        let mut outputs = Vec::new();
        let streams: &[(Stream, i32)] = if terminal {
            &[(Stream::Stdout, 1)]
        } else {
            &[(Stream::Stdout, 1), (Stream::Stderr, 2)]
        };
        for &(stream, fd) in streams {
            if let Some(sink) = dup(fd) {
                outputs.push(tokio::spawn(relay_output(
                    agent.clone(),
                    cid.to_string(),
                    exec_id.to_string(),
                    stream,
                    sink,
                )));
            }
        }
        let stdin = dup(0).map(|src| {
            tokio::spawn(relay_stdin(
                agent.clone(),
                cid.to_string(),
                exec_id.to_string(),
                src,
            ))
        });
        Self { outputs, stdin }
    }

    /// Waits for the output to reach end-of-file, at most `limit` (a child
    /// of the process may keep the pipes open), then stops every relay.
    pub async fn drain(mut self, limit: Duration) {
        let outputs = std::mem::take(&mut self.outputs);
        let all = futures_join(outputs);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("output still open {limit:?} after the process ended; closing it");
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
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

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

async fn relay_output(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut sink: tokio::fs::File,
) {
    loop {
        let r = match stream {
            Stream::Stdout => agent.read_stdout(&cid, &exec_id, CHUNK).await,
            Stream::Stderr => agent.read_stderr(&cid, &exec_id, CHUNK).await,
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%cid, %exec_id, ?stream, error = %e, "output relay ends");
                return;
            }
        };
        if !r.data.is_empty() {
            // tokio's File buffers: flush so each chunk leaves at once.
            let w = async {
                sink.write_all(&r.data).await?;
                sink.flush().await
            };
            if let Err(e) = w.await {
                tracing::warn!(%cid, %exec_id, ?stream, error = %e, "cannot write output");
                return;
            }
        }
        if r.eof {
            return;
        }
    }
}

async fn relay_stdin(agent: AgentClient, cid: String, exec_id: String, mut src: tokio::fs::File) {
    let mut buf = vec![0u8; CHUNK as usize];
    'read: loop {
        // A pty whose master closed reads EIO: that is its end-of-file.
        let n = src.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            match agent.write_stdin(&cid, &exec_id, &buf[off..n]).await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(5)).await,
                Ok(w) => off += w as usize,
                Err(e) => {
                    tracing::debug!(%cid, %exec_id, error = %e, "stdin relay ends");
                    break 'read;
                }
            }
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
        tracing::debug!(%cid, %exec_id, error = %e, "CloseStdin");
    }
}
