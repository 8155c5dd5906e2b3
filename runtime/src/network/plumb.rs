//! The host side of each mirrored interface: a tap in the pod's network
//! namespace, joined to the veth both ways by a tc ingress qdisc with a
//! `mirred` redirect (Kata's "tcfilter" model), and the record that lets
//! anyone take it all away again.
//!
//! The taps are not persistent: the VMM holds the only fd, so a tap
//! disappears with its VM however the VM ends. What outlives the VM is the
//! veth's ingress qdisc (and its filter); [`unplumb`] removes it, from the
//! shim at the pod's end or from `shim delete` after the shim was killed.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nutshell_vmm::devices::virtio::net::tap::Tap;
use rtnetlink::packet_route::tc::TcMessage;
use rtnetlink::{Handle, LinkUnspec};
use serde::{Deserialize, Serialize};

use super::netns::in_netns;
use super::scan::{index_of, links};
use super::{Mac, NetworkError, PodNetwork};

/// The record's file name in the pod's state directory.
pub const RECORD_FILE: &str = "network.json";

/// Every tap we make is `tap<N>_nutshell`: scans skip them, and a stale one
/// is recognisably ours.
const TAP_SUFFIX: &str = "_nutshell";

/// The most interfaces a pod may have mirrored (the agent takes no more,
/// and every tap name fits `IFNAMSIZ`).
pub const MAX_INTERFACES: usize = 64;

/// `htons(ETH_P_ALL)`: tc compares a filter's protocol with the frame's in
/// network byte order.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// `TC_H_INGRESS`: the ingress qdisc's parent.
const TC_H_INGRESS: u32 = 0xffff_fff1;

/// Whether `name` is one of our taps.
pub(super) fn is_our_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with(TAP_SUFFIX)
}

/// The name of the tap that mirrors the pod's `i`th interface.
pub(super) fn tap_name(i: usize) -> String {
    format!("tap{i}{TAP_SUFFIX}")
}

/// One veth and the tap that mirrors it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlumbedLink {
    pub veth: String,
    pub tap: String,
}

/// What [`plumb`] set up, saved in the pod's state directory before it
/// starts, so that a crash halfway still leaves enough to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The pod's network namespace (a host path).
    pub netns: PathBuf,
    pub links: Vec<PlumbedLink>,
}

impl NetworkRecord {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(RECORD_FILE)
    }

    fn save(&self, state_dir: &Path) -> Result<(), NetworkError> {
        let path = Self::path(state_dir);
        let text = serde_json::to_vec_pretty(self).map_err(|e| NetworkError::Record {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&path, text).map_err(|source| NetworkError::Record { path, source })
    }

    /// The record in `state_dir`, if plumbing was started there.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, NetworkError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| NetworkError::Record {
                    path,
                    source: e.into(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NetworkError::Record { path, source }),
        }
    }
}

/// The plumbed network: the record, and per interface (in [`PodNetwork`]
/// order) the MAC and the tap fd the VM's NIC is to use. A warm VM's taps
/// are its VMM's already: then there are none here.
#[derive(Debug)]
pub struct Plumbed {
    pub record: NetworkRecord,
    pub taps: Vec<(Mac, OwnedFd)>,
}

/// Where the taps come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapSource {
    /// Made here, for a VM to be booted with them.
    Make,
    /// A claimed warm VM's, moved into the namespace by the pool under
    /// the names [`plumb`] would have given them.
    Moved,
}

/// Gives each interface of `net` in the namespace `netns` a tap, made or
/// a warm VM's ([`TapSource`]), and joins each to its veth. The record goes
/// to `state_dir` first. On failure, what was made is taken away before
/// the error returns.
pub async fn plumb(
    netns: &Path,
    net: &PodNetwork,
    state_dir: &Path,
    source: TapSource,
) -> Result<Plumbed, NetworkError> {
    if net.interfaces.len() > MAX_INTERFACES {
        return Err(NetworkError::TooMany {
            found: net.interfaces.len(),
        });
    }
    let record = NetworkRecord {
        netns: netns.to_path_buf(),
        links: net
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, itf)| PlumbedLink {
                veth: itf.name.clone(),
                tap: tap_name(i),
            })
            .collect(),
    };
    record.save(state_dir)?;
    let wanted: Vec<(PlumbedLink, u32, u32, Mac)> = record
        .links
        .iter()
        .zip(&net.interfaces)
        .map(|(l, itf)| (l.clone(), itf.index, itf.mtu, itf.mac))
        .collect();
    let links = record.links.clone();
    let taps = in_netns(netns, move |handle| async move {
        let mut taps = Vec::new();
        for (link, veth_index, mtu, mac) in &wanted {
            let joined = match source {
                TapSource::Make => plumb_one(&handle, link, *veth_index, *mtu).await.map(Some),
                TapSource::Moved => join(&handle, link, *veth_index, *mtu).await.map(|()| None),
            };
            match joined {
                Ok(Some(fd)) => taps.push((*mac, fd)),
                Ok(None) => {}
                Err(e) => {
                    drop(taps);
                    unplumb_here(&handle, &links).await;
                    return Err(e);
                }
            }
        }
        Ok(taps)
    })
    .await?;
    Ok(Plumbed { record, taps })
}

async fn plumb_one(
    handle: &Handle,
    link: &PlumbedLink,
    veth_index: u32,
    mtu: u32,
) -> Result<OwnedFd, NetworkError> {
    // Opened on this thread, so the tap is made in the pod's namespace.
    let tap = Tap::open(&link.tap).map_err(|e| NetworkError::Io {
        what: format!("make tap {} for {}", link.tap, link.veth),
        source: std::io::Error::other(e),
    })?;
    join(handle, link, veth_index, mtu).await?;
    Ok(tap.into_fd())
}

/// Sets the tap up with the veth's MTU and redirects each one's ingress
/// to the other.
async fn join(
    handle: &Handle,
    link: &PlumbedLink,
    veth_index: u32,
    mtu: u32,
) -> Result<(), NetworkError> {
    let tap_index = index_of(
        &links(handle).await?,
        &link.tap,
        format!("find tap {} after making it", link.tap),
    )?;
    let mut builder = LinkUnspec::new_with_index(tap_index).up();
    if mtu > 0 {
        builder = builder.mtu(mtu);
    }
    handle
        .link()
        .set(builder.build())
        .execute()
        .await
        .map_err(NetworkError::netlink(format!("set tap {} up", link.tap)))?;
    for (from, from_name, to, to_name) in [
        (veth_index, &link.veth, tap_index, &link.tap),
        (tap_index, &link.tap, veth_index, &link.veth),
    ] {
        let from = i32::try_from(from).unwrap_or(i32::MAX);
        handle
            .qdisc()
            .add(from)
            .ingress()
            .execute()
            .await
            .map_err(NetworkError::netlink(format!(
                "add an ingress qdisc to {from_name}"
            )))?;
        handle
            .traffic_filter(from)
            .add()
            .parent(INGRESS_HANDLE)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map(|r| r.execute())
            .map_err(NetworkError::netlink(format!(
                "build the redirect from {from_name} to {to_name}"
            )))?
            .await
            .map_err(NetworkError::netlink(format!(
                "redirect {from_name}'s ingress to {to_name}"
            )))?;
    }
    Ok(())
}

/// Takes away what [`plumb`] set up: the ingress qdiscs (with their
/// filters) on the veths, and any of our taps still there. A namespace
/// that is gone already (CNI deleted it) leaves nothing to do.
pub async fn unplumb(record: &NetworkRecord) -> Result<(), NetworkError> {
    let links = record.links.clone();
    match in_netns(&record.netns, move |handle| async move {
        unplumb_here(&handle, &links).await;
        Ok(())
    })
    .await
    {
        Err(NetworkError::Netns { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Best effort: each step logs what it could not do and goes on.
async fn unplumb_here(handle: &Handle, plumbed: &[PlumbedLink]) {
    let present = match links(handle).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the pod namespace's interfaces to clean up");
            return;
        }
    };
    for link in plumbed {
        if let Some(veth) = present.iter().find(|l| l.name == link.veth) {
            let mut req = handle
                .qdisc()
                .del(i32::try_from(veth.index).unwrap_or(i32::MAX));
            let msg: &mut TcMessage = req.message_mut();
            msg.header.parent = TC_H_INGRESS.into();
            msg.header.handle = INGRESS_HANDLE.into();
            match req.execute().await {
                Ok(()) => {}
                // None there: plumbing stopped before it, or it went with
                // the link.
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(
                        e.raw_code().abs(),
                        libc::ENOENT | libc::EINVAL | libc::ENODEV
                    ) => {}
                Err(e) => {
                    tracing::warn!(veth = %link.veth, error = %e, "cannot remove the veth's ingress qdisc")
                }
            }
        }
        if let Some(tap) = present.iter().find(|l| l.name == link.tap) {
            if let Err(e) = handle.link().del(tap.index).execute().await {
                tracing::warn!(tap = %link.tap, error = %e, "cannot remove the tap");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name_and_are_recognised() {
        for i in [0, 9, MAX_INTERFACES - 1, 999] {
            let n = tap_name(i);
            assert!(n.len() <= 15, "{n}");
            assert!(is_our_tap(&n));
        }
        assert!(!is_our_tap("eth0"));
        assert!(!is_our_tap("tap0"));
    }

    #[test]
    fn the_filter_protocol_is_all_in_network_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), 0x0003u16.to_be_bytes());
    }

    #[test]
    fn the_record_round_trips_and_its_absence_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NetworkRecord::load(dir.path()).unwrap(), None);
        let r = NetworkRecord {
            netns: "/var/run/netns/cni-1".into(),
            links: vec![PlumbedLink {
                veth: "eth0".into(),
                tap: tap_name(0),
            }],
        };
        r.save(dir.path()).unwrap();
        assert_eq!(NetworkRecord::load(dir.path()).unwrap(), Some(r));
        std::fs::write(dir.path().join(RECORD_FILE), b"{").unwrap();
        assert!(NetworkRecord::load(dir.path()).is_err());
    }
}
