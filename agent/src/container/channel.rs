//! The control channel between the agent and a container's init process: a
//! Unix stream socketpair carrying length-prefixed JSON [`InitMsg`]s, and
//! the pty master as SCM_RIGHTS.
//!
//! Typed messages instead of raw bytes (youki does the same) keep the
//! handshake readable; the init side is blocking (it is single-threaded),
//! the agent side async.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::config::InitConfig;

/// Largest message either side accepts (the spec is the big one; ttrpc
/// already bounds it to 4 MiB).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// One message on the control channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum InitMsg {
    /// agent → init: what to set up.
    Config(Box<InitConfig>),
    /// init (stage 1) → agent: the pid of the container process.
    Pid(i32),
    /// init → agent: the pty master rides along as SCM_RIGHTS.
    Pty,
    /// init → agent: set up, waiting for [`InitMsg::Start`].
    Ready,
    /// agent → init: exec the user process.
    Start,
    /// init → agent: what failed, as a kind the agent maps to a status
    /// and a sentence for the caller.
    Error {
        /// What sort of failure it is; decides the status code.
        kind: InitErrorKind,
        /// A sentence saying what failed.
        message: String,
    },
}

/// The sort of failure an init reports. The agent maps it to a status in
/// one place ([`super::spawn::init_error`]), so rewording a message never
/// changes what the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitErrorKind {
    /// Something the request names does not exist (the executable).
    NotFound,
    /// The request is malformed or contradicts itself.
    Invalid,
    /// The request is valid but this agent does not implement it.
    Unsupported,
    /// The request is valid but the kernel refused it for lack of privilege.
    PermissionDenied,
    /// Anything else: the agent's or the kernel's failure.
    Internal,
}

fn encode(msg: &InitMsg) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_MESSAGE {
        return Err(io::Error::other("control message too large"));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode(body: &[u8]) -> io::Result<InitMsg> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS just installed `r` in our fd table and
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(msg.bytes)
}

/// Blocking send (init side); `pass` rides along as SCM_RIGHTS.
pub fn send_blocking(
    fd: BorrowedFd<'_>,
    msg: &InitMsg,
    pass: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let bytes = encode(msg)?;
    let mut off = 0;
    if let Some(p) = pass {
        let raw = [p.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        off = sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )?;
    }
    while off < bytes.len() {
        match nix::unistd::write(fd, &bytes[off..]) {
            Ok(n) => off += n,
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Blocking receive (init side). `None` at EOF.
pub fn recv_blocking(fd: BorrowedFd<'_>) -> io::Result<Option<InitMsg>> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    if !read_exact(fd, &mut header, &mut fds)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::other("control message too large"));
    }
    let mut body = vec![0u8; len];
    if !read_exact(fd, &mut body, &mut fds)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    decode(&body).map(Some)
}

fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        match recv_some(fd.as_raw_fd(), &mut buf[off..], fds) {
            Ok(0) if off == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The agent's end of the channel.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    /// Descriptors received so far (the pty master).
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    /// Wraps the agent's end of the socketpair.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        crate::stdio::set_nonblocking(&fd)?;
        Ok(Self {
            fd: crate::stdio::register(fd)?,
            buf: Vec::new(),
            fds: Vec::new(),
        })
    }

    /// Sends one message.
    pub async fn send(&self, msg: &InitMsg) -> io::Result<()> {
        let bytes = encode(msg)?;
        let mut off = 0;
        while off < bytes.len() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref(), &bytes[off..]).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Receives one message; `None` when the init closed its end (which,
    /// after Start, means its execve succeeded: the socket is CLOEXEC).
    pub async fn recv(&mut self) -> io::Result<Option<InitMsg>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(io::Error::other("control message too large"));
                }
                if self.buf.len() >= 4 + len {
                    let msg = decode(&self.buf[4..4 + len]);
                    self.buf.drain(..4 + len);
                    return msg.map(Some);
                }
            }
            let mut chunk = [0u8; 8192];
            let mut guard = self.fd.readable().await?;
            let fds = &mut self.fds;
            match guard.try_io(|fd| recv_some(fd.get_ref().as_raw_fd(), &mut chunk, fds)) {
                Ok(Ok(0)) if self.buf.is_empty() => return Ok(None),
                Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// The descriptor, for closing it explicitly.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_keeps_its_kind_across_the_channel() {
        let sent = InitMsg::Error {
            kind: InitErrorKind::PermissionDenied,
            message: "setting it was refused".into(),
        };
        let bytes = encode(&sent).unwrap();
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - 4);
        match decode(&bytes[4..]).unwrap() {
            InitMsg::Error { kind, message } => {
                assert_eq!(kind, InitErrorKind::PermissionDenied);
                assert_eq!(message, "setting it was refused");
            }
            other => panic!("decoded {other:?}"),
        }
    }
}
