//! Reaching the agent's listening socket: a plain Unix socket (the agent on
//! the host, in tests) or hybrid vsock (a Unix socket served by the VM's
//! vsock backend: write `CONNECT <port>\n`, read `OK <n>\n`, then the stream
//! is the guest connection).
//!
//! A booting guest is not listening yet, so attempts repeat with
//! exponential backoff until one overall deadline, and stop at once when the
//! VM ends.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep_until, timeout_at, Instant};

use super::AgentError;
use crate::hypervisor::{sanitize_line, VmEndWatch};

/// Longest handshake reply accepted (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 32;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// Hybrid vsock: the VM's vsock backend socket and the guest port.
    HybridVsock {
        /// The backend's Unix socket ([`crate::hypervisor::RunningVm::agent_socket`]).
        socket: PathBuf,
        /// The guest vsock port the agent listens on.
        port: u32,
    },
    /// A plain Unix socket (`nutshell-agent --listen unix://<path>`).
    Unix(PathBuf),
}

impl AgentAddress {
    /// Hybrid vsock on `socket` to the agent's default port.
    pub fn hybrid_vsock(socket: impl Into<PathBuf>) -> Self {
        Self::HybridVsock {
            socket: socket.into(),
            port: nutshell_protocol::DEFAULT_AGENT_VSOCK_PORT,
        }
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HybridVsock { socket, port } => {
                write!(f, "hybrid vsock {} port {port}", socket.display())
            }
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// How hard to try reaching the agent.
#[derive(Debug, Clone)]
pub struct DialOptions {
    /// Give up this long after the first attempt.
    pub deadline: Duration,
    /// Pause after the first failed attempt; it doubles each time.
    pub first_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
    /// Limit for one attempt (connect, CONNECT, its reply). A vsock backend
    /// can leave a CONNECT made while the guest boots unanswered for good
    /// (seen about once in 100 boots with vhost-device-vsock): that attempt
    /// is dropped and the next one made, instead of waiting out `deadline`.
    pub attempt_timeout: Duration,
    /// Limit for each call that does not block by design (everything but
    /// WaitProcess, ReadStdout/ReadStderr and GetOomEvent).
    pub call_timeout: Duration,
}

impl Default for DialOptions {
    /// 30 s to reach the agent (a TCG boot takes 1–2 s; a loaded CI host
    /// much more), backoff 5 ms to 200 ms, 2 s per attempt, 30 s per call.
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// One attempt's failure.
#[derive(Debug)]
enum Attempt {
    /// The agent is not there yet: try again.
    Retry(String),
    /// Trying again cannot help.
    Fatal(AgentError),
}

/// Connects to the agent, retrying until `opts.deadline`. Fails at once when
/// `vm_end` resolves.
pub(crate) async fn dial(
    addr: &AgentAddress,
    opts: &DialOptions,
    vm_end: Option<&VmEndWatch>,
) -> Result<UnixStream, AgentError> {
    let start = Instant::now();
    let deadline = start + opts.deadline;
    let mut backoff = opts.first_backoff;
    let mut attempts = 0u32;
    let timed_out = |attempts, last: String| AgentError::DialTimeout {
        address: addr.to_string(),
        waited: opts.deadline,
        attempts,
        last_error: last,
    };
    let mut last = String::from("no attempt finished");
    loop {
        attempts += 1;
        let attempt_end = (Instant::now() + opts.attempt_timeout).min(deadline);
        let outcome = tokio::select! {
            r = timeout_at(attempt_end, attempt(addr)) => r,
            exit = wait_end(vm_end) => return Err(AgentError::VmEnded {
                during: "the agent to answer",
                exit: Box::new(exit),
            }),
        };
        match outcome {
            Ok(Ok(stream)) => {
                tracing::debug!(address = %addr, attempts, elapsed = ?start.elapsed(), "agent reached");
                return Ok(stream);
            }
            Ok(Err(Attempt::Fatal(e))) => return Err(e),
            Ok(Err(Attempt::Retry(why))) => last = why,
            Err(_) if Instant::now() >= deadline => return Err(timed_out(attempts, last)),
            Err(_) => last = format!("no answer to the attempt within {:?}", opts.attempt_timeout),
        }
        let wake = (Instant::now() + backoff).min(deadline);
        tokio::select! {
            _ = sleep_until(wake) => {}
            exit = wait_end(vm_end) => return Err(AgentError::VmEnded {
                during: "the agent to answer",
                exit: Box::new(exit),
            }),
        }
        if Instant::now() >= deadline {
            return Err(timed_out(attempts, last));
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

/// Resolves when the VM ends; never when there is no VM to watch.
async fn wait_end(vm_end: Option<&VmEndWatch>) -> crate::hypervisor::VmExit {
    match vm_end {
        Some(w) => w.wait().await,
        None => std::future::pending().await,
    }
}

async fn attempt(addr: &AgentAddress) -> Result<UnixStream, Attempt> {
    let path = match addr {
        AgentAddress::HybridVsock { socket, .. } => socket,
        AgentAddress::Unix(p) => p,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => Attempt::Fatal(AgentError::Connect {
                address: addr.to_string(),
                source: e,
            }),
            _ => Attempt::Retry(format!("connecting to {}: {e}", path.display())),
        })?;
    let AgentAddress::HybridVsock { port, .. } = addr else {
        return Ok(stream);
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Attempt::Retry(format!("sending CONNECT: {e}")))?;
    let line = read_line(&mut stream).await.map_err(|e| match e {
        LineError::Eof => Attempt::Retry(format!(
            "the vsock backend closed the connection (nothing listens on guest port {port} yet)"
        )),
        LineError::Io(e) => Attempt::Retry(format!("reading the CONNECT reply: {e}")),
        LineError::TooLong => Attempt::Fatal(AgentError::Handshake {
            address: addr.to_string(),
            reason: format!("the reply is longer than {MAX_HANDSHAKE_LINE} bytes"),
        }),
    })?;
    parse_ok(&line).map_err(|reason| {
        Attempt::Fatal(AgentError::Handshake {
            address: addr.to_string(),
            reason,
        })
    })?;
    Ok(stream)
}

#[derive(Debug)]
enum LineError {
    Eof,
    TooLong,
    Io(io::Error),
}

/// Reads one `\n`-terminated line of at most [`MAX_HANDSHAKE_LINE`] bytes,
/// byte by byte: whatever follows the line belongs to the ttrpc stream and
/// must stay unread.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = match r.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(LineError::Eof),
            Err(e) => return Err(LineError::Io(e)),
        };
        if b == b'\n' {
            return Ok(line);
        }
        if line.len() == MAX_HANDSHAKE_LINE {
            return Err(LineError::TooLong);
        }
        line.push(b);
    }
}

/// Checks a handshake reply (without its `\n`): `OK <number>`.
fn parse_ok(line: &[u8]) -> Result<u32, String> {
    let bad = || {
        format!(
            "expected \"OK <port>\", got {:?}",
            sanitize_line(&String::from_utf8_lossy(line))
        )
    };
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let num = text.strip_prefix("OK ").ok_or_else(bad)?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    num.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn ok_replies_parse() {
        assert_eq!(parse_ok(b"OK 1024"), Ok(1024));
        assert_eq!(parse_ok(b"OK 4294967295"), Ok(u32::MAX));
    }

    #[test]
    fn bad_replies_are_refused() {
        for bad in [
            &b""[..],
            b"OK",
            b"OK ",
            b"ok 1024",
            b"OK 1024 ",
            b"OK +5",
            b"OK -1",
            b"OK 4294967296",
            b"FAILED",
            b"OK 10\x1b[2J",
            b"\xff\xfe",
        ] {
            assert!(parse_ok(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_ok(b"NO\x1b]0;x").unwrap_err();
        assert!(!e.contains('\x1b'), "escape leaked into the error: {e}");
    }

    #[tokio::test]
    async fn line_reading_is_bounded_and_exact() {
        let mut r: &[u8] = b"OK 1024\nTTRPC";
        assert_eq!(read_line(&mut r).await.unwrap(), b"OK 1024");
        assert_eq!(r, b"TTRPC", "read past the line");
        let long = vec![b'A'; 10_000];
        let mut r: &[u8] = &long;
        assert!(matches!(read_line(&mut r).await, Err(LineError::TooLong)));
        let mut r: &[u8] = b"OK 10";
        assert!(matches!(read_line(&mut r).await, Err(LineError::Eof)));
    }

    /// A fake vsock backend: answers each connection with `reply`, or
    /// closes without a word when `reply` is empty.
    fn fake_backend(
        path: PathBuf,
        replies: Vec<&'static [u8]>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let mut requests = Vec::new();
            for reply in replies {
                let (mut s, _) = listener.accept().await.unwrap();
                let req = read_line(&mut s).await.unwrap();
                requests.push(String::from_utf8(req).unwrap());
                if !reply.is_empty() {
                    s.write_all(reply).await.unwrap();
                    s.write_all(b"payload").await.unwrap();
                }
            }
            requests
        })
    }

    fn quick() -> DialOptions {
        DialOptions {
            deadline: Duration::from_secs(5),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
            ..DialOptions::default()
        }
    }

    #[tokio::test]
    async fn dial_retries_until_the_guest_listens() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        // Two refusals (guest not listening yet), then the agent.
        let backend = fake_backend(sock.clone(), vec![b"", b"", b"OK 1024\n"]);
        let addr = AgentAddress::hybrid_vsock(&sock);
        let mut s = dial(&addr, &quick(), None).await.unwrap();
        let mut rest = [0u8; 7];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"payload");
        assert_eq!(backend.await.unwrap(), ["CONNECT 1024"; 3]);
    }

    #[tokio::test]
    async fn dial_waits_for_the_socket_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("late.sock");
        let s2 = sock.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fake_backend(s2, vec![b"OK 77\n"]).await.unwrap()
        });
        let addr = AgentAddress::HybridVsock {
            socket: sock,
            port: 77,
        };
        dial(&addr, &quick(), None).await.unwrap();
        assert_eq!(late.await.unwrap(), ["CONNECT 77"]);
    }

    #[tokio::test]
    async fn a_garbage_reply_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let _backend = fake_backend(sock.clone(), vec![b"HELLO\n"]);
        let t = Instant::now();
        let e = dial(&AgentAddress::hybrid_vsock(&sock), &quick(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Handshake { .. }), "{e}");
        assert!(e.to_string().contains("HELLO"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_oversized_reply_fails() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let _backend = fake_backend(sock.clone(), vec![&[b'9'; 4096]]);
        let e = dial(&AgentAddress::hybrid_vsock(&sock), &quick(), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[tokio::test]
    async fn the_deadline_is_one_overall_limit() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DialOptions {
            deadline: Duration::from_millis(300),
            ..quick()
        };
        let t = Instant::now();
        let e = dial(
            &AgentAddress::Unix(dir.path().join("never.sock")),
            &opts,
            None,
        )
        .await
        .unwrap_err();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        match e {
            AgentError::DialTimeout {
                attempts,
                last_error,
                ..
            } => {
                assert!(attempts > 3, "{attempts}");
                assert!(last_error.contains("never.sock"), "{last_error}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn an_attempt_left_unanswered_is_dropped_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // The first connection gets no reply at all; the second its OK.
        let backend = tokio::spawn(async move {
            let (silent, _) = listener.accept().await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            s.write_all(b"OK 7\n").await.unwrap();
            (silent, s)
        });
        let opts = DialOptions {
            attempt_timeout: Duration::from_millis(200),
            ..quick()
        };
        let t = Instant::now();
        dial(&AgentAddress::hybrid_vsock(&sock), &opts, None)
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < opts.deadline,
            "{took:?}"
        );
        backend.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_backend_hits_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // Accepts and never answers.
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                held.push(s);
            }
        });
        let opts = DialOptions {
            deadline: Duration::from_millis(300),
            ..quick()
        };
        let e = dial(&AgentAddress::hybrid_vsock(&sock), &opts, None)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::DialTimeout { .. }), "{e}");
    }
}
