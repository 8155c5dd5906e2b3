//! The pool's protocol, one JSON line per message over a Unix stream:
//! the claimer sends a [`Request`], the pool answers with a [`Reply`]
//! (an offer carries the VM's pidfds as `SCM_RIGHTS`), and the claimer
//! confirms an offer with a [`Taken`]. Every read is bounded in size and
//! time; the peer is untrusted input either way.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{PoolError, VmShape};
use crate::hypervisor::handover::HandoverRecord;

/// Longest message either side accepts.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds an offer may carry (a VM has at most three processes).
const MAX_FDS: usize = 8;

/// A claim.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub shape: VmShape,
    /// Where the VM's state directory goes: the pod's, which must not
    /// exist yet.
    pub target: PathBuf,
    /// The pod's name for the VM (logs, process titles of later
    /// messages).
    pub id: String,
    /// The pod's network, when it has one to mirror.
    #[serde(default)]
    pub network: Option<NetworkClaim>,
}

/// What a pod with a network needs of a warm VM's NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkClaim {
    /// The pod's network namespace (a host path), where the pool moves the
    /// VM's taps.
    pub netns: PathBuf,
    /// How many interfaces it mirrors: the VM's first NICs serve them.
    pub nics: usize,
}

/// The pool's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// A VM, now in `target`; its pidfds come with the message.
    Offer(Offer),
    /// No VM; why.
    None(String),
}

/// An offered VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    pub vm: HandoverRecord,
    /// The guest MACs of the NICs whose taps are now in the pod's
    /// namespace (as `tap<i>_nutshell`), in order: the agent finds each
    /// NIC by it and gives it the pod's.
    #[serde(default)]
    pub nic_macs: Vec<String>,
}

/// The claimer has adopted the offered VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Taken {
    pub taken: bool,
}

fn protocol(m: impl Into<String>) -> PoolError {
    PoolError::Protocol(m.into())
}

/// Writes `msg` as one line, with `fds` attached.
pub fn send<T: Serialize>(stream: &UnixStream, msg: &T, fds: &[RawFd]) -> Result<(), PoolError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| protocol(format!("cannot encode: {e}")))?;
    line.push(b'\n');
    let mut sent = 0;
    if !fds.is_empty() {
        let iov = [io::IoSlice::new(&line)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sent = sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| PoolError::io("send a message with fds")(e.into()))?;
    }
    let mut s = stream;
    s.write_all(&line[sent..])
        .map_err(PoolError::io("send a message"))
}

/// Reads one line and the fds that came with it.
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> Result<(T, Vec<OwnedFd>), PoolError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| PoolError::io("receive a message")(e.into()))?;
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg
            .cmsgs()
            .map_err(|e| PoolError::io("read fds")(e.into()))?
        {
            if let ControlMessageOwned::ScmRights(got) = c {
                for fd in got {
                    // SAFETY: SCM_RIGHTS just installed this fd in our
                    // table; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if truncated {
            return Err(protocol("the peer sent more fds than a VM has"));
        }
        if n == 0 {
            return Err(protocol("the peer closed the connection"));
        }
        let chunk = buf.get(..n).unwrap_or_default();
        if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            if end + 1 != n {
                return Err(protocol("the peer sent more than one message"));
            }
            break;
        }
        line.extend_from_slice(chunk);
        if line.len() > MAX_MESSAGE {
            return Err(protocol("the peer's message is too long"));
        }
    }
    let msg = serde_json::from_slice(&line)
        .map_err(|e| protocol(format!("not a message of the pool's protocol: {e}")))?;
    Ok((msg, fds))
}

/// Reads one line that must come without fds.
pub fn receive_plain<T: DeserializeOwned>(stream: &UnixStream) -> Result<T, PoolError> {
    let (msg, fds) = receive(stream)?;
    if !fds.is_empty() {
        return Err(protocol("the peer sent fds where none belong"));
    }
    Ok(msg)
}

/// The uid of the peer of `stream`.
pub fn peer_uid(stream: &impl AsFd) -> Result<u32, PoolError> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(|e| PoolError::io("read the peer's credentials")(e.into()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        text: String,
    }

    #[test]
    fn a_message_and_its_fds_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let long = "x".repeat(10_000);
        send(&a, &Msg { text: long.clone() }, &[file.as_raw_fd()]).unwrap();
        let (msg, fds) = receive::<Msg>(&b).unwrap();
        assert_eq!(msg.text, long);
        assert_eq!(fds.len(), 1);
        send(
            &a,
            &Msg {
                text: "plain".into(),
            },
            &[],
        )
        .unwrap();
        assert_eq!(receive_plain::<Msg>(&b).unwrap().text, "plain");
    }

    #[test]
    fn what_breaks_the_protocol_is_refused() {
        let refuse = |bytes: &[u8]| {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(bytes).unwrap();
            drop(a);
            receive::<Msg>(&b).unwrap_err().to_string()
        };
        assert!(refuse(b"{\"text\":\"a\"}\n{\"text\":\"b\"}\n").contains("more than one"));
        assert!(refuse(b"not json\n").contains("not a message"));
        assert!(refuse(b"{\"text\":\"cut").contains("closed"));
        let huge = vec![b'x'; MAX_MESSAGE + 8192];
        assert!(refuse(&huge).contains("too long"));
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send(&a, &Msg { text: "t".into() }, &[file.as_raw_fd()]).unwrap();
        assert!(receive_plain::<Msg>(&b)
            .unwrap_err()
            .to_string()
            .contains("fds"));
    }
}
