//! The agent's listener, and who may talk to it.
//!
//! Whoever reaches the agent can exec into every container, read their
//! output, start privileged containers and power the VM off, so over vsock
//! only the host (the runtime, through the VMM) is served: a connection
//! from any other CID, such as a container's through the guest's own CID
//! or `VMADDR_CID_LOCAL`, is closed at once without a byte read. A Unix
//! socket (host mode) is guarded by its file permissions instead.

use std::io;

use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_HOST};
use ttrpc::r#async::transport::Listener;

/// Whether a vsock peer may talk to the agent: the host only.
pub fn vsock_peer_allowed(peer_cid: u32) -> bool {
    peer_cid == VMADDR_CID_HOST
}

/// Parses the `CID:PORT` of a `vsock://` address; `-1` is any CID.
pub fn parse_vsock(addr: &str) -> io::Result<(u32, u32)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("vsock address {addr:?} is not CID:PORT"),
        )
    };
    let (cid, port) = addr.split_once(':').ok_or_else(bad)?;
    let cid = if cid == "-1" {
        VMADDR_CID_ANY
    } else {
        cid.parse().map_err(|_| bad())?
    };
    Ok((cid, port.parse().map_err(|_| bad())?))
}

/// Binds `listen` (`unix://PATH` or `vsock://CID:PORT`); over vsock, only
/// connections [`vsock_peer_allowed`] come out of the listener.
pub fn bind(listen: &str) -> io::Result<Listener> {
    let Some(addr) = listen.strip_prefix("vsock://") else {
        return Listener::bind(listen);
    };
    let (cid, port) = parse_vsock(addr)?;
    let listener = VsockListener::bind(VsockAddr::new(cid, port))?;
    let accepted = futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) if vsock_peer_allowed(peer.cid()) => {
                    return Some((Ok(stream), listener))
                }
                Ok((stream, peer)) => {
                    // Dropping the stream closes it: the peer reads EOF or
                    // a reset before anything is served.
                    drop(stream);
                    tracing::warn!(
                        peer_cid = peer.cid(),
                        peer_port = peer.port(),
                        "refused a vsock connection: only the host (CID {VMADDR_CID_HOST}) may talk to the agent"
                    );
                }
                Err(e) => return Some((Err(e), listener)),
            }
        }
    });
    Ok(Listener::new(accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_may_connect() {
        assert!(vsock_peer_allowed(2));
        // Hypervisor, local (loopback), the guest's own CID as the runtime
        // assigns it, any other guest, and "any".
        for cid in [0, 1, 3, 4, 1000, u32::MAX] {
            assert!(!vsock_peer_allowed(cid), "CID {cid}");
        }
    }

    #[test]
    fn vsock_addresses_parse() {
        assert_eq!(parse_vsock("-1:1024").unwrap(), (VMADDR_CID_ANY, 1024));
        assert_eq!(parse_vsock("3:5000").unwrap(), (3, 5000));
        for bad in ["", "1024", "x:1", "1:x", "-2:1", "1:2:3"] {
            assert!(parse_vsock(bad).is_err(), "{bad:?}");
        }
    }
}
