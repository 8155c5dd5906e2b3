//! The warm pool's taps. A warm VM boots before its pod's network exists,
//! so its NICs' taps wait in an empty network namespace of the pool's own:
//! no path names it, and nothing joins it but the pool's VMs, whose
//! processes run in it ([`crate::hypervisor::VmConfig::netns`]), so it
//! lives as long as any of them. A claim moves the taps the pod needs into
//! the pod's namespace under the names a cold boot's plumbing gives them; a
//! moved tap keeps its VMM's fd, so the guest's NIC is on the pod's side
//! from then on. The others stay, down and unconnected, until their VM
//! ends: deleting a tap under a running VMM leaves its fd in error for
//! good, which QEMU's main loop polls without end.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nutshell_vmm::devices::virtio::net::tap::Tap;
use rtnetlink::LinkUnspec;

use super::netns::{in_netns_fd, new_netns};
use super::plumb::tap_name;
use super::scan::{index_of, links};
use super::{Mac, NetworkError};

/// The pool's own network namespace.
#[derive(Debug)]
pub struct HoldingNetns {
    ns: Arc<OwnedFd>,
}

/// A warm VM's tap, in the holding namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmTap {
    pub name: String,
    /// The MAC of the guest's NIC until the claimer's agent gives it the
    /// pod's.
    pub mac: Mac,
}

/// The tap name and guest MAC of NIC `i` of warm VM `seq`: unique in the
/// holding namespace for the next billion boots, and within `IFNAMSIZ`.
fn warm_tap(seq: u64, i: usize) -> WarmTap {
    let seq = seq % 1_000_000_000;
    let b = seq.to_be_bytes();
    WarmTap {
        name: format!("w{seq}n{i}"),
        // Locally administered, unicast; the pod never sees it.
        mac: Mac([0x02, 0x6e, b[5], b[6], b[7], i as u8]),
    }
}

impl HoldingNetns {
    pub fn new() -> Result<Self, NetworkError> {
        Ok(Self {
            ns: Arc::new(new_netns()?.into()),
        })
    }

    /// The namespace, for the warm VMs' processes to run in.
    pub fn netns(&self) -> Arc<OwnedFd> {
        self.ns.clone()
    }

    fn fd(&self) -> Result<File, NetworkError> {
        self.ns
            .try_clone()
            .map(File::from)
            .map_err(NetworkError::io(
                "duplicate the pool's network namespace fd",
            ))
    }

    /// `count` taps for warm VM `seq`, down and unconnected, with the fd
    /// of each for its VMM.
    pub async fn make_taps(
        &self,
        seq: u64,
        count: usize,
    ) -> Result<Vec<(WarmTap, OwnedFd)>, NetworkError> {
        in_netns_fd(self.fd()?, move |_| async move {
            (0..count)
                .map(|i| {
                    let warm = warm_tap(seq, i);
                    // Opened on the namespace's thread, so made inside it.
                    let tap = Tap::open(&warm.name).map_err(|e| NetworkError::Io {
                        what: format!("make the warm VM's tap {}", warm.name),
                        source: std::io::Error::other(e),
                    })?;
                    Ok((warm, tap.into_fd()))
                })
                .collect()
        })
        .await
    }

    /// Moves the first `count` of `taps` into the network namespace
    /// `target` (see [`super::open_netns`]) as `tap<i>_nutshell`, for
    /// [`super::plumb`] to join with [`super::TapSource::Moved`]. The
    /// others stay here, and those NICs of the VM without a link. Taps
    /// moved before a failure go with their VM, which the caller then
    /// kills.
    pub async fn hand_over(
        &self,
        taps: &[WarmTap],
        count: usize,
        target: Option<File>,
    ) -> Result<(), NetworkError> {
        if count > taps.len() || (count > 0 && target.is_none()) {
            return Err(NetworkError::Io {
                what: format!(
                    "hand over {count} of a warm VM's {} taps{}",
                    taps.len(),
                    if target.is_none() {
                        " without a namespace to move them to"
                    } else {
                        ""
                    }
                ),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let taps = taps.to_vec();
        in_netns_fd(self.fd()?, move |handle| async move {
            let Some(ns) = &target else {
                return Ok(());
            };
            let present = links(&handle).await?;
            for (i, tap) in taps.iter().take(count).enumerate() {
                let index = index_of(
                    &present,
                    &tap.name,
                    format!("find the warm VM's tap {}", tap.name),
                )?;
                let name = tap_name(i);
                let moved = LinkUnspec::new_with_index(index)
                    .setns_by_fd(ns.as_raw_fd())
                    .name(name.clone())
                    .build();
                handle
                    .link()
                    .set(moved)
                    .execute()
                    .await
                    .map_err(NetworkError::netlink(format!(
                        "move the warm VM's tap {} into the pod's namespace as {name}",
                        tap.name
                    )))?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_taps_fit_a_name_and_never_look_like_a_pods() {
        for seq in [0, 7, 999_999_999, u64::MAX] {
            for i in [0, super::super::MAX_INTERFACES - 1] {
                let t = warm_tap(seq, i);
                assert!(t.name.len() <= 15, "{}", t.name);
                assert!(!super::super::plumb::is_our_tap(&t.name));
                assert_eq!(t.mac.0[0] & 0b11, 0b10, "local, unicast");
            }
        }
        assert_ne!(warm_tap(1, 0).mac, warm_tap(1, 1).mac);
        assert_ne!(warm_tap(1, 0).name, warm_tap(2, 0).name);
    }
}
