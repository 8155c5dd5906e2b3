//! The request, checked whole before anything changes: every refusal is an
//! `InvalidArgument` sentence naming the field (`routes[2].gateway`).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use nutshell_protocol::agent as pb;

use super::{Cidr, Interface, Mac, Neighbor, Plan, Route};
use crate::error::{AgentError, Result};

/// Bounds on what one request may hold: a pod has a handful of each.
pub const MAX_INTERFACES: usize = 64;
pub const MAX_ADDRESSES: usize = 256;
pub const MAX_ROUTES: usize = 1024;
pub const MAX_NEIGHBORS: usize = 1024;

/// The guest's loopback, which routes may name but no interface may take.
pub const LOOPBACK: &str = "lo";

/// IFNAMSIZ less the NUL.
const MAX_NAME_LEN: usize = 15;
/// The smallest MTU IPv4 allows, and the one IPv6 needs.
const MIN_MTU: u32 = 68;
const MIN_MTU_V6: u32 = 1280;
/// What the kernel gives an IPv6 route that asks for metric 0.
pub const DEFAULT_METRIC_V6: u32 = 1024;
const RT_SCOPE_UNIVERSE: u8 = 0;
const SCOPES: [(u32, &str); 4] = [(0, "universe"), (200, "site"), (253, "link"), (254, "host")];

fn bad(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

/// Echoes a field of the request, bounded, so that a huge or binary value
/// does not make a huge or unreadable error.
fn shown(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

fn at_most(what: &str, count: usize, max: usize) -> Result<()> {
    if count > max {
        return Err(bad(format!(
            "the request has {count} {what}; at most {max} are allowed"
        )));
    }
    Ok(())
}

/// The first repeated key: (index of the first, index of the repeat).
fn first_repeat<T, K: Eq + Hash>(items: &[T], key: impl Fn(&T) -> K) -> Option<(usize, usize)> {
    let mut seen = HashMap::new();
    items
        .iter()
        .enumerate()
        .find_map(|(i, item)| seen.insert(key(item), i).map(|first| (first, i)))
}

/// Checks the request and turns it into a plan.
pub fn plan(req: &pb::UpdateNetworkRequest) -> Result<Plan> {
    at_most("interfaces", req.interfaces.len(), MAX_INTERFACES)?;
    at_most("routes", req.routes.len(), MAX_ROUTES)?;
    at_most("neighbors", req.neighbors.len(), MAX_NEIGHBORS)?;
    let interfaces = req
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, itf)| interface(i, itf))
        .collect::<Result<Vec<_>>>()?;
    if let Some((a, b)) = first_repeat(&interfaces, |i| i.mac) {
        return Err(bad(format!(
            "interfaces[{b}].mac {} is also interfaces[{a}]'s",
            interfaces[b].mac
        )));
    }
    if let Some((a, b)) = first_repeat(&interfaces, Interface::found_by) {
        return Err(bad(format!(
            "interfaces[{b}].link_mac {} is also interfaces[{a}]'s link",
            interfaces[b].found_by()
        )));
    }
    if let Some((a, b)) = first_repeat(&interfaces, |i| i.name.clone()) {
        return Err(bad(format!(
            "interfaces[{b}].name {} is also interfaces[{a}]'s",
            shown(&interfaces[b].name)
        )));
    }
    let routes = req
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(i, r, &interfaces))
        .collect::<Result<Vec<_>>>()?;
    // The kernel keys a main-table route by destination and metric: a second
    // one would replace the first, and each call would undo the last.
    if let Some((a, b)) = first_repeat(&routes, |r| (r.destination, r.metric)) {
        return Err(bad(format!(
            "routes[{b}] has the destination {} and metric {} of routes[{a}] \
             (multipath routes are not supported)",
            routes[b].destination, routes[b].metric
        )));
    }
    let neighbors = req
        .neighbors
        .iter()
        .enumerate()
        .map(|(i, n)| neighbor(i, n, &interfaces))
        .collect::<Result<Vec<_>>>()?;
    if let Some((a, b)) = first_repeat(&neighbors, |n| (n.ip, n.device.clone())) {
        return Err(bad(format!(
            "neighbors[{b}] is again {} on {}, as neighbors[{a}]",
            neighbors[b].ip, neighbors[b].device
        )));
    }
    Ok(Plan {
        interfaces,
        routes,
        neighbors,
    })
}

fn interface(i: usize, itf: &pb::Interface) -> Result<Interface> {
    let at = format!("interfaces[{i}]");
    let mac = mac(&format!("{at}.mac"), &itf.mac)?;
    let link_mac = match itf.link_mac.as_str() {
        "" => None,
        text => Some(self::mac(&format!("{at}.link_mac"), text)?),
    };
    check_name(&format!("{at}.name"), &itf.name)?;
    let mtu = match itf.mtu {
        0 => None,
        mtu if (MIN_MTU..=u32::from(u16::MAX)).contains(&mtu) => Some(mtu),
        mtu => {
            return Err(bad(format!(
                "{at}.mtu {mtu} is out of range ({MIN_MTU} to 65535, or 0 to leave it)"
            )))
        }
    };
    at_most(
        &format!("addresses in {at}"),
        itf.addresses.len(),
        MAX_ADDRESSES,
    )?;
    let addresses = itf
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| address(&format!("{at}.addresses[{j}]"), a))
        .collect::<Result<Vec<_>>>()?;
    if let Some((a, b)) = first_repeat(&addresses, |c| c.addr) {
        return Err(bad(format!(
            "{at}.addresses[{b}] repeats the address {} of {at}.addresses[{a}]",
            addresses[b].addr
        )));
    }
    if let (Some(mtu @ ..MIN_MTU_V6), Some(v6)) = (mtu, addresses.iter().find(|c| c.addr.is_ipv6()))
    {
        return Err(bad(format!(
            "{at}.mtu {mtu} is below {MIN_MTU_V6}, which the IPv6 address {v6} needs"
        )));
    }
    Ok(Interface {
        mac,
        link_mac,
        name: itf.name.clone(),
        mtu,
        addresses,
        up: itf.up,
    })
}

fn mac(at: &str, text: &str) -> Result<Mac> {
    Mac::parse(text).ok_or_else(|| {
        bad(format!(
            "{at} {} is not a MAC address (six hex octets, like 02:42:0a:58:00:05)",
            shown(text)
        ))
    })
}

/// What the kernel's `dev_valid_name` accepts, less what would be
/// ambiguous here (`lo`).
fn check_name(at: &str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_NAME_LEN {
        "is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "is not a valid interface name"
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        "holds '/', ':', NUL or whitespace"
    } else if name == LOOPBACK {
        "is the loopback's name"
    } else {
        return Ok(());
    };
    Err(bad(format!("{at} {} {why}", shown(name))))
}

fn ip(at: &str, text: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| bad(format!("{at} {} is not an IP address", shown(text))))
}

/// An address a host may hold or route through: not `0.0.0.0`/`::`, not
/// multicast, not the IPv4 broadcast address.
fn unicast_ip(at: &str, text: &str) -> Result<IpAddr> {
    let addr = ip(at, text)?;
    let unicast = match addr {
        IpAddr::V4(a) => !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast(),
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast(),
    };
    if !unicast {
        return Err(bad(format!("{at} {addr} is not a unicast address")));
    }
    Ok(addr)
}

fn prefix_len(at: &str, addr: &IpAddr, len: u32) -> Result<u8> {
    let max = Cidr::max_len(addr);
    u8::try_from(len).ok().filter(|l| *l <= max).ok_or_else(|| {
        bad(format!(
            "{at} prefix length {len} is out of range for {addr} (0 to {max})"
        ))
    })
}

fn address(at: &str, a: &pb::IpAddress) -> Result<Cidr> {
    let addr = unicast_ip(&format!("{at}.address"), &a.address)?;
    let prefix_len = prefix_len(at, &addr, a.prefix_len)?;
    Ok(Cidr { addr, prefix_len })
}

/// A route's destination: `address/length` with the host bits zero (the
/// kernel refuses others; naming the network meant is kinder than
/// masking silently).
fn destination(at: &str, text: &str) -> Result<Cidr> {
    let Some((addr, len)) = text.split_once('/') else {
        return Err(bad(format!(
            "{at} {} is not in address/length form (e.g. 10.88.0.0/16, 0.0.0.0/0, ::/0)",
            shown(text)
        )));
    };
    let addr = ip(at, addr)?;
    let len = len
        .parse::<u32>()
        .map_err(|_| bad(format!("{at} {} has no numeric prefix length", shown(text))))?;
    let cidr = Cidr {
        addr,
        prefix_len: prefix_len(at, &addr, len)?,
    };
    let network = cidr.network();
    if network != addr {
        return Err(bad(format!(
            "{at} {cidr} has host bits set (the network is {network}/{})",
            cidr.prefix_len
        )));
    }
    Ok(cidr)
}

fn optional(at: &str, text: &str, family_of: &IpAddr) -> Result<Option<IpAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    let addr = unicast_ip(at, text)?;
    if addr.is_ipv4() != family_of.is_ipv4() {
        return Err(bad(format!(
            "{at} {addr} is not of the destination's family ({family_of})"
        )));
    }
    Ok(Some(addr))
}

/// The request's interface a route or neighbour names; it must be up, as
/// the kernel keeps neither on a link that is down.
fn device(at: &str, name: &str, interfaces: &[Interface]) -> Result<()> {
    let Some(itf) = interfaces.iter().find(|i| i.name == name) else {
        return Err(bad(format!(
            "{at} {} names none of the request's interfaces",
            shown(name)
        )));
    };
    if !itf.up {
        return Err(bad(format!(
            "{at} {name} is an interface the request sets down"
        )));
    }
    Ok(())
}

fn route(i: usize, r: &pb::Route, interfaces: &[Interface]) -> Result<Route> {
    let at = format!("routes[{i}]");
    let destination = destination(&format!("{at}.destination"), &r.destination)?;
    let family = destination.addr;
    let gateway = optional(&format!("{at}.gateway"), &r.gateway, &family)?;
    let source = optional(&format!("{at}.source"), &r.source, &family)?;
    if r.device != LOOPBACK {
        device(&format!("{at}.device"), &r.device, interfaces)?;
    }
    let Some(&(scope, _)) = SCOPES.iter().find(|(s, _)| *s == r.scope) else {
        let known = SCOPES.map(|(s, n)| format!("{s} {n}")).join(", ");
        return Err(bad(format!("{at}.scope {} is not one of {known}", r.scope)));
    };
    // As the kernel reports an IPv6 route: scope universe, metric 0 made
    // 1024.
    let (scope, metric) = match (family, r.metric) {
        (IpAddr::V4(_), metric) => (scope as u8, metric),
        (IpAddr::V6(_), 0) => (RT_SCOPE_UNIVERSE, DEFAULT_METRIC_V6),
        (IpAddr::V6(_), metric) => (RT_SCOPE_UNIVERSE, metric),
    };
    Ok(Route {
        destination,
        gateway,
        device: r.device.clone(),
        source,
        scope,
        metric,
    })
}

fn neighbor(i: usize, n: &pb::Neighbor, interfaces: &[Interface]) -> Result<Neighbor> {
    let at = format!("neighbors[{i}]");
    let ip = unicast_ip(&format!("{at}.ip"), &n.ip)?;
    let mac = mac(&format!("{at}.mac"), &n.mac)?;
    device(&format!("{at}.device"), &n.device, interfaces)?;
    Ok(Neighbor {
        ip,
        mac,
        device: n.device.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn itf(mac: &str, name: &str, addrs: &[(&str, u32)]) -> pb::Interface {
        pb::Interface {
            mac: mac.into(),
            name: name.into(),
            mtu: 1450,
            addresses: addrs
                .iter()
                .map(|(a, l)| pb::IpAddress {
                    address: (*a).into(),
                    prefix_len: *l,
                    ..Default::default()
                })
                .collect(),
            up: true,
            ..Default::default()
        }
    }

    fn route(dst: &str, gw: &str, dev: &str) -> pb::Route {
        pb::Route {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
            ..Default::default()
        }
    }

    /// A pod's request, as the shim builds it from a CNI bridge network.
    fn good() -> pb::UpdateNetworkRequest {
        pb::UpdateNetworkRequest {
            interfaces: vec![itf(
                "02:42:0A:58:00:05",
                "eth0",
                &[("10.88.0.5", 16), ("fd00::5", 64)],
            )],
            routes: vec![
                pb::Route {
                    scope: 253,
                    ..route("10.89.0.0/16", "", "eth0")
                },
                route("0.0.0.0/0", "10.88.0.1", "eth0"),
                route("::/0", "fd00::1", "eth0"),
            ],
            neighbors: vec![pb::Neighbor {
                ip: "10.88.0.1".into(),
                mac: "02:42:0a:58:00:01".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn refusal(req: &pb::UpdateNetworkRequest) -> String {
        match plan(req) {
            Err(AgentError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn refused_with(change: impl FnOnce(&mut pb::UpdateNetworkRequest), needle: &str) {
        let mut req = good();
        change(&mut req);
        let msg = refusal(&req);
        assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
    }

    #[test]
    fn a_pod_request_becomes_a_normalised_plan() {
        let p = plan(&good()).unwrap();
        assert_eq!(p.interfaces.len(), 1);
        let eth0 = &p.interfaces[0];
        assert_eq!(eth0.mac.to_string(), "02:42:0a:58:00:05");
        assert_eq!(eth0.mtu, Some(1450));
        assert_eq!(
            eth0.addresses
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["10.88.0.5/16", "fd00::5/64"]
        );
        assert_eq!(p.routes[0].scope, 253);
        assert_eq!(p.routes[0].metric, 0);
        assert_eq!(p.routes[1].gateway, Some("10.88.0.1".parse().unwrap()));
        // IPv6: as the kernel will report it.
        assert_eq!(p.routes[2].scope, 0);
        assert_eq!(p.routes[2].metric, DEFAULT_METRIC_V6);
        assert_eq!(
            p.routes[2].to_string(),
            "::/0 via fd00::1 dev eth0 metric 1024"
        );
        assert_eq!(
            p.neighbors[0].to_string(),
            "10.88.0.1 lladdr 02:42:0a:58:00:01 dev eth0"
        );
    }

    #[test]
    fn an_empty_request_is_an_empty_plan_and_mtu_0_leaves_it() {
        assert_eq!(
            plan(&pb::UpdateNetworkRequest::default()).unwrap(),
            Plan::default()
        );
        let mut req = good();
        req.interfaces[0].mtu = 0;
        assert_eq!(plan(&req).unwrap().interfaces[0].mtu, None);
    }

    #[test]
    fn bad_interfaces_are_refused_naming_the_field() {
        refused_with(
            |r| r.interfaces[0].mac = "02:42:0a:58:00".into(),
            "interfaces[0].mac \"02:42:0a:58:00\" is not a MAC",
        );
        refused_with(
            |r| r.interfaces[0].link_mac = "zz".into(),
            "interfaces[0].link_mac \"zz\" is not a MAC",
        );
        refused_with(
            |r| r.interfaces[0].name = String::new(),
            "interfaces[0].name \"\" is empty",
        );
        refused_with(
            |r| r.interfaces[0].name = "a-very-long-name0".into(),
            "longer than 15 bytes",
        );
        for name in ["eth/0", "eth:0", "eth 0", "eth\t0"] {
            refused_with(|r| r.interfaces[0].name = name.into(), "interfaces[0].name");
        }
        refused_with(
            |r| r.interfaces[0].name = "..".into(),
            "not a valid interface name",
        );
        refused_with(|r| r.interfaces[0].name = "lo".into(), "loopback");
        refused_with(
            |r| r.interfaces[0].mtu = 67,
            "interfaces[0].mtu 67 is out of range",
        );
        refused_with(
            |r| r.interfaces[0].mtu = 65536,
            "interfaces[0].mtu 65536 is out of range",
        );
        refused_with(
            |r| r.interfaces[0].mtu = 1000,
            "interfaces[0].mtu 1000 is below 1280, which the IPv6 address fd00::5/64 needs",
        );
        refused_with(
            |r| r.interfaces[0].addresses[0].address = "10.88.0.300".into(),
            "interfaces[0].addresses[0].address \"10.88.0.300\" is not an IP address",
        );
        refused_with(
            |r| r.interfaces[0].addresses[0].prefix_len = 33,
            "prefix length 33 is out of range for 10.88.0.5 (0 to 32)",
        );
        refused_with(
            |r| r.interfaces[0].addresses[1].prefix_len = 129,
            "out of range for fd00::5 (0 to 128)",
        );
        refused_with(
            |r| r.interfaces[0].addresses[0].address = "224.0.0.1".into(),
            "not a unicast address",
        );
        refused_with(
            |r| r.interfaces[0].addresses[1].address = "::".into(),
            "not a unicast address",
        );
        refused_with(
            |r| {
                r.interfaces[0].addresses[1] = pb::IpAddress {
                    address: "10.88.0.5".into(),
                    prefix_len: 24,
                    ..Default::default()
                }
            },
            "interfaces[0].addresses[1] repeats the address 10.88.0.5",
        );
        refused_with(
            |r| r.interfaces.push(itf("02:42:0a:58:00:05", "eth1", &[])),
            "interfaces[1].mac 02:42:0a:58:00:05 is also interfaces[0]'s",
        );
        refused_with(
            |r| r.interfaces.push(itf("02:42:0a:58:00:06", "eth0", &[])),
            "interfaces[1].name \"eth0\" is also interfaces[0]'s",
        );
        refused_with(
            |r| {
                let mut second = itf("02:42:0a:58:00:06", "eth1", &[]);
                second.link_mac = "02:42:0a:58:00:05".into();
                r.interfaces.push(second);
            },
            "interfaces[1].link_mac 02:42:0a:58:00:05 is also interfaces[0]'s link",
        );
    }

    #[test]
    fn bad_routes_are_refused_naming_the_field() {
        refused_with(
            |r| r.routes[0].destination = "10.89.0.0".into(),
            "routes[0].destination \"10.89.0.0\" is not in address/length form",
        );
        refused_with(
            |r| r.routes[0].destination = "10.89.0.0/x".into(),
            "no numeric prefix length",
        );
        refused_with(
            |r| r.routes[0].destination = "10.89.0.0/33".into(),
            "prefix length 33 is out of range",
        );
        refused_with(
            |r| r.routes[0].destination = "nope/8".into(),
            "is not an IP address",
        );
        refused_with(
            |r| r.routes[0].destination = "10.89.3.4/16".into(),
            "routes[0].destination 10.89.3.4/16 has host bits set (the network is 10.89.0.0/16)",
        );
        refused_with(
            |r| r.routes[1].gateway = "fd00::1".into(),
            "routes[1].gateway fd00::1 is not of the destination's family",
        );
        refused_with(
            |r| r.routes[2].source = "10.88.0.5".into(),
            "routes[2].source 10.88.0.5 is not of the destination's family",
        );
        refused_with(
            |r| r.routes[1].gateway = "10.88.0.255.1".into(),
            "routes[1].gateway",
        );
        refused_with(
            |r| r.routes[1].device = "eth9".into(),
            "routes[1].device \"eth9\" names none of the request's interfaces",
        );
        refused_with(
            |r| r.interfaces[0].up = false,
            "routes[0].device eth0 is an interface the request sets down",
        );
        refused_with(
            |r| r.routes[0].scope = 7,
            "routes[0].scope 7 is not one of 0 universe, 200 site, 253 link, 254 host",
        );
        refused_with(
            |r| r.routes.push(route("0.0.0.0/0", "10.88.0.2", "eth0")),
            "routes[3] has the destination 0.0.0.0/0 and metric 0 of routes[1]",
        );
        // Metric 0 and 1024 are the same IPv6 route.
        refused_with(
            |r| {
                r.routes.push(pb::Route {
                    metric: 1024,
                    ..route("::/0", "fd00::2", "eth0")
                })
            },
            "routes[3] has the destination ::/0 and metric 1024 of routes[2]",
        );
        // The loopback may carry routes; another metric is another route.
        let mut req = good();
        req.routes.push(route("10.90.0.0/16", "", "lo"));
        req.routes.push(pb::Route {
            metric: 100,
            ..route("0.0.0.0/0", "10.88.0.2", "eth0")
        });
        assert_eq!(plan(&req).unwrap().routes.len(), 5);
    }

    #[test]
    fn bad_neighbors_are_refused_naming_the_field() {
        refused_with(
            |r| r.neighbors[0].mac = "zz".into(),
            "neighbors[0].mac \"zz\" is not a MAC",
        );
        refused_with(
            |r| r.neighbors[0].ip = "".into(),
            "neighbors[0].ip \"\" is not an IP address",
        );
        refused_with(
            |r| r.neighbors[0].device = "lo".into(),
            "neighbors[0].device \"lo\" names none",
        );
        let mut dup = good();
        let again = dup.neighbors[0].clone();
        dup.neighbors.push(pb::Neighbor {
            mac: "02:00:00:00:00:09".into(),
            ..again
        });
        assert!(refusal(&dup).contains("neighbors[1] is again 10.88.0.1 on eth0, as neighbors[0]"));
    }

    #[test]
    fn counts_are_bounded_and_long_fields_are_not_echoed_whole() {
        refused_with(
            |r| r.routes = vec![route("10.0.0.0/8", "", "eth0"); MAX_ROUTES + 1],
            "the request has 1025 routes; at most 1024 are allowed",
        );
        refused_with(
            |r| r.interfaces = vec![pb::Interface::default(); MAX_INTERFACES + 1],
            "at most 64 are allowed",
        );
        refused_with(
            |r| r.interfaces[0].addresses = vec![pb::IpAddress::default(); MAX_ADDRESSES + 1],
            "the request has 257 addresses in interfaces[0]",
        );
        let mut req = good();
        req.interfaces[0].mac = "x".repeat(1 << 20);
        let msg = refusal(&req);
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains("\"xxxxx") && msg.contains("..."), "{msg}");
    }
}
