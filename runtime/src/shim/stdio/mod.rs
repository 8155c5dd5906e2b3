//! Stdio between containerd and a process in the guest.
//!
//! containerd names each stream as a FIFO path, or (stdout/stderr only) as
//! a log URI: `file:///path` appends both streams to one file,
//! `binary:///path?arg=v` starts a logging program that reads stdout on fd
//! 3 and stderr on fd 4 and closes fd 5 when it is ready (containerd's
//! binary-logging protocol). The agent side is pull-based: `ReadStdout`
//! and `ReadStderr` block until data or EOF, `WriteStdin` and `CloseStdin`
//! feed the process.
//!
//! Output FIFOs are opened read-write, so opening never blocks on a missing
//! reader and a reader going away (containerd restarting) cannot turn into
//! EPIPE; the data then waits in the pipe as it would with runc. The stdin
//! FIFO is opened read-only and non-blocking: nothing here ever blocks a
//! thread on a client that never comes (the runtime could not shut down),
//! and the client closing its end is the container's EOF, as with runc.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::agent::AgentClient;

mod stdin;
use stdin::{relay_stdin, StdinSource};

/// Largest chunk asked of the agent per read, and written per WriteStdin.
const CHUNK: u32 = 256 * 1024;
/// How long a logging binary gets to say it is ready.
const BINARY_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting stdio up.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The URI's scheme is not one containerd's shims support.
    #[error("unsupported stdio URI {0:?} (expected a FIFO path, file:// or binary://)")]
    UnsupportedUri(String),
    /// A `file://` or `binary://` URI without an absolute path.
    #[error("stdio URI {0:?} does not name an absolute path")]
    NotAbsolute(String),
    /// A FIFO or log file could not be opened.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The logging binary could not be started.
    #[error("cannot start the logging binary {path}")]
    Binary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The logging binary did not signal readiness.
    #[error("the logging binary {0} did not become ready within 10 s")]
    BinaryNotReady(PathBuf),
}

/// Where one output stream goes, as containerd named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// Nothing: the stream is dropped.
    None,
    /// A FIFO containerd (or its client) reads.
    Fifo(PathBuf),
    /// `file://`: appended to a file.
    File(PathBuf),
    /// `binary://`: piped into a logging program with these arguments.
    Binary { path: PathBuf, args: Vec<String> },
}

/// Parses containerd's name for stdout or stderr.
pub fn parse_output(s: &str) -> Result<OutputTarget, StdioError> {
    if s.is_empty() {
        return Ok(OutputTarget::None);
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Ok(OutputTarget::Fifo(PathBuf::from(s)));
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = PathBuf::from(percent_decode(path));
    match scheme {
        "fifo" => Ok(OutputTarget::Fifo(absolute(path, s)?)),
        "file" => Ok(OutputTarget::File(absolute(path, s)?)),
        "binary" => {
            let mut args = Vec::new();
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            Ok(OutputTarget::Binary {
                path: absolute(path, s)?,
                args,
            })
        }
        _ => Err(StdioError::UnsupportedUri(s.to_string())),
    }
}

fn absolute(p: PathBuf, uri: &str) -> Result<PathBuf, StdioError> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(StdioError::NotAbsolute(uri.to_string()))
    }
}

/// Decodes `%XX` escapes (URIs containerd builds with Go's net/url).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One process's stdio as containerd asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A destination for output bytes.
enum Sink {
    Discard,
    Pipe(pipe::Sender),
    /// Shared by stdout and stderr for `file://` and `binary://`.
    File(Arc<Mutex<tokio::fs::File>>),
}

/// Where a relay writes a guest process's output.
#[async_trait::async_trait]
trait OutputSink: Send {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
}

#[async_trait::async_trait]
impl OutputSink for Sink {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Self::Discard => Ok(()),
            Self::Pipe(p) => p.write_all(data).await,
            Self::File(f) => AsyncWriteExt::write_all(&mut *f.lock().await, data).await,
        }
    }
}

/// An fd given to the runtime (nutshell-runc's stdio): flushed after each
/// chunk, since tokio's `File` buffers.
#[async_trait::async_trait]
impl OutputSink for tokio::fs::File {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, data).await?;
        self.flush().await
    }
}

/// Which output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The running relays of one process.
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    close_stdin: watch::Sender<bool>,
    /// Bytes moved so far, to tell a slow drain from a stuck one.
    progress: Arc<AtomicU64>,
    logger: Option<std::process::Child>,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays")
            .field("outputs", &self.outputs.len())
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

impl Relays {
    /// Opens what containerd named and starts copying between it and the
    /// agent for process `exec_id` of container `cid`.
    pub async fn start(
        agent: &AgentClient,
        cid: &str,
        exec_id: &str,
        namespace: &str,
        io: &StdioConfig,
    ) -> Result<Self, StdioError> {
        let stdout = parse_output(&io.stdout)?;
        let stderr = if io.terminal {
            OutputTarget::None
        } else {
            parse_output(&io.stderr)?
        };
        let mut logger = None;
        let (out_sink, err_sink) = match (&stdout, &stderr) {
            (OutputTarget::File(p), _) | (_, OutputTarget::File(p)) => {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await
                    .map_err(|source| StdioError::Open {
                        path: p.clone(),
                        source,
                    })?;
                let f = Arc::new(Mutex::new(f));
                (Sink::File(f.clone()), Sink::File(f))
            }
            (OutputTarget::Binary { path, args }, _) | (_, OutputTarget::Binary { path, args }) => {
                let (child, out, err) = start_logging_binary(path, args, cid, namespace).await?;
                logger = Some(child);
                (Sink::Pipe(out), Sink::Pipe(err))
            }
            _ => (open_output(&stdout)?, open_output(&stderr)?),
        };
        let outputs: Vec<(Stream, Sink)> = [
            (Stream::Stdout, out_sink, &stdout),
            (Stream::Stderr, err_sink, &stderr),
        ]
        .into_iter()
        .filter(|(_, _, target)| **target != OutputTarget::None)
        .map(|(stream, sink, _)| (stream, sink))
        .collect();
        let stdin = (!io.stdin.is_empty()).then(|| StdinSource::Fifo(PathBuf::from(&io.stdin)));
        Ok(Self::spawn(agent, cid, exec_id, stdin, outputs, logger))
    }

    /// Relays between the agent and fds the runtime was given rather than
    /// containerd's paths (nutshell-runc's stdio: pipes, files, a pty):
    /// `stdin` to the process, and each output stream to its file. tokio's
    /// `File` drives each fd, since files and `/dev/null` cannot be polled.
    pub fn start_fds(
        agent: &AgentClient,
        cid: &str,
        exec_id: &str,
        stdin: Option<tokio::fs::File>,
        outputs: Vec<(Stream, tokio::fs::File)>,
    ) -> Self {
        Self::spawn(
            agent,
            cid,
            exec_id,
            stdin.map(StdinSource::File),
            outputs,
            None,
        )
    }

    /// Starts one relay per output stream and one for stdin.
    fn spawn<S: OutputSink + 'static>(
        agent: &AgentClient,
        cid: &str,
        exec_id: &str,
        stdin: Option<StdinSource>,
        outputs: Vec<(Stream, S)>,
        logger: Option<std::process::Child>,
    ) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let outputs = outputs
            .into_iter()
            .map(|(stream, sink)| {
                tokio::spawn(relay_output(
                    agent.clone(),
                    cid.to_string(),
                    exec_id.to_string(),
                    stream,
                    sink,
                    progress.clone(),
                ))
            })
            .collect();
        let (close_stdin, close_rx) = watch::channel(false);
        let stdin = stdin.map(|source| {
            tokio::spawn(relay_stdin(
                agent.clone(),
                cid.to_string(),
                exec_id.to_string(),
                source,
                close_rx,
                progress.clone(),
            ))
        });
        Self {
            outputs,
            stdin,
            close_stdin,
            progress,
            logger,
        }
    }

    /// CloseIO: the process's stdin gets EOF once what was read is written.
    pub fn close_stdin(&self) {
        self.close_stdin.send_replace(true);
    }

    /// Waits for the output relays to reach EOF. Gives up when no byte has
    /// moved for `idle` (a process's child may hold the pipe open forever)
    /// or after `limit` in all (one that writes forever), then stops them.
    pub async fn drain(&mut self, idle: Duration, limit: Duration) {
        const TICK: Duration = Duration::from_millis(20);
        let start = tokio::time::Instant::now();
        let mut last = self.progress.load(Ordering::Relaxed);
        let mut last_change = start;
        while !self.outputs.iter().all(JoinHandle::is_finished) {
            if start.elapsed() >= limit {
                tracing::warn!(
                    "output still flowing {limit:?} after the process ended; closing it"
                );
                break;
            }
            tokio::time::sleep(TICK).await;
            let now = self.progress.load(Ordering::Relaxed);
            if now != last {
                last = now;
                last_change = tokio::time::Instant::now();
            } else if last_change.elapsed() >= idle {
                tracing::warn!("output still open {idle:?} after the process ended; closing it");
                break;
            }
        }
        self.stop();
    }

    /// Stops every relay now (the FIFOs close) and reaps the logging binary.
    pub fn stop(&mut self) {
        for h in self.outputs.drain(..) {
            h.abort();
        }
        self.close_stdin.send_replace(true);
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
        if let Some(child) = self.logger.take() {
            tokio::spawn(reap_logger(child));
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

/// Reaps a logging binary: it exits on EOF of its pipes, which the stopped
/// relays close; one that does not within 10 s is killed.
async fn reap_logger(mut child: std::process::Child) {
    for _ in 0..100 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn open_output(t: &OutputTarget) -> Result<Sink, StdioError> {
    match t {
        OutputTarget::None => Ok(Sink::Discard),
        OutputTarget::Fifo(path) => pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map(Sink::Pipe)
            .map_err(|source| StdioError::Open {
                path: path.clone(),
                source,
            }),
        // Handled by the caller (shared between both streams).
        OutputTarget::File(p) | OutputTarget::Binary { path: p, .. } => Err(StdioError::Open {
            path: p.clone(),
            source: io::Error::other("internal: log URI opened as a single stream"),
        }),
    }
}

/// Copies one output stream of process `exec_id` of container `cid` from
/// the agent to `sink` until its end-of-file, counting bytes in `progress`.
async fn relay_output(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut sink: impl OutputSink,
    progress: Arc<AtomicU64>,
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
            if let Err(e) = sink.write_all(&r.data).await {
                tracing::warn!(%cid, %exec_id, ?stream, error = %e, "cannot write output");
                return;
            }
            progress.fetch_add(r.data.len() as u64, Ordering::Relaxed);
        }
        if r.eof {
            return;
        }
    }
}

/// Starts a `binary://` logger: fd 3 its stdout, fd 4 its stderr, fd 5
/// closed (or written) when it is ready.
async fn start_logging_binary(
    path: &Path,
    args: &[String],
    cid: &str,
    namespace: &str,
) -> Result<(std::process::Child, pipe::Sender, pipe::Sender), StdioError> {
    let err = |source| StdioError::Binary {
        path: path.to_path_buf(),
        source,
    };
    let (out_r, out_w) = pipe_pair().map_err(err)?;
    let (errp_r, errp_w) = pipe_pair().map_err(err)?;
    let (ready_r, ready_w) = pipe_pair().map_err(err)?;
    let fds = [out_r.as_raw_fd(), errp_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", cid)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on descriptors that stay open in the parent until
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                let target = 3 + i as i32;
                if *fd == target {
                    let flags = libc::fcntl(target, libc::F_GETFD);
                    if flags < 0
                        || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(*fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(err)?;
    drop((out_r, errp_r, ready_w));
    let mut ready = pipe::Receiver::from_owned_fd(ready_r).map_err(err)?;
    let mut b = [0u8; 1];
    if tokio::time::timeout(BINARY_READY_TIMEOUT, ready.read(&mut b))
        .await
        .is_err()
    {
        return Err(StdioError::BinaryNotReady(path.to_path_buf()));
    }
    let out = pipe::Sender::from_owned_fd(out_w).map_err(err)?;
    let errs = pipe::Sender::from_owned_fd(errp_w).map_err(err)?;
    Ok((child, out, errs))
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_paths_and_empty() {
        assert_eq!(parse_output("").unwrap(), OutputTarget::None);
        assert_eq!(
            parse_output("/run/containerd/fifo/1/x-stdout").unwrap(),
            OutputTarget::Fifo("/run/containerd/fifo/1/x-stdout".into())
        );
        assert_eq!(
            parse_output("fifo:///a/b").unwrap(),
            OutputTarget::Fifo("/a/b".into())
        );
    }

    #[test]
    fn file_uri() {
        assert_eq!(
            parse_output("file:///var/log/my%20app.log").unwrap(),
            OutputTarget::File("/var/log/my app.log".into())
        );
        assert!(matches!(
            parse_output("file://relative/x"),
            Err(StdioError::NotAbsolute(_))
        ));
    }

    #[test]
    fn binary_uri_with_arguments() {
        assert_eq!(
            parse_output("binary:///usr/bin/logger?id=abc&verbose").unwrap(),
            OutputTarget::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["id".into(), "abc".into(), "verbose".into()],
            }
        );
        assert_eq!(
            parse_output("binary:///bin/l").unwrap(),
            OutputTarget::Binary {
                path: "/bin/l".into(),
                args: vec![]
            }
        );
    }

    #[test]
    fn unknown_scheme_is_refused() {
        let e = parse_output("http://example.invalid/x").unwrap_err();
        assert!(e.to_string().contains("unsupported"), "{e}");
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[tokio::test]
    async fn output_fifo_opens_without_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut sink = open_output(&OutputTarget::Fifo(p.clone())).unwrap();
        sink.write_all(b"hello").await.unwrap();
        let mut r = pipe::OpenOptions::new().open_receiver(&p).unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    fn relays_with(outputs: Vec<JoinHandle<()>>, progress: Arc<AtomicU64>) -> Relays {
        Relays {
            outputs,
            stdin: None,
            close_stdin: watch::channel(false).0,
            progress,
            logger: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_flowing_output_but_not_forever() {
        // Finished output: no wait.
        let mut r = relays_with(vec![tokio::spawn(async {})], Arc::default());
        tokio::task::yield_now().await;
        let t = tokio::time::Instant::now();
        r.drain(Duration::from_secs(2), Duration::from_secs(60))
            .await;
        assert!(t.elapsed() < Duration::from_millis(100));

        // Silent, never-ending output: given up after `idle`.
        let mut r = relays_with(vec![tokio::spawn(std::future::pending())], Arc::default());
        let t = tokio::time::Instant::now();
        r.drain(Duration::from_secs(2), Duration::from_secs(60))
            .await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );

        // Output that keeps flowing: given up after `limit`.
        let progress = Arc::new(AtomicU64::new(0));
        let p = progress.clone();
        let writer = tokio::spawn(async move {
            loop {
                p.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut r = relays_with(vec![writer], progress);
        let t = tokio::time::Instant::now();
        r.drain(Duration::from_secs(2), Duration::from_secs(10))
            .await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }
}
