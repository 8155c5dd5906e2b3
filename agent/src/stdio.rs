//! Container stdio on the agent side: pipes (or a pty master) read into
//! bounded per-stream buffers that ReadStdout/ReadStderr drain, and the
//! stdin writer behind WriteStdin/CloseStdin.
//!
//! Backpressure: a reader task stops reading once its buffer holds
//! [`OUTPUT_BUFFER_BYTES`], so a container that writes faster than the host
//! reads blocks in `write(2)` instead of growing the agent's memory.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Bytes one output stream buffers before the reader stops reading.
pub const OUTPUT_BUFFER_BYTES: usize = 1024 * 1024;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    eof: bool,
}

/// One output stream of one process.
#[derive(Default)]
pub struct OutputBuffer {
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
}

impl OutputBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends data read from the process.
    fn push(&self, bytes: &[u8]) {
        self.lock().data.extend(bytes);
        self.readable.notify_waiters();
    }

    /// Marks the end of the stream.
    pub fn close(&self) {
        self.lock().eof = true;
        self.readable.notify_waiters();
    }

    /// Waits until there is data or EOF and takes up to `max` bytes. The
    /// boolean is true when no more data will come after this.
    pub async fn read(&self, max: usize) -> (Vec<u8>, bool) {
        let max = max.max(1);
        loop {
            let notified = self.readable.notified();
            {
                let mut st = self.lock();
                if !st.data.is_empty() || st.eof {
                    let n = st.data.len().min(max);
                    let out: Vec<u8> = st.data.drain(..n).collect();
                    let eof = st.eof && st.data.is_empty();
                    drop(st);
                    self.writable.notify_waiters();
                    return (out, eof);
                }
            }
            notified.await;
        }
    }

    async fn wait_for_room(&self) {
        loop {
            let notified = self.writable.notified();
            if self.lock().data.len() < OUTPUT_BUFFER_BYTES {
                return;
            }
            notified.await;
        }
    }
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.insert(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Registers an owned descriptor with the tokio reactor.
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd` and closes it only when dropped, after
    // deregistering; nothing else closes or replaces it meanwhile.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Starts a task that copies `fd` (a pipe's read end or a pty master) into
/// `buf` until EOF. A pty master reports EIO once the last slave closes:
/// that is its EOF.
pub fn spawn_reader(fd: OwnedFd, buf: std::sync::Arc<OutputBuffer>) -> io::Result<()> {
    set_nonblocking(&fd)?;
    let afd = register(fd)?;
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            buf.wait_for_room().await;
            let Ok(mut guard) = afd.readable().await else {
                break;
            };
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut chunk).map_err(io::Error::from))
            {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => buf.push(&chunk[..n]),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            }
        }
        buf.close();
    });
    Ok(())
}

/// The write end of a process's stdin (a pipe, or a dup of the pty master).
pub struct StdinWriter {
    fd: AsyncFd<OwnedFd>,
    terminal: bool,
}

impl StdinWriter {
    /// Wraps `fd`; `terminal` says it is a pty master.
    pub fn new(fd: OwnedFd, terminal: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            fd: register(fd)?,
            terminal,
        })
    }

    /// Writes all of `data`, waiting while the pipe is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(total)
    }

    /// Whether this is a terminal: closing it means sending EOF (^D) rather
    /// than closing the master, which would hang the terminal up.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// The raw descriptor (for diagnostics).
    pub fn raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn reader_copies_until_eof() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let buf = Arc::new(OutputBuffer::default());
        spawn_reader(r, buf.clone()).expect("reader");
        nix::unistd::write(&w, b"hello").expect("write");
        drop(w);
        let mut all = Vec::new();
        loop {
            let (data, eof) = tokio::time::timeout(std::time::Duration::from_secs(5), buf.read(3))
                .await
                .expect("no hang");
            all.extend(data);
            if eof {
                break;
            }
        }
        assert_eq!(all, b"hello");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reader_stops_when_the_buffer_is_full() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let buf = Arc::new(OutputBuffer::default());
        spawn_reader(r, buf.clone()).expect("reader");
        let written = Arc::new(AtomicUsize::new(0));
        let counter = written.clone();
        // A blocking writer, like a container process writing to stdout.
        std::thread::spawn(move || {
            let block = vec![7u8; 64 * 1024];
            while counter.load(Ordering::SeqCst) < 8 * OUTPUT_BUFFER_BYTES {
                match nix::unistd::write(&w, &block) {
                    Ok(n) => counter.fetch_add(n, Ordering::SeqCst),
                    Err(_) => break,
                };
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let stalled = written.load(Ordering::SeqCst);
        assert!(
            stalled >= OUTPUT_BUFFER_BYTES,
            "reader did not read: {stalled}"
        );
        // Buffer + pipe capacity + one read chunk, nothing more.
        assert!(
            stalled <= OUTPUT_BUFFER_BYTES + 256 * 1024,
            "no backpressure: {stalled}"
        );
        // Draining lets the writer go on.
        let mut drained = 0;
        while drained < 2 * OUTPUT_BUFFER_BYTES {
            drained += buf.read(usize::MAX).await.0.len();
        }
        assert!(written.load(Ordering::SeqCst) > stalled);
    }
}
