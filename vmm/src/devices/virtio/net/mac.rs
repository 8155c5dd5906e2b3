//! The guest's MAC address: parsed from the command line, or random.

use std::fmt;
use std::str::FromStr;

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that does not parse or is not unicast.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("The MAC address {0:?} must be six hex pairs like 02:aa:bb:cc:dd:ee, unicast (the first byte even).")]
pub struct MacError(pub String);

impl MacAddr {
    /// A random, locally administered, unicast address (`x2:`, `x6:`, `xa:`
    /// or `xe:` first byte). Random rather than derived from the tap name:
    /// tap names repeat across hosts on one bridge, random addresses
    /// practically never do; a caller that wants a stable address (the one
    /// a CNI result names) passes `mac=`.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most 6 bytes into `b`, a valid,
        // exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 6 {
            // getrandom does not fail for 6 bytes once the pool is ready;
            // if it ever does, the time and pid still make a usable address.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id()) << 32;
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        MacAddr(b)
    }

    /// Whether the locally administered bit is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let err = || MacError(s.to_string());
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() || b[0] & 1 != 0 {
            return Err(err());
        }
        Ok(MacAddr(b))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.0, [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "02-ab-cd-00-01-ff",
            "0g:ab:cd:00:01:ff",
            "01:00:5e:00:00:01",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacError(bad.into())), "{bad}");
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random();
        let b = MacAddr::random();
        for m in [a, b] {
            assert!(m.is_local());
            assert_eq!(m.0[0] & 1, 0);
        }
        assert_ne!(a, b);
    }
}
