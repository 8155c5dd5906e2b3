//! Reading the pod's network namespace: which interfaces to mirror, and
//! the addresses, routes and permanent neighbours the guest must copy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::netns::in_netns;
use super::plumb::is_our_tap;
use super::{mac_from, Interface, Mac, Neighbor, NetworkError, PodNetwork, Route};

/// Reads the network namespace at `path`: every interface but `lo` (and
/// our own taps), with its addresses, routes and permanent neighbours.
/// An interface that cannot be mirrored is an error naming it, never a
/// pod that silently lacks it.
pub async fn scan(path: &Path) -> Result<PodNetwork, NetworkError> {
    in_netns(path, scan_here).await
}

/// A link as the dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
}

/// What to do with a link of the namespace.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Mirror,
    /// Not the pod's (loopback, our taps, a kernel's fallback tunnel).
    Skip,
    Refuse,
}

/// veth interfaces are mirrored. Others are refused, unless they are idle:
/// a link that is down with no address is a kernel's fallback tunnel
/// (`tunl0`, `sit0`, ... appear in every namespace once their module is
/// loaded) or an unused device, and carries none of the pod's traffic.
pub(super) fn verdict(link: &LinkFacts, has_addresses: bool) -> Verdict {
    if link.loopback || is_our_tap(&link.name) {
        return Verdict::Skip;
    }
    if link.kind.as_deref() == Some("veth") && link.mac.is_some() {
        return Verdict::Mirror;
    }
    if !link.up && !has_addresses {
        return Verdict::Skip;
    }
    Verdict::Refuse
}

fn link_facts(msg: &LinkMessage) -> LinkFacts {
    let mut f = LinkFacts {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => f.name = n.clone(),
            LinkAttribute::Address(b) => f.mac = mac_from(b),
            LinkAttribute::Mtu(m) => f.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        f.kind = Some(match k {
                            InfoKind::Veth => "veth".to_string(),
                            other => other.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// The index of the interface `name` among `links`; a missing one is an
/// error saying what `what` could not do.
pub(super) fn index_of(links: &[LinkFacts], name: &str, what: String) -> Result<u32, NetworkError> {
    links
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| NetworkError::Io {
            what,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
}

pub(super) async fn links(handle: &Handle) -> Result<Vec<LinkFacts>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .map_ok(|m| link_facts(&m))
        .try_collect()
        .await
        .map_err(NetworkError::netlink("list the interfaces"))
}

async fn scan_here(handle: Handle) -> Result<PodNetwork, NetworkError> {
    let links = links(&handle).await?;
    let mut addresses: HashMap<u32, Vec<(IpAddr, u8)>> = HashMap::new();
    let mut dump = handle.address().get().execute();
    while let Some(m) = dump
        .try_next()
        .await
        .map_err(NetworkError::netlink("list the addresses"))?
    {
        let mut addr = None;
        for a in &m.attributes {
            match a {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is
                // the peer's on a point-to-point link).
                AddressAttribute::Local(ip) => addr = Some(*ip),
                AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                _ => {}
            }
        }
        if let Some(ip) = addr.filter(|ip| !is_link_local_v6(ip)) {
            addresses
                .entry(m.header.index)
                .or_default()
                .push((ip, m.header.prefix_len));
        }
    }
    let mut interfaces = Vec::new();
    for l in &links {
        let addrs = addresses.remove(&l.index).unwrap_or_default();
        match verdict(l, !addrs.is_empty()) {
            Verdict::Skip => {}
            Verdict::Refuse => {
                return Err(NetworkError::Unsupported {
                    name: l.name.clone(),
                    kind: l.kind.clone().unwrap_or_else(|| "no kind".into()),
                })
            }
            Verdict::Mirror => interfaces.push(Interface {
                name: l.name.clone(),
                index: l.index,
                mac: l.mac.unwrap_or(Mac([0; 6])),
                mtu: l.mtu,
                up: l.up,
                addresses: addrs,
            }),
        }
    }
    let names: HashMap<u32, String> = interfaces
        .iter()
        .map(|i| (i.index, i.name.clone()))
        .collect();
    let mut routes = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let query = match version {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut dump = handle.route().get(query).execute();
        while let Some(m) = dump
            .try_next()
            .await
            .map_err(NetworkError::netlink("list the routes"))?
        {
            if let Some(r) = route_of(&m.header, &m.attributes, &names) {
                routes.push(r);
            }
        }
    }
    let mut neighbors = Vec::new();
    let mut dump = handle.neighbours().get().execute();
    while let Some(m) = dump
        .try_next()
        .await
        .map_err(NetworkError::netlink("list the neighbours"))?
    {
        if m.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(device) = names.get(&m.header.ifindex) else {
            continue;
        };
        let mut ip = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from(b),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neighbors.push(Neighbor {
                ip,
                mac,
                device: device.clone(),
            });
        }
    }
    Ok(PodNetwork {
        interfaces,
        routes,
        neighbors,
    })
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route to mirror, if this one is: a unicast route of the main table
/// through a mirrored interface, not one the kernel made for an address
/// (the guest's kernel makes those itself).
pub(super) fn route_of(
    header: &RouteHeader,
    attributes: &[RouteAttribute],
    names: &HashMap<u32, String>,
) -> Option<Route> {
    let mut table = u32::from(header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut device = None;
    let mut source = None;
    let mut metric = 0;
    for a in attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => destination = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Oif(i) => device = names.get(i),
            RouteAttribute::PrefSource(s) => source = route_ip(s),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let v6 = header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
    let destination = destination.unwrap_or(if v6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    });
    Some(Route {
        destination,
        prefix_len: header.destination_prefix_length,
        gateway,
        device: device?.clone(),
        source,
        scope: u8::from(header.scope),
        metric,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteScope;
    use rtnetlink::packet_route::AddressFamily;

    fn link(name: &str, kind: Option<&str>, up: bool) -> LinkFacts {
        LinkFacts {
            index: 2,
            name: name.into(),
            kind: kind.map(String::from),
            mac: Some(Mac([2, 0, 0, 0, 0, 1])),
            mtu: 1500,
            up,
            loopback: false,
        }
    }

    #[test]
    fn veths_are_mirrored_and_idle_or_own_links_skipped() {
        assert_eq!(
            verdict(&link("eth0", Some("veth"), true), true),
            Verdict::Mirror
        );
        assert_eq!(
            verdict(&link("eth1", Some("veth"), false), false),
            Verdict::Mirror
        );
        assert_eq!(
            verdict(&link("tap0_nutshell", Some("tun"), true), false),
            Verdict::Skip
        );
        assert_eq!(
            verdict(&link("tunl0", Some("ipip"), false), false),
            Verdict::Skip
        );
        let mut lo = link("lo", None, true);
        lo.loopback = true;
        assert_eq!(verdict(&lo, true), Verdict::Skip);
    }

    #[test]
    fn links_that_carry_traffic_but_are_no_veth_are_refused() {
        assert_eq!(
            verdict(&link("macvlan0", Some("macvlan"), true), false),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(&link("wg0", Some("wireguard"), false), true),
            Verdict::Refuse
        );
    }

    fn header(kind: RouteType, protocol: RouteProtocol, table: u8) -> RouteHeader {
        RouteHeader {
            address_family: AddressFamily::Inet,
            kind,
            protocol,
            table,
            scope: RouteScope::Universe,
            ..Default::default()
        }
    }

    #[test]
    fn a_default_route_through_a_mirrored_link_is_kept() {
        let names = HashMap::from([(2, "eth0".to_string())]);
        let attrs = [
            RouteAttribute::Gateway(RouteAddress::Inet("10.213.0.1".parse().unwrap())),
            RouteAttribute::Oif(2),
        ];
        let r = route_of(
            &header(
                RouteType::Unicast,
                RouteProtocol::Boot,
                RouteHeader::RT_TABLE_MAIN,
            ),
            &attrs,
            &names,
        )
        .expect("kept");
        assert_eq!(r.destination, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(r.prefix_len, 0);
        assert_eq!(r.gateway, Some("10.213.0.1".parse().unwrap()));
        assert_eq!(r.device, "eth0");
    }

    #[test]
    fn kernel_local_and_foreign_routes_are_left_out() {
        let names = HashMap::from([(2, "eth0".to_string())]);
        let through = [RouteAttribute::Oif(2)];
        let main = RouteHeader::RT_TABLE_MAIN;
        assert!(route_of(
            &header(RouteType::Unicast, RouteProtocol::Kernel, main),
            &through,
            &names
        )
        .is_none());
        assert!(route_of(
            &header(RouteType::Local, RouteProtocol::Boot, 255),
            &through,
            &names
        )
        .is_none());
        assert!(route_of(
            &header(RouteType::Unicast, RouteProtocol::Boot, main),
            &[RouteAttribute::Oif(9)],
            &names
        )
        .is_none());
    }

    #[test]
    fn ipv6_link_local_is_recognised() {
        assert!(is_link_local_v6(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local_v6(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local_v6(&"10.0.0.1".parse().unwrap()));
    }
}
