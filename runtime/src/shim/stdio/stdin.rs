//! The stdin relay: containerd's FIFO (or a runtime's fd) to a process's
//! stdin in the guest, through WriteStdin and CloseStdin.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tracing::Instrument;

use super::CHUNK;
use crate::agent::{AgentClient, AgentError};

/// Where a process's stdin comes from.
pub(super) enum StdinSource {
    /// containerd's FIFO.
    Fifo(PathBuf),
    /// An fd the runtime was given.
    File(tokio::fs::File),
}

/// Relays `source` to the stdin of process `exec_id` of container `cid`
/// until its end or CloseIO, then closes that stdin.
pub(super) async fn relay_stdin(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    source: StdinSource,
    mut close: watch::Receiver<bool>,
    progress: Arc<AtomicU64>,
) {
    let to = ProcessStdin {
        agent: &agent,
        cid: &cid,
        exec_id: &exec_id,
    };
    let span = tracing::debug_span!("stdin", %cid, %exec_id);
    match source {
        // O_RDONLY|O_NONBLOCK opens at once. Until a writer has come, the
        // FIFO reports neither data nor hang-up, so the read waits (and
        // stays cancellable); a writer that came and went is EOF.
        StdinSource::Fifo(path) => match pipe::OpenOptions::new().open_receiver(&path) {
            Ok(fifo) => {
                copy_stdin(&to, fifo, &mut close, &progress)
                    .instrument(span)
                    .await
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot open stdin"),
        },
        StdinSource::File(f) => {
            copy_stdin(&to, f, &mut close, &progress)
                .instrument(span)
                .await
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
        tracing::debug!(%cid, %exec_id, error = %e, "CloseStdin");
    }
}

/// What the stdin relay reads.
trait StdinRead: tokio::io::AsyncRead + Unpin + Send {
    /// Reads bytes already waiting, without waiting for more: `Ok(0)` when
    /// there are none.
    fn read_waiting(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl StdinRead for pipe::Receiver {
    fn read_waiting(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // tokio's `try_read` trusts the readiness its reactor last saw,
        // which may predate the bytes a client wrote just before CloseIO.
        // The FIFO is non-blocking, so read(2) itself answers at once.
        match nix::unistd::read(&*self, buf) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

impl StdinRead for tokio::fs::File {
    /// A runtime's fd is closed only when the relays stop, which drops
    /// what is left anyway.
    fn read_waiting(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

/// Where the stdin relay writes.
#[async_trait::async_trait]
trait StdinSink: Sync {
    /// Writes some of `data`; returns how much was taken (0: try later).
    async fn write(&self, data: &[u8]) -> Result<u32, AgentError>;
}

/// The stdin of process `exec_id` of container `cid`, through the agent.
struct ProcessStdin<'a> {
    agent: &'a AgentClient,
    cid: &'a str,
    exec_id: &'a str,
}

#[async_trait::async_trait]
impl StdinSink for ProcessStdin<'_> {
    async fn write(&self, data: &[u8]) -> Result<u32, AgentError> {
        self.agent.write_stdin(self.cid, self.exec_id, data).await
    }
}

/// Most reads of bytes already waiting after CloseIO: a client that keeps
/// writing after it asked to close cannot hold the relay forever.
const MAX_READS_AFTER_CLOSE: usize = 16;

/// Copies `source` to `to` until its end-of-file (a pty's EIO counts as
/// one) or `close`. On `close` (CloseIO), what the client wrote before it
/// asked is still delivered: it is in the FIFO, and ctr closes stdin right
/// after writing its last bytes.
async fn copy_stdin(
    to: &impl StdinSink,
    mut source: impl StdinRead,
    close: &mut watch::Receiver<bool>,
    progress: &AtomicU64,
) {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut closing = false;
    let mut reads_after_close = 0;
    loop {
        let n = if closing {
            reads_after_close += 1;
            if reads_after_close > MAX_READS_AFTER_CLOSE {
                0
            } else {
                source.read_waiting(&mut buf).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read stdin");
                    0
                })
            }
        } else {
            tokio::select! {
                r = source.read(&mut buf) => match r {
                    Ok(n) => n,
                    // A pty whose other side closed.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read stdin");
                        0
                    }
                },
                _ = close.wait_for(|c| *c) => {
                    closing = true;
                    continue;
                }
            }
        };
        if n == 0 {
            return;
        }
        let mut off = 0;
        while off < n {
            match to.write(&buf[off..n]).await {
                Ok(0) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(w) => off += w as usize,
                Err(e) => {
                    tracing::debug!(error = %e, "stdin relay ends");
                    return;
                }
            }
        }
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[tokio::test]
    async fn stdin_fifo_waits_for_a_writer_then_sees_its_eof() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut r = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        let mut buf = [0u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(200), r.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "no writer yet must not read as EOF: {early:?}"
        );
        let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::io::Write::write_all(&mut w, b"abc").unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abc");
    }

    /// Takes at most 3 bytes per write, as a full guest pipe would.
    #[derive(Default)]
    struct Collect(std::sync::Mutex<Vec<u8>>);

    #[async_trait::async_trait]
    impl StdinSink for Collect {
        async fn write(&self, data: &[u8]) -> Result<u32, AgentError> {
            let n = data.len().min(3);
            self.0.lock().unwrap().extend_from_slice(&data[..n]);
            Ok(n as u32)
        }
    }

    fn stdin_fifo(dir: &Path) -> (pipe::Receiver, std::fs::File) {
        let p = dir.join("in");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let r = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        (r, w)
    }

    #[tokio::test]
    async fn stdin_written_before_close_io_still_arrives() {
        // ctr writes its last bytes, closes the FIFO and sends CloseIO at
        // once; the relay may not have seen the bytes yet. Many rounds,
        // since which of "data" and "close" the relay sees first varied.
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let (r, mut w) = stdin_fifo(dir.path());
            std::io::Write::write_all(&mut w, b"piped-in\n").unwrap();
            if round % 2 == 0 {
                drop(w);
            } else {
                // A client that keeps its end open: close still ends it.
                std::mem::forget(w);
            }
            let (tx, mut rx) = watch::channel(true);
            let sink = Collect::default();
            let progress = AtomicU64::new(0);
            tokio::time::timeout(
                Duration::from_secs(5),
                copy_stdin(&sink, r, &mut rx, &progress),
            )
            .await
            .expect("the relay ends on close");
            drop(tx);
            assert_eq!(
                sink.0.lock().unwrap().as_slice(),
                b"piped-in\n",
                "round {round}"
            );
            assert_eq!(progress.load(Ordering::Relaxed), 9);
        }
    }

    #[tokio::test]
    async fn close_io_with_nothing_written_ends_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _w) = stdin_fifo(dir.path());
        let (tx, mut rx) = watch::channel(false);
        let sink = Collect::default();
        let progress = AtomicU64::new(0);
        let relay = copy_stdin(&sink, r, &mut rx, &progress);
        tokio::pin!(relay);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut relay)
                .await
                .is_err(),
            "an open, silent stdin keeps the relay waiting"
        );
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay ends on close");
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
