//! Pod networking, host side: the pod's network namespace, the one CNI (or
//! an engine's hook) set up, mirrored into the pod's VM as Kata's default
//! "tcfilter" model does.
//!
//! - [`scan`] reads what the namespace holds: each veth's MAC, MTU,
//!   addresses, and the routes and permanent neighbours on it.
//! - [`plumb`] makes a tap per veth in the same namespace and joins the two
//!   both ways with a tc ingress `mirred` redirect; the VM gets a virtio-net
//!   NIC with the veth's MAC on that tap, and the agent configures the NIC
//!   like the veth ([`PodNetwork::to_request`]).
//! - [`HoldingNetns`] is the warm pool's side: taps made ahead of a pod,
//!   for warm VMs, in an empty namespace of the pool's own, and moved into
//!   the pod's namespace when a pod claims the VM.
//! - [`unplumb`] takes away what plumbing added, from the record
//!   ([`NetworkRecord`]) it left in the pod's state directory, so that a
//!   killed shim's `delete` cleans up as well as the shim itself.
//!
//! The runtime owns all of this: the agent never sees a host path.

mod holding;
mod netns;
mod plumb;
mod scan;

use std::net::IpAddr;
use std::path::PathBuf;

use nutshell_protocol::agent as pb;

pub use holding::{HoldingNetns, WarmTap};
pub use netns::open_netns;
pub use plumb::{plumb, unplumb, NetworkRecord, Plumbed, TapSource, MAX_INTERFACES, RECORD_FILE};
pub use scan::scan;

/// The VMM's MAC type is the one the runtime passes around too.
pub use nutshell_vmm::devices::virtio::net::MacAddr as Mac;

/// The six octets of a link-layer address, when it is one.
pub(crate) fn mac_from(b: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(b).ok().map(Mac)
}

/// One interface of the pod's namespace, to be mirrored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name in the namespace, and so in the guest ("eth0").
    pub name: String,
    /// Its index in the namespace.
    pub index: u32,
    pub mac: Mac,
    pub mtu: u32,
    pub up: bool,
    /// Addresses with their prefix lengths (IPv6 link-local left out: the
    /// guest makes its own from the same MAC).
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route of the main table through a mirrored interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    pub source: Option<IpAddr>,
    /// RT_SCOPE_*.
    pub scope: u8,
    pub metric: u32,
}

/// A permanent neighbour entry on a mirrored interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub ip: IpAddr,
    pub mac: Mac,
    pub device: String,
}

/// What the pod's network namespace holds, as the guest must see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodNetwork {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

impl PodNetwork {
    /// The agent's UpdateNetwork request that makes the guest match. A
    /// claimed warm VM's NICs carry `link_macs` (in order) until then; a
    /// cold-booted VM's carry the veths' MACs already (`&[]`).
    pub fn to_request(&self, link_macs: &[Mac]) -> pb::UpdateNetworkRequest {
        pb::UpdateNetworkRequest {
            interfaces: self
                .interfaces
                .iter()
                .enumerate()
                .map(|(n, i)| pb::Interface {
                    link_mac: link_macs
                        .get(n)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    mac: i.mac.to_string(),
                    name: i.name.clone(),
                    mtu: i.mtu,
                    addresses: i
                        .addresses
                        .iter()
                        .map(|(a, p)| pb::IpAddress {
                            address: a.to_string(),
                            prefix_len: u32::from(*p),
                            ..Default::default()
                        })
                        .collect(),
                    up: i.up,
                    ..Default::default()
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| pb::Route {
                    destination: format!("{}/{}", r.destination, r.prefix_len),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    scope: u32::from(r.scope),
                    metric: r.metric,
                    ..Default::default()
                })
                .collect(),
            neighbors: self
                .neighbors
                .iter()
                .map(|n| pb::Neighbor {
                    ip: n.ip.to_string(),
                    mac: n.mac.to_string(),
                    device: n.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The MACs of the interfaces, in order: what the VM's NICs carry.
    pub fn macs(&self) -> Vec<Mac> {
        self.interfaces.iter().map(|i| i.mac).collect()
    }
}

/// Errors reading or plumbing a pod's network namespace. Each names the
/// namespace or interface and says why.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace path cannot be opened (it vanished, or was never one).
    #[error("the pod's network namespace {path} cannot be opened; it may have been removed before the pod started")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An interface of a kind that cannot be mirrored into a VM.
    #[error("interface {name} ({kind}) of the pod's network namespace cannot be mirrored into the VM: nutshell mirrors veth interfaces, as CNI's bridge and ptp plugins make")]
    Unsupported { name: String, kind: String },
    /// More interfaces than a VM gets NICs.
    #[error("the pod's network namespace has {found} interfaces to mirror; a pod's VM takes at most {max}", max = plumb::MAX_INTERFACES)]
    TooMany { found: usize },
    /// A netlink request failed.
    #[error("cannot {what} in the pod's network namespace")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call failed (a tap, the namespace thread).
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The record of what was plumbed cannot be written or read.
    #[error("the pod's network record {path} cannot be used")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NetworkError {
    fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let what = what.into();
        move |source| Self::Netlink { what, source }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scanned_network_becomes_the_agents_request() {
        let net = PodNetwork {
            interfaces: vec![Interface {
                name: "eth0".into(),
                index: 2,
                mac: Mac([0x0a, 0x58, 0x0a, 0xd5, 0, 5]),
                mtu: 1500,
                up: true,
                addresses: vec![("10.213.0.5".parse().unwrap(), 24)],
            }],
            routes: vec![Route {
                destination: "0.0.0.0".parse().unwrap(),
                prefix_len: 0,
                gateway: Some("10.213.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                scope: 0,
                metric: 0,
            }],
            neighbors: vec![Neighbor {
                ip: "fd00::1".parse().unwrap(),
                mac: Mac([2, 0, 0, 0, 0, 1]),
                device: "eth0".into(),
            }],
        };
        let r = net.to_request(&[]);
        assert_eq!(r.interfaces[0].link_mac, "");
        let warm = net.to_request(&[Mac([2, 0x6e, 0, 0, 1, 0])]);
        assert_eq!(warm.interfaces[0].link_mac, "02:6e:00:00:01:00");
        assert_eq!(warm.interfaces[0].mac, "0a:58:0a:d5:00:05");
        assert_eq!(r.interfaces[0].mac, "0a:58:0a:d5:00:05");
        assert_eq!(r.interfaces[0].addresses[0].address, "10.213.0.5");
        assert_eq!(r.interfaces[0].addresses[0].prefix_len, 24);
        assert_eq!(r.routes[0].destination, "0.0.0.0/0");
        assert_eq!(r.routes[0].gateway, "10.213.0.1");
        assert_eq!(r.routes[0].source, "");
        assert_eq!(r.neighbors[0].ip, "fd00::1");
        assert_eq!(net.macs(), vec![Mac([0x0a, 0x58, 0x0a, 0xd5, 0, 5])]);
    }

    #[test]
    fn macs_come_only_from_six_octets() {
        assert_eq!(mac_from(&[1, 2, 3, 4, 5, 6]), Some(Mac([1, 2, 3, 4, 5, 6])));
        assert_eq!(mac_from(&[1, 2, 3]), None);
    }
}
