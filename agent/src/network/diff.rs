//! What to change: the plan against what the kernel reports. Pure functions,
//! so the rules (what the kernel owns, what order) are tested without
//! netlink.

use super::{Cidr, Interface, Mac, Neighbor, Route};
use crate::error::{AgentError, Result};

/// The main routing table (RT_TABLE_MAIN).
pub const RT_TABLE_MAIN: u32 = 254;
/// RTPROT_KERNEL: routes the kernel made for an address or a link.
pub const RTPROT_KERNEL: u8 = 2;

/// What to delete and what to add, in that order.
#[derive(Debug, PartialEq, Eq)]
pub struct Changes<T> {
    pub delete: Vec<T>,
    pub add: Vec<T>,
}

/// `current` made exactly `wanted`.
pub fn diff<T: PartialEq + Clone>(current: &[T], wanted: &[T]) -> Changes<T> {
    Changes {
        delete: current
            .iter()
            .filter(|c| !wanted.contains(c))
            .cloned()
            .collect(),
        add: wanted
            .iter()
            .filter(|w| !current.contains(w))
            .cloned()
            .collect(),
    }
}

/// A link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
}

/// The guest link with `itf`'s MAC (its current one, when it is to change).
pub fn find_link<'a>(links: &'a [Link], itf: &Interface) -> Result<&'a Link> {
    let wanted = itf.found_by();
    let mut matching = links.iter().filter(|l| l.mac == Some(wanted));
    match (matching.next(), matching.next()) {
        (Some(link), None) => Ok(link),
        (Some(a), Some(b)) => Err(AgentError::FailedPrecondition(format!(
            "the MAC {} of interface {} is on more than one guest link ({} and {})",
            wanted, itf.name, a.name, b.name
        ))),
        (None, _) => {
            let have = links
                .iter()
                .filter_map(|l| l.mac.map(|m| format!("{} {m}", l.name)))
                .collect::<Vec<_>>();
            Err(AgentError::NotFound(format!(
                "no guest link has the MAC {} of interface {} (the guest has: {})",
                wanted,
                itf.name,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )))
        }
    }
}

/// What to do to a link, in this order, before its addresses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkSteps {
    /// A link must be down to be renamed or to get another MAC.
    pub down_first: bool,
    pub rename: Option<String>,
    pub set_mac: Option<Mac>,
    pub mtu: Option<u32>,
    /// Up (true) or down (false); `None` when it already is as asked.
    pub set_up: Option<bool>,
}

/// The steps that make `link` what `itf` asks.
pub fn link_steps(link: &Link, itf: &Interface) -> LinkSteps {
    let rename = (link.name != itf.name).then(|| itf.name.clone());
    let set_mac = (link.mac != Some(itf.mac)).then_some(itf.mac);
    let down_first = link.up && (rename.is_some() || set_mac.is_some());
    let up_after = link.up && !down_first;
    LinkSteps {
        down_first,
        rename,
        set_mac,
        mtu: itf.mtu.filter(|m| *m != link.mtu),
        set_up: (itf.up != up_after).then_some(itf.up),
    }
}

/// Whether renaming the links one by one would collide: one's new name is
/// still another's (a swap, or eth1 → eth0 while eth0 → net1). The names
/// of a plan are unique, so the holder is itself to be renamed: the
/// renamed links first get temporary names.
pub fn renames_collide(found: &[Link], plan: &[Interface]) -> bool {
    found.iter().zip(plan).any(|(link, itf)| {
        link.name != itf.name
            && found
                .iter()
                .any(|other| other.index != link.index && other.name == itf.name)
    })
}

/// A link's addresses made exactly `wanted`, except the IPv6 link-local
/// ones the kernel adds, which stay.
pub fn addresses(current: &[Cidr], wanted: &[Cidr]) -> Changes<Cidr> {
    let current = current
        .iter()
        .filter(|c| !c.is_link_local_v6() || wanted.contains(c))
        .copied()
        .collect::<Vec<_>>();
    diff(&current, wanted)
}

/// A route as the kernel reports it, with what decides whether it is ours
/// to manage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedRoute {
    pub route: Route,
    pub table: u32,
    pub protocol: u8,
    pub unicast: bool,
}

/// The main table's unicast routes on `devices` made exactly `wanted`:
/// the kernel's own routes (an address's subnet, fe80::/64) are never
/// deleted, and a wanted route that already exists, the kernel's or not, is
/// left alone. Routes without a gateway are added first, so that the
/// gateways of the others are reachable when they are added.
pub fn routes(observed: &[ObservedRoute], wanted: &[Route], devices: &[&str]) -> Changes<Route> {
    let present = observed
        .iter()
        .filter(|o| {
            o.table == RT_TABLE_MAIN && o.unicast && devices.contains(&o.route.device.as_str())
        })
        .collect::<Vec<_>>();
    let delete = present
        .iter()
        .filter(|o| o.protocol != RTPROT_KERNEL && !wanted.contains(&o.route))
        .map(|o| o.route.clone())
        .collect();
    let mut add = wanted
        .iter()
        .filter(|w| !present.iter().any(|o| &o.route == *w))
        .cloned()
        .collect::<Vec<_>>();
    add.sort_by_key(|r| r.gateway.is_some());
    Changes { delete, add }
}

/// A neighbour entry as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedNeighbor {
    pub neighbor: Neighbor,
    pub permanent: bool,
}

/// The permanent entries on `devices` made exactly `wanted`; learned
/// entries are left to the kernel (adding replaces one with the same IP).
pub fn neighbors(
    observed: &[ObservedNeighbor],
    wanted: &[Neighbor],
    devices: &[&str],
) -> Changes<Neighbor> {
    let current = observed
        .iter()
        .filter(|o| o.permanent && devices.contains(&o.neighbor.device.as_str()))
        .map(|o| o.neighbor.clone())
        .collect::<Vec<_>>();
    diff(&current, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        let (a, l) = text.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix_len: l.parse().unwrap(),
        }
    }

    fn link(index: u32, name: &str, mac: u8, up: bool) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some(Mac([2, 0, 0, 0, 0, mac])),
            mtu: 1500,
            up,
        }
    }

    fn itf(name: &str, mac: u8, mtu: Option<u32>, up: bool) -> Interface {
        Interface {
            mac: Mac([2, 0, 0, 0, 0, mac]),
            link_mac: None,
            name: name.into(),
            mtu,
            addresses: vec![],
            up,
        }
    }

    fn route(dst: &str, gw: Option<&str>, dev: &str) -> Route {
        Route {
            destination: cidr(dst),
            gateway: gw.map(|g| g.parse().unwrap()),
            device: dev.into(),
            source: None,
            scope: 0,
            metric: 0,
        }
    }

    fn observed(route: Route, protocol: u8) -> ObservedRoute {
        ObservedRoute {
            route,
            table: RT_TABLE_MAIN,
            protocol,
            unicast: true,
        }
    }

    #[test]
    fn diff_deletes_what_is_unwanted_and_adds_what_is_missing() {
        let c = diff(&[1, 2, 3], &[3, 4]);
        assert_eq!(
            c,
            Changes {
                delete: vec![1, 2],
                add: vec![4]
            }
        );
        let same = diff(&[1, 2], &[2, 1]);
        assert!(same.delete.is_empty() && same.add.is_empty());
    }

    #[test]
    fn links_are_found_by_mac_and_a_missing_one_is_named() {
        let links = [
            Link {
                mac: Some(Mac([0; 6])),
                ..link(1, "lo", 0, true)
            },
            link(2, "nic0", 5, false),
            Link {
                mac: None,
                ..link(3, "tun0", 0, true)
            },
        ];
        assert_eq!(
            find_link(&links, &itf("eth0", 5, None, true))
                .unwrap()
                .index,
            2
        );
        match find_link(&links, &itf("eth1", 6, None, true)) {
            Err(AgentError::NotFound(m)) => assert_eq!(
                m,
                "no guest link has the MAC 02:00:00:00:00:06 of interface eth1 \
                 (the guest has: lo 00:00:00:00:00:00, nic0 02:00:00:00:00:05)"
            ),
            other => panic!("{other:?}"),
        }
        let twice = [link(2, "a", 5, true), link(3, "b", 5, true)];
        assert!(matches!(
            find_link(&twice, &itf("eth0", 5, None, true)),
            Err(AgentError::FailedPrecondition(m)) if m.contains("(a and b)")
        ));
    }

    #[test]
    fn a_rename_takes_the_link_down_and_the_request_sets_its_state() {
        let up = link(2, "nic0", 5, true);
        assert_eq!(
            link_steps(&up, &itf("eth0", 5, Some(1400), true)),
            LinkSteps {
                down_first: true,
                rename: Some("eth0".into()),
                set_mac: None,
                mtu: Some(1400),
                set_up: Some(true),
            }
        );
        // Renamed and to stay down: no second "down".
        let s = link_steps(&up, &itf("eth0", 5, None, false));
        assert!(s.down_first && s.set_up.is_none());
        // Already as asked: nothing at all.
        let done = Link {
            name: "eth0".into(),
            mtu: 1400,
            ..up.clone()
        };
        assert_eq!(
            link_steps(&done, &itf("eth0", 5, Some(1400), true)),
            LinkSteps::default()
        );
        assert_eq!(
            link_steps(&done, &itf("eth0", 5, None, true)),
            LinkSteps::default()
        );
        let down = link(2, "eth0", 5, false);
        let s = link_steps(&down, &itf("eth0", 5, None, true));
        assert_eq!(
            (s.down_first, s.rename, s.set_up),
            (false, None, Some(true))
        );
        assert_eq!(
            link_steps(&up, &itf("nic0", 5, None, false)).set_up,
            Some(false)
        );
    }

    #[test]
    fn a_warm_nic_is_found_by_its_link_mac_and_given_the_pods() {
        let warm = link(2, "eth0", 9, true);
        let pods = Interface {
            link_mac: Some(Mac([2, 0, 0, 0, 0, 9])),
            ..itf("eth0", 5, None, true)
        };
        let links = [warm.clone()];
        assert_eq!(find_link(&links, &pods).unwrap().index, 2);
        // Found by the pod's MAC, it would not be found at all.
        assert!(find_link(&links, &itf("eth0", 5, None, true)).is_err());
        assert_eq!(
            link_steps(&warm, &pods),
            LinkSteps {
                down_first: true,
                rename: None,
                set_mac: Some(Mac([2, 0, 0, 0, 0, 5])),
                mtu: None,
                set_up: Some(true),
            }
        );
        // Once it carries the pod's MAC, nothing changes.
        let done = link(2, "eth0", 5, true);
        assert_eq!(link_steps(&done, &pods), LinkSteps::default());
    }

    #[test]
    fn only_renames_onto_each_others_names_collide() {
        let found = [link(2, "eth0", 5, true), link(3, "eth1", 6, true)];
        let swap = [itf("eth1", 5, None, true), itf("eth0", 6, None, true)];
        assert!(renames_collide(&found, &swap));
        let shift = [itf("net1", 5, None, true), itf("eth0", 6, None, true)];
        assert!(renames_collide(&found, &shift));
        let fresh = [itf("net1", 5, None, true), itf("net2", 6, None, true)];
        assert!(!renames_collide(&found, &fresh));
        let same = [itf("eth0", 5, None, true), itf("eth1", 6, None, true)];
        assert!(!renames_collide(&found, &same));
    }

    #[test]
    fn addresses_keep_the_kernels_link_local_ones() {
        let current = [
            cidr("10.88.0.4/16"),
            cidr("fe80::1/64"),
            cidr("fd00::5/64"),
            cidr("10.88.0.5/24"),
        ];
        let wanted = [cidr("10.88.0.5/16"), cidr("fd00::5/64")];
        let c = addresses(&current, &wanted);
        // Another prefix length is another address.
        assert_eq!(c.delete, [cidr("10.88.0.4/16"), cidr("10.88.0.5/24")]);
        assert_eq!(c.add, [cidr("10.88.0.5/16")]);
        // A link-local one asked for is managed like the others.
        let c = addresses(&[cidr("fe80::1/64")], &[cidr("fe80::1/64")]);
        assert!(c.add.is_empty() && c.delete.is_empty());
        let c = addresses(&[], &[cidr("fe80::1/64")]);
        assert_eq!(c.add, [cidr("fe80::1/64")]);
    }

    #[test]
    fn routes_leave_the_kernels_and_other_devices_and_add_link_routes_first() {
        let default = route("0.0.0.0/0", Some("10.88.0.1"), "eth0");
        let link_route = route("10.89.0.0/16", None, "eth0");
        let subnet = observed(route("10.88.0.0/16", None, "eth0"), RTPROT_KERNEL);
        let stale = observed(route("10.90.0.0/16", Some("10.88.0.1"), "eth0"), 4);
        let other_dev = observed(route("10.91.0.0/16", None, "eth9"), 4);
        let other_table = ObservedRoute {
            table: 100,
            ..observed(route("10.92.0.0/16", None, "eth0"), 4)
        };
        let multicast = ObservedRoute {
            unicast: false,
            ..observed(route("ff00::/8", None, "eth0"), 4)
        };
        let seen = [
            subnet.clone(),
            stale.clone(),
            other_dev,
            other_table,
            multicast,
        ];
        let c = routes(
            &seen,
            &[default.clone(), link_route.clone()],
            &["eth0", "lo"],
        );
        assert_eq!(c.delete, std::slice::from_ref(&stale.route));
        assert_eq!(c.add, [link_route.clone(), default.clone()]);
        // A wanted route the kernel already made is left as it is.
        let c = routes(&seen, std::slice::from_ref(&subnet.route), &["eth0"]);
        assert!(c.add.is_empty());
        // Everything in place: nothing to do.
        let done = [
            subnet,
            observed(default.clone(), 4),
            observed(link_route.clone(), 4),
        ];
        let c = routes(&done, &[default.clone(), link_route], &["eth0"]);
        assert!(c.add.is_empty() && c.delete.is_empty(), "{c:?}");
        // A changed gateway is a delete and an add.
        let moved = route("0.0.0.0/0", Some("10.88.0.2"), "eth0");
        let c = routes(&done, std::slice::from_ref(&moved), &["eth0"]);
        assert_eq!(c.add, [moved]);
        assert_eq!(c.delete.len(), 2);
        assert!(c.delete.contains(&default));
    }

    #[test]
    fn neighbors_manage_only_permanent_entries_on_managed_devices() {
        let n = |ip: &str, mac: u8, dev: &str| Neighbor {
            ip: ip.parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, mac]),
            device: dev.into(),
        };
        let o = |neighbor: Neighbor, permanent| ObservedNeighbor {
            neighbor,
            permanent,
        };
        let seen = [
            o(n("10.88.0.1", 1, "eth0"), true),
            o(n("10.88.0.2", 2, "eth0"), true),
            o(n("10.88.0.3", 3, "eth0"), false),
            o(n("10.88.0.4", 4, "eth9"), true),
        ];
        let wanted = [n("10.88.0.1", 1, "eth0"), n("10.88.0.3", 3, "eth0")];
        let c = neighbors(&seen, &wanted, &["eth0"]);
        assert_eq!(c.delete, [n("10.88.0.2", 2, "eth0")]);
        // The learned entry becomes a permanent one.
        assert_eq!(c.add, [n("10.88.0.3", 3, "eth0")]);
        // Another MAC for a permanent entry: replaced.
        let c = neighbors(&seen, &[n("10.88.0.1", 9, "eth0")], &["eth0"]);
        assert_eq!(c.delete.len(), 2);
        assert_eq!(c.add, [n("10.88.0.1", 9, "eth0")]);
    }
}
