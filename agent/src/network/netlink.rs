//! The kernel side of UpdateNetwork: reads links, addresses, routes and
//! neighbours over rtnetlink and applies what [`super::diff`] decides. The
//! guest has no iproute2; this is all of it the agent needs.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{Stream, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec};

use super::diff::{self, Link, ObservedNeighbor, ObservedRoute};
use super::validate::LOOPBACK;
use super::{Cidr, Interface, Mac, Neighbor, Plan, Route};
use crate::error::{AgentError, Result};

/// Makes the network of the agent's network namespace what `plan` says.
pub async fn apply(plan: &Plan) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| AgentError::internal(format!("cannot open a netlink socket: {e}")))?;
    let conn = tokio::spawn(conn);
    let result = Netlink(handle).apply(plan).await;
    conn.abort();
    result
}

fn failed(what: impl Display, e: rtnetlink::Error) -> AgentError {
    let why = match &e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    };
    AgentError::Internal(format!("cannot {what}: {why}"))
}

/// A delete's result: one that found nothing is fine, as the kernel
/// removes some objects along with what they depend on (an address's
/// routes, a primary address's secondaries).
fn deleted(res: Result<(), rtnetlink::Error>, what: String) -> Result<()> {
    match res {
        Err(rtnetlink::Error::NetlinkError(m))
            if matches!(
                m.to_io().raw_os_error(),
                Some(libc::ESRCH | libc::EADDRNOTAVAIL | libc::ENOENT)
            ) =>
        {
            Ok(())
        }
        res => res.map_err(|e| failed(what, e)),
    }
}

fn family(addr: &IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The changes applied, for the log.
#[derive(Default)]
struct Count {
    links: usize,
    addresses: usize,
    routes: usize,
    neighbors: usize,
}

struct Netlink(Handle);

impl Netlink {
    async fn apply(&self, plan: &Plan) -> Result<()> {
        let links = self.links().await?;
        // Every NIC is found before anything changes.
        let mut found = plan
            .interfaces
            .iter()
            .map(|itf| diff::find_link(&links, itf).cloned())
            .collect::<Result<Vec<_>>>()?;
        let mut count = Count::default();
        if diff::renames_collide(&found, &plan.interfaces) {
            for (link, itf) in found.iter_mut().zip(&plan.interfaces) {
                if link.name != itf.name {
                    let aside = Interface {
                        name: format!("nsn{}", link.index),
                        mtu: None,
                        addresses: Vec::new(),
                        up: false,
                        ..itf.clone()
                    };
                    count.links += self.configure_link(link, &aside).await?;
                    (link.name, link.up, link.mac) = (aside.name, false, Some(aside.mac));
                }
            }
        }
        for (itf, link) in plan.interfaces.iter().zip(&found) {
            count.links += self.configure_link(link, itf).await?;
            count.addresses += self.set_addresses(link.index, itf).await?;
        }
        // The names as they are now, after the renames.
        let links = self.links().await?;
        let names: HashMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let index_of = |name: &str| {
            links
                .iter()
                .find(|l| l.name == name)
                .map(|l| l.index)
                .ok_or_else(|| AgentError::internal(format!("the guest has no link {name}")))
        };
        let mut devices: Vec<&str> = plan.interfaces.iter().map(|i| i.name.as_str()).collect();
        let neighbors = diff::neighbors(&self.neighbors(&names).await?, &plan.neighbors, &devices);
        devices.push(LOOPBACK);
        let routes = diff::routes(&self.routes(&names).await?, &plan.routes, &devices);

        for r in &routes.delete {
            let req = self.0.route().del(route_message(
                r,
                index_of(&r.device)?,
                RouteProtocol::Unspec,
            ));
            deleted(req.execute().await, format!("delete the route {r}"))?;
        }
        for r in &routes.add {
            let msg = route_message(r, index_of(&r.device)?, RouteProtocol::Static);
            self.0
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| failed(format_args!("add the route {r}"), e))?;
        }
        count.routes = routes.delete.len() + routes.add.len();
        for n in &neighbors.delete {
            let req = self
                .0
                .neighbours()
                .del(neighbor_message(n, index_of(&n.device)?));
            deleted(req.execute().await, format!("delete the neighbour {n}"))?;
        }
        for n in &neighbors.add {
            self.0
                .neighbours()
                .add(index_of(&n.device)?, n.ip)
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| failed(format_args!("add the neighbour {n}"), e))?;
        }
        count.neighbors = neighbors.delete.len() + neighbors.add.len();
        tracing::info!(
            interfaces = plan.interfaces.len(),
            link_changes = count.links,
            address_changes = count.addresses,
            route_changes = count.routes,
            neighbor_changes = count.neighbors,
            "network updated"
        );
        Ok(())
    }

    async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> =
            collect(self.0.link().get().execute(), "list the links").await?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// Name, MTU and state; returns how many changes it made.
    async fn configure_link(&self, link: &Link, itf: &Interface) -> Result<usize> {
        let steps = diff::link_steps(link, itf);
        let set = || LinkUnspec::new_with_index(link.index);
        let mut changes = Vec::new();
        if steps.down_first {
            changes.push((
                set().down().build(),
                format!("set {} down to change it", link.name),
            ));
        }
        if let Some(mac) = steps.set_mac {
            changes.push((
                set().address(mac.0.to_vec()).build(),
                format!("give {} the MAC {mac}", link.name),
            ));
        }
        if let Some(name) = &steps.rename {
            changes.push((
                set().name(name.clone()).build(),
                format!("rename {} to {name}", link.name),
            ));
        }
        if let Some(mtu) = steps.mtu {
            changes.push((
                set().mtu(mtu).build(),
                format!("set the MTU of {} to {mtu}", itf.name),
            ));
        }
        match steps.set_up {
            Some(true) => changes.push((set().up().build(), format!("set {} up", itf.name))),
            Some(false) => changes.push((set().down().build(), format!("set {} down", itf.name))),
            None => {}
        }
        let n = changes.len();
        for (msg, what) in changes {
            self.0
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| failed(what, e))?;
        }
        Ok(n)
    }

    async fn addresses(&self, index: u32) -> Result<Vec<Cidr>> {
        let req = self
            .0
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let msgs: Vec<AddressMessage> = collect(req, "list the addresses").await?;
        Ok(msgs.iter().filter_map(cidr_of).collect())
    }

    /// Makes the link's addresses the interface's; returns how many changes
    /// it made.
    async fn set_addresses(&self, index: u32, itf: &Interface) -> Result<usize> {
        let changes = diff::addresses(&self.addresses(index).await?, &itf.addresses);
        for c in &changes.delete {
            let req = self.0.address().del(address_message(index, c));
            deleted(
                req.execute().await,
                format!("delete the address {c} of {}", itf.name),
            )?;
        }
        // Deleting an IPv4 primary address can take its secondaries along:
        // what to add is decided on what is left.
        let deletes = changes.delete.len();
        let changes = match deletes {
            0 => changes,
            _ => diff::addresses(&self.addresses(index).await?, &itf.addresses),
        };
        if let Some(c) = changes.delete.first() {
            return Err(AgentError::internal(format!(
                "the address {c} of {} is still there after deleting it",
                itf.name
            )));
        }
        for c in &changes.add {
            let mut req = self.0.address().add(index, c.addr, c.prefix_len).replace();
            if c.addr.is_ipv6() {
                // Usable at once: the pod's address was checked on the host.
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| failed(format_args!("add the address {c} to {}", itf.name), e))?;
        }
        Ok(deletes + changes.add.len())
    }

    async fn routes(&self, names: &HashMap<u32, String>) -> Result<Vec<ObservedRoute>> {
        let mut all = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut filter = RouteMessage::default();
            filter.header.address_family = family;
            let msgs: Vec<RouteMessage> =
                collect(self.0.route().get(filter).execute(), "list the routes").await?;
            // A kernel without the family answers with all it has.
            let asked = msgs.iter().filter(|m| m.header.address_family == family);
            all.extend(asked.filter_map(|m| observed_route(m, names)));
        }
        Ok(all)
    }

    async fn neighbors(&self, names: &HashMap<u32, String>) -> Result<Vec<ObservedNeighbor>> {
        let mut all = Vec::new();
        // Per family: an unspecified one would list the bridge FDB too.
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let req = self
                .0
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            let msgs: Vec<NeighbourMessage> = collect(req, "list the neighbours").await?;
            let asked = msgs.iter().filter(|m| m.header.family == family);
            all.extend(asked.filter_map(|m| observed_neighbor(m, names)));
        }
        Ok(all)
    }
}

async fn collect<T>(
    stream: impl Stream<Item = Result<T, rtnetlink::Error>>,
    what: &str,
) -> Result<Vec<T>> {
    stream.try_collect().await.map_err(|e| failed(what, e))
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(bytes) => link.mac = Mac::from_bytes(bytes),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    link
}

/// IFA_LOCAL is the address itself (IFA_ADDRESS is the peer's on a
/// point-to-point link); IPv6 addresses have only IFA_ADDRESS.
fn cidr_of(m: &AddressMessage) -> Option<Cidr> {
    let find = |want_local: bool| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if want_local => Some(*ip),
            AddressAttribute::Address(ip) if !want_local => Some(*ip),
            _ => None,
        })
    };
    let addr = find(true).or_else(|| find(false))?;
    Some(Cidr {
        addr,
        prefix_len: m.header.prefix_len,
    })
}

fn address_message(index: u32, c: &Cidr) -> AddressMessage {
    match c.addr {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, c.prefix_len)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, c.prefix_len)
            .build(),
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// A route with one next hop on a named link; others (multipath, a
/// family we do not manage) are `None`, so they are never touched.
fn observed_route(m: &RouteMessage, names: &HashMap<u32, String>) -> Option<ObservedRoute> {
    let h = &m.header;
    let unspecified: IpAddr = match h.address_family {
        AddressFamily::Inet => Ipv4Addr::UNSPECIFIED.into(),
        AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    let (mut dst, mut gateway, mut source, mut oif) = (None, None, None, None);
    let (mut metric, mut table) = (0, u32::from(h.table));
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => source = ip_of(s),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    Some(ObservedRoute {
        route: Route {
            destination: Cidr {
                addr: dst.unwrap_or(unspecified),
                prefix_len: h.destination_prefix_length,
            },
            gateway,
            device: names.get(&oif?)?.clone(),
            source,
            scope: h.scope.into(),
            metric,
        },
        table,
        protocol: h.protocol.into(),
        unicast: h.kind == RouteType::Unicast,
    })
}

/// The message that adds `r` (with `protocol`) or deletes it (with
/// `Unspec`, which matches whoever added it).
fn route_message(r: &Route, oif: u32, protocol: RouteProtocol) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&r.destination.addr);
    m.header.destination_prefix_length = r.destination.prefix_len;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = protocol;
    m.header.scope = RouteScope::from(r.scope);
    m.header.kind = RouteType::Unicast;
    if r.destination.prefix_len > 0 {
        m.attributes.push(RouteAttribute::Destination(route_address(
            r.destination.addr,
        )));
    }
    if let Some(gw) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(route_address(gw)));
    }
    if let Some(src) = r.source {
        m.attributes
            .push(RouteAttribute::PrefSource(route_address(src)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    if r.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    m
}

fn observed_neighbor(
    m: &NeighbourMessage,
    names: &HashMap<u32, String>,
) -> Option<ObservedNeighbor> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = Mac::from_bytes(bytes),
            _ => {}
        }
    }
    Some(ObservedNeighbor {
        neighbor: Neighbor {
            ip: ip?,
            mac: mac?,
            device: names.get(&m.header.ifindex)?.clone(),
        },
        permanent: m.header.state == NeighbourState::Permanent,
    })
}

fn neighbor_message(n: &Neighbor, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family(&n.ip);
    m.header.ifindex = index;
    m.attributes
        .push(NeighbourAttribute::Destination(match n.ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> HashMap<u32, String> {
        HashMap::from([(1, "lo".to_string()), (2, "eth0".to_string())])
    }

    #[test]
    fn a_route_message_reads_back_as_the_same_route() {
        let route = Route {
            destination: Cidr {
                addr: "10.89.0.0".parse().unwrap(),
                prefix_len: 16,
            },
            gateway: Some("10.88.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: Some("10.88.0.5".parse().unwrap()),
            scope: 0,
            metric: 100,
        };
        let m = route_message(&route, 2, RouteProtocol::Static);
        let seen = observed_route(&m, &names()).unwrap();
        assert_eq!(seen.route, route);
        assert_eq!((seen.table, seen.protocol, seen.unicast), (254, 4, true));
        // A default route has no destination attribute and reads back as
        // 0.0.0.0/0 / ::/0.
        let default = Route {
            destination: Cidr {
                addr: "::".parse().unwrap(),
                prefix_len: 0,
            },
            gateway: Some("fd00::1".parse().unwrap()),
            source: None,
            metric: 1024,
            ..route
        };
        let m = route_message(&default, 2, RouteProtocol::Unspec);
        assert!(!m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(observed_route(&m, &names()).unwrap().route, default);
        // On an unknown link: not ours.
        assert!(
            observed_route(&route_message(&default, 9, RouteProtocol::Static), &names()).is_none()
        );
    }

    #[test]
    fn neighbour_and_address_messages_read_back() {
        let n = Neighbor {
            ip: "fd00::1".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            device: "eth0".into(),
        };
        let mut m = neighbor_message(&n, 2);
        // Without a link-layer address it is not an entry to compare.
        assert!(observed_neighbor(&m, &names()).is_none());
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
        m.header.state = NeighbourState::Permanent;
        let seen = observed_neighbor(&m, &names()).unwrap();
        assert_eq!(seen.neighbor, n);
        assert!(seen.permanent);

        for text in ["10.88.0.5/16", "fd00::5/64"] {
            let (a, l) = text.split_once('/').unwrap();
            let c = Cidr {
                addr: a.parse().unwrap(),
                prefix_len: l.parse().unwrap(),
            };
            let m = address_message(2, &c);
            assert_eq!(m.header.index, 2);
            assert_eq!(cidr_of(&m), Some(c));
        }
    }
}
