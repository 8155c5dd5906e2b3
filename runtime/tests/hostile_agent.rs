//! The agent client against a hostile agent on hybrid vsock: a Unix socket
//! that takes `CONNECT 1024\n` as the VM's vsock backend does, then answers
//! with garbage, oversized or endless streams, replies nobody asked for, or
//! nothing at all.
//!
//! For each, the client must report a clear error within its bounds (the
//! dial deadline, the call timeout, or at once where the stream is plainly
//! broken), read no more than a bounded amount of the stream, and leave no
//! file descriptor behind. The scenarios run one at a time, each on its own
//! runtime, because descriptors and memory are counted for the whole process.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use nutshell_protocol::agent::{CreateContainerRequest, HealthResponse};
use nutshell_runtime::agent::{AgentAddress, AgentClient, AgentError, DialOptions};
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{sleep, timeout, Instant};
use ttrpc::proto::{
    MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_DATA,
    MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

/// Most bytes a hostile peer may push into a connection the client has
/// given up on: what the client read before refusing it, plus the socket
/// buffers (about 200 KiB on Linux). Reading on would pass this at once.
const CUT_OFF_WITHIN: usize = 2 << 20;
/// What a flood writes at most when the client never cuts it off.
const FLOOD_CAP: usize = 256 << 20;
/// Slack for a loaded host on top of each bound the client promises.
const SLACK: Duration = Duration::from_millis(1500);

static ALONE: Mutex<()> = Mutex::new(());

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    fds.sort();
    fds
}

fn vm_rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Runs one scenario alone in the process on a fresh runtime, bounded in
/// time, and checks that every descriptor it opened is closed afterwards.
fn hostile<F: Future<Output = ()>>(scenario: impl FnOnce(AgentAddress, UnixListener) -> F) {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    rt.block_on(async {
        let before = open_fds();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).expect("binding the fake backend");
        let addr = AgentAddress::hybrid_vsock(&path);
        timeout(Duration::from_secs(30), scenario(addr, listener))
            .await
            .expect("the scenario hung");
        // ttrpc's reader and writer tasks close the socket as they wind down.
        let t = Instant::now();
        while open_fds() != before && t.elapsed() < Duration::from_secs(3) {
            sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open_fds(), before, "descriptors left open");
    });
}

fn opts() -> DialOptions {
    DialOptions {
        deadline: Duration::from_secs(1),
        first_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        attempt_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(2),
    }
}

/// Awaits `f`, which must finish within `bound` (plus slack on a loaded
/// host); returns its output and how long it took.
async fn within<T>(bound: Duration, f: impl Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let out = timeout(bound + SLACK, f)
        .await
        .unwrap_or_else(|_| panic!("no answer within {bound:?}"));
    (out, t.elapsed())
}

/// Half the call timeout: an error "at once" comes well before any timeout.
fn at_once() -> Duration {
    opts().call_timeout / 2
}

fn frame(stream_id: u32, type_: u8, payload: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = MessageHeader {
        length: u32::try_from(payload.len()).expect("a small payload"),
        stream_id,
        type_,
        flags: 0,
    }
    .into();
    out.extend_from_slice(payload);
    out
}

/// A ttrpc response carrying `reply` (status OK).
fn response(stream_id: u32, type_: u8, reply: &impl protobuf::Message) -> Vec<u8> {
    let r = ttrpc::Response {
        payload: reply.write_to_bytes().expect("encoding a reply"),
        ..Default::default()
    };
    frame(
        stream_id,
        type_,
        &r.write_to_bytes().expect("encoding a response"),
    )
}

fn healthy() -> HealthResponse {
    HealthResponse {
        status: "SERVING".into(),
        agent_version: "hostile".into(),
        protocol_version: nutshell_protocol::PROTOCOL_VERSION,
        ..Default::default()
    }
}

/// How a flood ended.
#[derive(Debug)]
struct Flood {
    written: usize,
    cut_off: bool,
}

/// The guest end of one connection.
struct Guest(UnixStream);

impl Guest {
    /// Accepts the client's connection and answers its CONNECT with `reply`.
    async fn accept(listener: &UnixListener, reply: &[u8]) -> Self {
        let (s, _) = listener.accept().await.expect("accepting the client");
        Self::handshake(s, reply).await
    }

    /// Answers the client's CONNECT with `reply`.
    async fn handshake(mut s: UnixStream, reply: &[u8]) -> Self {
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            line.push(s.read_u8().await.expect("reading CONNECT"));
        }
        let port = nutshell_protocol::DEFAULT_AGENT_VSOCK_PORT;
        assert_eq!(line, format!("CONNECT {port}\n").as_bytes());
        s.write_all(reply).await.expect("answering CONNECT");
        Self(s)
    }

    /// Accepts, answers the handshake and the client's Health.
    async fn healthy(listener: &UnixListener) -> Self {
        let mut g = Self::accept(listener, b"OK 1\n").await;
        let (h, req) = g.request().await;
        assert_eq!(req.method, "Health");
        g.send(&response(h.stream_id, MESSAGE_TYPE_RESPONSE, &healthy()))
            .await;
        g
    }

    /// The client's next request.
    async fn request(&mut self) -> (MessageHeader, ttrpc::Request) {
        let mut head = [0u8; MESSAGE_HEADER_LENGTH];
        self.0
            .read_exact(&mut head)
            .await
            .expect("a request header");
        let h = MessageHeader::from(&head);
        assert_eq!(h.type_, MESSAGE_TYPE_REQUEST);
        let mut body = vec![0; h.length as usize];
        self.0.read_exact(&mut body).await.expect("a request body");
        let req = ttrpc::Request::parse_from_bytes(&body).expect("a request");
        (h, req)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.0
            .write_all(bytes)
            .await
            .expect("sending to the client");
    }

    /// Writes `pattern` over and over until the client stops reading and
    /// closes, or [`FLOOD_CAP`] bytes went out.
    async fn flood(mut self, pattern: &[u8]) -> Flood {
        let chunk = pattern.repeat((64 << 10) / pattern.len());
        let mut written = 0;
        while written < FLOOD_CAP {
            match self.0.write(&chunk).await {
                Ok(n) => written += n,
                Err(_) => {
                    return Flood {
                        written,
                        cut_off: true,
                    }
                }
            }
        }
        Flood {
            written,
            cut_off: false,
        }
    }

    /// Answers nothing and returns once the client closed the connection.
    async fn silent(mut self) {
        let mut sink = [0u8; 4096];
        while self.0.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    }
}

/// The whole chain of an error, to check the cause is named.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Checks that the client stopped reading a flood early and closed.
async fn assert_abandoned(flood: tokio::task::JoinHandle<Flood>) {
    let f = within(Duration::from_secs(2), flood)
        .await
        .0
        .expect("the flood task");
    assert!(
        f.cut_off && f.written < CUT_OFF_WITHIN,
        "the client read on: {f:?}"
    );
}

/// A vsock backend that accepts every connection and leaves it to `each`.
fn backend<F>(
    listener: UnixListener,
    each: impl Fn(UnixStream) -> F + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (s, _) = listener.accept().await.expect("accepting the client");
            conns.spawn(each(s));
        }
    })
}

/// Checks the dial gives up at its deadline, not before, and says so.
async fn dial_times_out(addr: &AgentAddress) -> AgentError {
    let o = opts();
    let (r, took) = within(o.deadline, AgentClient::connect(addr, &o, None)).await;
    let e = r.expect_err("connected to a backend that never answers");
    assert!(matches!(e, AgentError::DialTimeout { .. }), "{e}");
    assert!(e.to_string().contains("did not answer within 1s"), "{e}");
    assert!(took >= o.deadline, "{took:?}");
    e
}

/// Connects to a guest that answers Health well.
async fn connected(addr: &AgentAddress) -> AgentClient {
    AgentClient::connect(addr, &opts(), None)
        .await
        .expect("connecting to a healthy agent")
}

/// Checks the guest's side ended: the client closed the connection.
async fn assert_closed(guest: tokio::task::JoinHandle<()>) {
    within(Duration::from_secs(1), guest)
        .await
        .0
        .expect("the guest task");
}

/// Checks that `fut` (the client's `call`) fails at once because the stream
/// was refused for a reason containing `needle`.
async fn refused_at_once<T: std::fmt::Debug>(
    call: &str,
    needle: &str,
    fut: impl Future<Output = Result<T, AgentError>>,
) {
    let (r, took) = within(at_once(), fut).await;
    let e = r.expect_err("the hostile stream was taken");
    assert!(took < at_once(), "{took:?}");
    match &e {
        AgentError::InvalidReply { call: c, reason } => {
            assert_eq!(*c, call, "{e}");
            assert!(reason.contains(needle), "{e}");
            assert!(reason.ends_with("so the connection was closed"), "{e}");
        }
        other => panic!(
            "expected an invalid reply from {call}, got: {}",
            chain(other)
        ),
    }
    assert!(
        e.to_string().starts_with(&format!(
            "agent call {call} returned an invalid reply: the agent "
        )),
        "{e}"
    );
}

#[test]
fn garbage_for_a_handshake_reply_fails_the_dial_at_once() {
    for garbage in [
        &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
        b"\xff\x00\x1b[2J\x13\n",
    ] {
        hostile(|addr, listener| async move {
            let guest = tokio::spawn(async move {
                Guest::accept(&listener, garbage).await.silent().await;
            });
            let (r, took) = within(at_once(), AgentClient::connect(&addr, &opts(), None)).await;
            let e = r.expect_err("connected through garbage");
            assert!(matches!(e, AgentError::Handshake { .. }), "{}", chain(&e));
            let msg = e.to_string();
            assert!(
                msg.starts_with("the hybrid vsock handshake with hybrid vsock ")
                    && msg.contains("failed: expected \"OK <port>\", got"),
                "{msg}"
            );
            assert!(!msg.contains('\x1b'), "an escape reached the error: {msg}");
            assert!(took < at_once(), "{took:?}");
            assert_closed(guest).await;
        });
    }
}

#[test]
fn a_handshake_reply_that_never_ends_is_cut_off() {
    hostile(|addr, listener| async move {
        let guest =
            tokio::spawn(async move { Guest::accept(&listener, b"OK 1").await.flood(b"0").await });
        let (r, took) = within(at_once(), AgentClient::connect(&addr, &opts(), None)).await;
        let e = r.expect_err("connected through an endless line");
        assert!(matches!(e, AgentError::Handshake { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("failed: the reply is longer than 32 bytes"),
            "{e}"
        );
        assert!(took < at_once(), "{took:?}");
        assert_abandoned(guest).await;
    });
}

#[test]
fn a_handshake_reply_trickling_forever_hits_the_dial_deadline() {
    hostile(|addr, listener| async move {
        // Every connection gets one byte of "OK 1024" every 50 ms, and never
        // the newline.
        let guest = backend(listener, |s| async move {
            let mut g = Guest::handshake(s, b"O").await;
            for b in b"K 1024".iter().cycle() {
                sleep(Duration::from_millis(50)).await;
                if g.0.write_all(&[*b]).await.is_err() {
                    return;
                }
            }
        });
        let e = dial_times_out(&addr).await;
        guest.abort();
        match &e {
            AgentError::DialTimeout {
                attempts,
                last_error,
                ..
            } => {
                assert!(*attempts >= 2, "{e}");
                assert!(
                    last_error.contains("no answer to the attempt within 300ms"),
                    "{e}"
                );
            }
            other => panic!("expected a dial timeout, got: {other}"),
        }
    });
}

#[test]
fn garbage_instead_of_ttrpc_frames_is_refused_at_once() {
    hostile(|addr, listener| async move {
        let guest = tokio::spawn(async move {
            Guest::accept(&listener, b"OK 1\n")
                .await
                .flood(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
        });
        // "HTTP" read as a length: 0x48545450.
        let needle = "announced a 1213486160-byte message";
        refused_at_once("Health", needle, AgentClient::connect(&addr, &opts(), None)).await;
        assert_abandoned(guest).await;
    });
}

#[test]
fn oversized_frames_are_refused_before_their_body() {
    for length in [1u32 << 30, MESSAGE_LENGTH_MAX as u32 + 1] {
        hostile(|addr, listener| async move {
            let guest = tokio::spawn(async move {
                let mut g = Guest::healthy(&listener).await;
                let (h, req) = g.request().await;
                assert_eq!(req.method, "CreateContainer");
                let mut head: Vec<u8> = MessageHeader::new_response(h.stream_id, length).into();
                // A body that starts like a real response, then never ends.
                head.extend_from_slice(&response(h.stream_id, MESSAGE_TYPE_RESPONSE, &healthy()));
                g.send(&head).await;
                g.flood(b"\x0a\x00").await
            });
            let c = connected(&addr).await;
            let rss = vm_rss_bytes();
            let needle = format!(
                "announced a {length}-byte message on stream 3, over the {MESSAGE_LENGTH_MAX}-byte limit"
            );
            let req = CreateContainerRequest::default();
            refused_at_once("CreateContainer", &needle, c.create_container(&req)).await;
            assert_abandoned(guest).await;
            let grown = vm_rss_bytes().saturating_sub(rss);
            assert!(grown < 32 << 20, "the process grew by {grown} bytes");
            // The connection is gone, and later calls say why, at once.
            refused_at_once("Health", &needle, c.health()).await;
        });
    }
}

#[test]
fn an_endless_stream_after_the_handshake_is_cut_off() {
    hostile(|addr, listener| async move {
        // Zeros parse as empty messages of type 0 on stream 0, without end.
        let guest =
            tokio::spawn(
                async move { Guest::accept(&listener, b"OK 1\n").await.flood(&[0]).await },
            );
        let rss = vm_rss_bytes();
        let needle = "sent a message of type 0 on stream 0";
        refused_at_once("Health", needle, AgentClient::connect(&addr, &opts(), None)).await;
        assert_abandoned(guest).await;
        let grown = vm_rss_bytes().saturating_sub(rss);
        assert!(grown < 32 << 20, "the process grew by {grown} bytes");
    });
}

#[test]
fn a_reply_to_a_request_never_made_is_refused() {
    // Before any request, and to a stream other than the one in flight.
    for (before_any, bogus) in [(true, 9u32), (false, 5)] {
        hostile(|addr, listener| async move {
            let guest = tokio::spawn(async move {
                let g = if before_any {
                    let mut g = Guest::accept(&listener, b"OK 1\n").await;
                    g.send(&response(bogus, MESSAGE_TYPE_RESPONSE, &healthy()))
                        .await;
                    g
                } else {
                    let mut g = Guest::healthy(&listener).await;
                    let (h, _) = g.request().await;
                    assert_ne!(h.stream_id, bogus);
                    g.send(&response(bogus, MESSAGE_TYPE_RESPONSE, &healthy()))
                        .await;
                    g
                };
                // A client that took the bogus reply hears nothing more.
                g.silent().await;
            });
            let needle = format!("answered stream {bogus}, which no request in flight uses");
            if before_any {
                let o = opts();
                refused_at_once("Health", &needle, AgentClient::connect(&addr, &o, None)).await;
            } else {
                let c = connected(&addr).await;
                let req = CreateContainerRequest::default();
                refused_at_once("CreateContainer", &needle, c.create_container(&req)).await;
            }
            assert_closed(guest).await;
        });
    }
}

#[test]
fn the_right_stream_with_the_wrong_message_type_is_refused() {
    for type_ in [MESSAGE_TYPE_DATA, MESSAGE_TYPE_REQUEST] {
        hostile(|addr, listener| async move {
            let guest = tokio::spawn(async move {
                let mut g = Guest::healthy(&listener).await;
                let (h, req) = g.request().await;
                assert_eq!(req.method, "WaitProcess");
                g.send(&response(h.stream_id, type_, &healthy())).await;
                g.silent().await;
            });
            let c = connected(&addr).await;
            // WaitProcess has no timeout: only the refusal can end it.
            let needle = format!("sent a message of type {type_} on stream 3");
            refused_at_once("WaitProcess", &needle, c.wait_process("c", "")).await;
            drop(c);
            assert_closed(guest).await;
        });
    }
}

#[test]
fn a_reply_that_is_not_a_response_fails_that_call_only() {
    hostile(|addr, listener| async move {
        let guest = tokio::spawn(async move {
            let mut g = Guest::healthy(&listener).await;
            let (h, _) = g.request().await;
            // A frame of the right size and type, but not a protobuf Response.
            g.send(&frame(h.stream_id, MESSAGE_TYPE_RESPONSE, b"\xff\xff\xff"))
                .await;
            let (h, req) = g.request().await;
            assert_eq!(req.method, "Health");
            g.send(&response(h.stream_id, MESSAGE_TYPE_RESPONSE, &healthy()))
                .await;
            g.silent().await;
        });
        let c = connected(&addr).await;
        let req = CreateContainerRequest::default();
        let (r, took) = within(at_once(), c.create_container(&req)).await;
        let e = r.expect_err("garbage was taken for a response");
        assert!(
            matches!(
                e,
                AgentError::Rpc {
                    call: "CreateContainer",
                    ..
                }
            ),
            "{}",
            chain(&e)
        );
        assert!(chain(&e).contains("Unpack response error"), "{}", chain(&e));
        assert!(took < at_once(), "{took:?}");
        // The framing held, so the connection carries on.
        let (r, _) = within(at_once(), c.health()).await;
        assert_eq!(r.expect("the next call").agent_version, "hostile");
        drop(c);
        assert_closed(guest).await;
    });
}

#[test]
fn a_silent_backend_hits_the_dial_deadline() {
    hostile(|addr, listener| async move {
        let guest = backend(listener, |s| Guest(s).silent());
        dial_times_out(&addr).await;
        guest.abort();
    });
}

#[test]
fn a_silent_agent_times_out_each_call_and_blocks_only_waits() {
    hostile(|addr, listener| async move {
        let o = opts();
        // Silent after the handshake: the Health of connect times out.
        let guest = tokio::spawn(async move {
            Guest::accept(&listener, b"OK 1\n").await.silent().await;
            Guest::healthy(&listener).await.silent().await;
        });
        let (r, took) = within(o.call_timeout, AgentClient::connect(&addr, &o, None)).await;
        let e = r.expect_err("connected to a silent agent");
        assert!(
            matches!(e, AgentError::Timeout { call: "Health", .. }),
            "{e}"
        );
        assert_eq!(e.to_string(), "agent call Health timed out after 2s");
        assert!(took >= o.call_timeout, "{took:?}");

        // Silent after Health: calls time out, WaitProcess waits by design.
        let c = connected(&addr).await;
        let req = CreateContainerRequest::default();
        let (r, took) = within(o.call_timeout, c.create_container(&req)).await;
        let e = r.expect_err("a silent agent answered");
        assert!(
            matches!(
                e,
                AgentError::Timeout {
                    call: "CreateContainer",
                    ..
                }
            ),
            "{e}"
        );
        assert!(took >= o.call_timeout, "{took:?}");
        let wait = c.wait_process("c", "");
        assert!(
            timeout(o.call_timeout * 2, wait).await.is_err(),
            "WaitProcess ended without an answer"
        );
        drop(c);
        assert_closed(guest).await;
    });
}
