//! Claiming a warm VM from the pool.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::wire::{self, NetworkClaim, Reply, Request, Taken};
use super::{PoolError, VmShape};
use crate::config::PoolSettings;
use crate::hypervisor::cgroups::join_my_cgroups;
use crate::hypervisor::handover::{kill, renice_groups, Handover};
use crate::hypervisor::{RunningVm, VmConfig};
use crate::network::Mac;

/// How long a claim may take, each way. The pool answers in
/// milliseconds; a pool that does not is treated as absent.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// A claimed VM.
#[derive(Debug)]
pub struct Claimed {
    pub vm: RunningVm,
    /// The guest MACs of the NICs whose taps are in the pod's network
    /// namespace now, one per interface the claim asked for, in order.
    pub nic_macs: Vec<Mac>,
}

/// A warm VM to stand in for `vm` (started by `backend`), its state
/// directory moved to `vm.state_dir` and, for a pod with a `network`, its
/// taps to the pod's namespace, when `settings` let pods ask and the pool
/// has one; `None` means: boot cold. The reason is logged at debug level,
/// a claim at info level. Every front door claims through here.
pub async fn claim_or_cold(
    settings: &PoolSettings,
    vm: &VmConfig,
    backend: &str,
    network: Option<NetworkClaim>,
) -> Option<Claimed> {
    let cold = |why: &dyn std::fmt::Display| {
        tracing::debug!(vm = %vm.id, "no warm VM, booting cold: {why}");
    };
    if !settings.enabled {
        cold(&"pool.enabled is false");
        return None;
    }
    let shape = VmShape::of(vm, backend);
    let request = Request {
        shape: shape.clone(),
        target: vm.state_dir.clone(),
        id: vm.id.clone(),
        network,
    };
    match claim(&settings.socket, request).await {
        Ok(warm) => {
            tracing::info!(vm = %vm.id, size = %shape, nics = warm.nic_macs.len(), "claimed a warm VM from the pool");
            Some(warm)
        }
        Err(e) => {
            cold(&crate::shim::pod::chain(&e));
            None
        }
    }
}

/// Asks the pool on `socket` for a VM of `request.shape`, its state
/// directory to be moved to `request.target` (which must not exist), and
/// adopts it as `request.id`. On success this process owns the VM: it
/// runs at this process's niceness, in its cgroups, and ends when this
/// process kills it or it powers off. Every error means no VM was taken
/// and nothing is left behind.
pub async fn claim(socket: &Path, request: Request) -> Result<Claimed, PoolError> {
    let id = request.id.clone();
    let target = request.target.clone();
    let nics = request.network.as_ref().map_or(0, |n| n.nics);
    let socket = socket.to_path_buf();
    let offered = tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&socket).map_err(|source| PoolError::NotRunning {
            socket: socket.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(CLAIM_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CLAIM_TIMEOUT)))
            .map_err(PoolError::io("set the claim's timeouts"))?;
        wire::send(&stream, &request, &[])?;
        match wire::receive::<Reply>(&stream)? {
            (Reply::Offer(offer), pidfds) => Ok((
                stream,
                Handover {
                    record: offer.vm,
                    pidfds,
                },
                offer.nic_macs,
            )),
            (Reply::None(why), _) => Err(PoolError::Empty(why)),
        }
    })
    .await
    .map_err(|e| PoolError::Protocol(e.to_string()))??;
    let (stream, handover, nic_macs) = offered;
    let nic_macs = match nic_macs_of(&nic_macs, nics) {
        Ok(m) => m,
        Err(e) => {
            // Waited for, so that the taps it may have in the pod's
            // namespace are gone before the pod boots cold.
            kill(&handover).await;
            return Err(e);
        }
    };
    // Without our confirmation the pool kills the VM: an adoption that
    // fails needs nothing more than dropping the connection.
    let vm =
        RunningVm::adopt(handover, &id, &target).map_err(|e| PoolError::Protocol(e.to_string()))?;
    let confirmed =
        tokio::task::spawn_blocking(move || wire::send(&stream, &Taken { taken: true }, &[]))
            .await
            .map_err(|e| PoolError::Protocol(e.to_string()))
            .and_then(|r| r);
    if let Err(e) = confirmed {
        vm.kill().await;
        return Err(e);
    }
    let leaders: Vec<u32> = vm.processes().iter().map(|(_, pid)| *pid).collect();
    // SAFETY: getpriority takes plain integers.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    renice_groups(&leaders, nice);
    join_my_cgroups(&leaders);
    Ok(Claimed { vm, nic_macs })
}

/// The offer's NIC MACs, checked as the untrusted input they are: exactly
/// one unicast MAC per NIC asked for.
fn nic_macs_of(offered: &[String], asked: usize) -> Result<Vec<Mac>, PoolError> {
    if offered.len() != asked {
        return Err(PoolError::Protocol(format!(
            "the pool offered {} NICs for {asked} interfaces",
            offered.len()
        )));
    }
    offered
        .iter()
        .map(|m| {
            m.parse::<Mac>()
                .map_err(|e| PoolError::Protocol(format!("the offered NIC MAC {m:?}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_nic_macs_must_match_the_claim() {
        let macs = vec!["02:6e:00:00:01:00".to_string()];
        assert_eq!(
            nic_macs_of(&macs, 1).unwrap(),
            vec![Mac([2, 0x6e, 0, 0, 1, 0])]
        );
        assert!(nic_macs_of(&macs, 0).is_err());
        assert!(nic_macs_of(&[], 1).is_err());
        let e = nic_macs_of(&["01:00:5e:00:00:01".into()], 1).unwrap_err();
        assert!(e.to_string().contains("01:00:5e:00:00:01"), "{e}");
    }
}
