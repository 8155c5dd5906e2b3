//! The stand-in's stdio, relayed to and from the guest process by the
//! shim's relays (`nutshell_runtime::shim::stdio::Relays::start_fds`): fd 0
//! to its stdin (end-of-file included), its stdout to fd 1 and its stderr
//! to fd 2 (with a terminal, the one stream goes to fd 1). The fds are
//! whatever the caller gave `create`: pipes (Docker's runc shim, conmon),
//! FIFOs, files, `/dev/null` or a pty slave.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nutshell_runtime::agent::AgentClient;
use nutshell_runtime::shim::stdio::{Relays, Stream};

/// A copy of our fd `n` as an async file.
fn dup(n: i32) -> Option<tokio::fs::File> {
    // SAFETY: fds 0–2 are open for the process's whole life (the caller's
    // stdio); they are only borrowed for the dup.
    let fd = unsafe { BorrowedFd::borrow_raw(n) };
    let owned: OwnedFd = fd.as_fd().try_clone_to_owned().ok()?;
    Some(tokio::fs::File::from_std(std::fs::File::from(owned)))
}

/// Starts relaying this process's fds 0–2 for process `exec_id` of
/// container `cid`.
pub fn start(agent: &AgentClient, cid: &str, exec_id: &str, terminal: bool) -> Relays {
    let streams: &[(Stream, i32)] = if terminal {
        &[(Stream::Stdout, 1)]
    } else {
        &[(Stream::Stdout, 1), (Stream::Stderr, 2)]
    };
    let outputs = streams
        .iter()
        .filter_map(|&(stream, fd)| Some((stream, dup(fd)?)))
        .collect();
    Relays::start_fds(agent, cid, exec_id, dup(0), outputs)
}
