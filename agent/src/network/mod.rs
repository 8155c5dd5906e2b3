//! UpdateNetwork: the pod's network, mirrored from the host's pod network
//! namespace onto the guest's own (root) network namespace, the one the
//! agent and every container without a network namespace of its own use.
//!
//! The request is declarative: [`validate`] turns it into a [`Plan`] (or
//! refuses it whole, before anything changes), [`diff`] compares the plan
//! with what the kernel reports, and [`netlink`] reads and applies. Applying
//! the same plan twice changes nothing the second time.

pub mod diff;
pub mod netlink;
pub mod validate;

use std::fmt;
use std::net::IpAddr;

use nutshell_protocol::agent::UpdateNetworkRequest;

use crate::error::Result;

/// One call at a time: two interleaved diffs would undo each other.
static APPLYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Validates `req` and makes the guest's network match it.
pub async fn update(req: &UpdateNetworkRequest) -> Result<()> {
    let plan = validate::plan(req)?;
    let _one = APPLYING.lock().await;
    netlink::apply(&plan).await
}

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    pub fn parse(text: &str) -> Option<Self> {
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next()?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *octet = u8::from_str_radix(part, 16).ok()?;
        }
        parts.next().is_none().then_some(Self(octets))
    }

    /// The address of a link attribute, when it is an Ethernet one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An address with a prefix length: an interface address, or (with the
/// host bits zero) a route's destination.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// The longest prefix of `addr`'s family.
    pub fn max_len(addr: &IpAddr) -> u8 {
        match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// The address with its host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len));
                (u32::from(a) & mask.unwrap_or(0)).to_be_bytes().into()
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len));
                (u128::from(a) & mask.unwrap_or(0)).to_be_bytes().into()
            }
        }
    }

    /// An IPv6 link-local address (fe80::/10), which the kernel gives every
    /// IPv6 link on its own.
    pub fn is_link_local_v6(&self) -> bool {
        matches!(self.addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// What the guest's network should be: a checked request.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Plan {
    pub interfaces: Vec<Interface>,
    /// Normalised to what the kernel reports for them (see
    /// [`validate`]), so that an existing route compares equal.
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// One NIC, found by its MAC.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Interface {
    /// The MAC the link is to carry.
    pub mac: Mac,
    /// The MAC it carries now, when that is another: the link is found by
    /// this one and given `mac`.
    pub link_mac: Option<Mac>,
    pub name: String,
    /// `None`: leave the MTU as it is.
    pub mtu: Option<u32>,
    pub addresses: Vec<Cidr>,
    pub up: bool,
}

impl Interface {
    /// The MAC its guest link carries now.
    pub fn found_by(&self) -> Mac {
        self.link_mac.unwrap_or(self.mac)
    }
}

/// A unicast route of the main table on one device.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Route {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    /// RT_SCOPE_*.
    pub scope: u8,
    pub metric: u32,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        write!(f, " dev {}", self.device)?;
        if let Some(src) = self.source {
            write!(f, " src {src}")?;
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

/// A permanent ARP/NDP entry.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Neighbor {
    pub ip: IpAddr,
    pub mac: Mac,
    pub device: String,
}

impl fmt::Display for Neighbor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {} dev {}", self.ip, self.mac, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_either_case_and_print_in_lower_case() {
        let mac = Mac::parse("02:42:AC:11:00:0f").unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0xac, 0x11, 0x00, 0x0f]);
        assert_eq!(mac.to_string(), "02:42:ac:11:00:0f");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:0f:01",
            "2:42:ac:11:00:0f",
            "02-42-ac-11-00-0f",
            "02:42:ac:11:00:0g",
            "02:42:ac:11:00:+f",
        ] {
            assert_eq!(Mac::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Mac::from_bytes(&[1, 2, 3]), None);
        assert_eq!(
            Mac::from_bytes(&[1, 2, 3, 4, 5, 6]),
            Some(Mac([1, 2, 3, 4, 5, 6]))
        );
    }

    #[test]
    fn a_network_clears_the_host_bits() {
        let c = |a: &str, l| Cidr {
            addr: a.parse().unwrap(),
            prefix_len: l,
        };
        assert_eq!(c("10.88.3.5", 16).network().to_string(), "10.88.0.0");
        assert_eq!(c("10.88.3.5", 0).network().to_string(), "0.0.0.0");
        assert_eq!(c("10.88.3.5", 32).network().to_string(), "10.88.3.5");
        assert_eq!(c("2001:db8::1", 64).network().to_string(), "2001:db8::");
        assert_eq!(c("2001:db8::1", 0).network().to_string(), "::");
        assert_eq!(c("2001:db8::1", 128).network().to_string(), "2001:db8::1");
        assert!(c("fe80::1", 64).is_link_local_v6());
        assert!(c("febf::1", 64).is_link_local_v6());
        assert!(!c("fec0::1", 64).is_link_local_v6());
        assert!(!c("10.0.0.1", 8).is_link_local_v6());
    }
}
