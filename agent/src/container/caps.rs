//! The five capability sets (init side), with the `caps` crate.
//!
//! Order matters: the bounding set is dropped while CAP_SETPCAP is still
//! effective (before the uid switch); after the switch (with KEEPCAPS the
//! permitted set survives) the effective set is set first, then permitted
//! (which must stay a superset of effective), inheritable and ambient.

use std::collections::HashSet;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, Process};

use super::init::{InitError, InitResult};

/// Converts the spec's capability names to the `caps` crate's type.
pub fn convert(set: &Capabilities) -> InitResult<CapsHashSet> {
    set.iter()
        .map(|c| {
            let name = serde_json::to_string(c).unwrap_or_default();
            let name = name.trim_matches('"');
            name.parse::<Capability>().map_err(|_| {
                InitError::unsupported(format!("capability {name} is not known to this agent"))
            })
        })
        .collect()
}

fn set(which: CapSet, caps: &CapsHashSet, name: &str) -> InitResult<()> {
    caps::set(None, which, caps)
        .map_err(|e| InitError::internal(format!("setting the {name} capabilities: {e}")))
}

/// Drops the bounding set; must run while still privileged.
pub fn drop_bounding(process: &Process) -> InitResult<()> {
    let Some(c) = process.capabilities() else {
        return Ok(());
    };
    let Some(bounding) = c.bounding() else {
        return Ok(());
    };
    let keep = convert(bounding)?;
    let current = caps::read(None, CapSet::Bounding)
        .map_err(|e| InitError::internal(format!("reading the bounding set: {e}")))?;
    for cap in current.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(|e| {
            InitError::internal(format!("dropping {cap} from the bounding set: {e}"))
        })?;
    }
    Ok(())
}

/// Applies the effective, permitted, inheritable and ambient sets (after
/// [`drop_bounding`] and the uid switch).
pub fn apply(process: &Process) -> InitResult<()> {
    let Some(c) = process.capabilities() else {
        return Ok(());
    };
    let empty = HashSet::new();
    let conv = |s: &Option<Capabilities>| s.as_ref().map(convert).transpose();
    let effective = conv(c.effective())?.unwrap_or_default();
    let permitted = conv(c.permitted())?.unwrap_or_default();
    let inheritable = conv(c.inheritable())?.unwrap_or_default();
    let ambient = conv(c.ambient())?.unwrap_or_default();
    if !effective.is_subset(&permitted) {
        return Err(InitError::invalid(
            "process.capabilities.effective is not a subset of permitted",
        ));
    }
    set(CapSet::Inheritable, &inheritable, "inheritable")?;
    set(CapSet::Effective, &effective, "effective")?;
    set(CapSet::Permitted, &permitted, "permitted")?;
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| InitError::internal(format!("clearing the ambient capabilities: {e}")))?;
    if ambient != empty {
        // The kernel lets a capability be ambient only while it is both
        // permitted and inheritable. Specs often list ambient ones outside
        // those sets (`runc spec` does, with an empty inheritable set), and
        // runc skips such a capability with a warning rather than failing
        // the container: so do we, without the warning, which would land
        // in the container's stderr.
        for cap in ambient
            .iter()
            .filter(|c| permitted.contains(c) && inheritable.contains(c))
        {
            caps::raise(None, CapSet::Ambient, *cap)
                .map_err(|e| InitError::internal(format!("raising ambient {cap}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_convert() {
        let spec: Capabilities =
            serde_json::from_str(r#"["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]"#).expect("parse");
        let c = convert(&spec).expect("convert");
        assert!(
            c.contains(&Capability::CAP_CHOWN) && c.contains(&Capability::CAP_NET_BIND_SERVICE)
        );
    }
}
