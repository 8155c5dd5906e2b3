//! Claiming a warm VM from the pool.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::wire::{self, Reply, Request, Taken};
use super::{PoolError, VmShape};
use crate::config::PoolSettings;
use crate::hypervisor::handover::{renice_groups, Handover};
use crate::hypervisor::{RunningVm, VmConfig};

/// How long a claim may take, each way. The pool answers in
/// milliseconds; a pool that does not is treated as absent.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// A warm VM to stand in for `vm` (started by `backend`), its state
/// directory moved to `vm.state_dir`, when `settings` let pods ask and the
/// pool has one; `None` means: boot cold. The reason is logged at debug
/// level, a claim at info level. Every front door claims through here.
pub async fn claim_or_cold(
    settings: &PoolSettings,
    vm: &VmConfig,
    backend: &str,
) -> Option<RunningVm> {
    let cold = |why: &dyn std::fmt::Display| {
        tracing::debug!(vm = %vm.id, "no warm VM, booting cold: {why}");
    };
    if !settings.enabled {
        cold(&"pool.enabled is false");
        return None;
    }
    let Some(shape) = VmShape::of(vm, backend) else {
        cold(&"the VM has NICs, and warm VMs have none");
        return None;
    };
    match claim(&settings.socket, &shape, &vm.id, &vm.state_dir).await {
        Ok(warm) => {
            tracing::info!(vm = %vm.id, size = %shape, "claimed a warm VM from the pool");
            Some(warm)
        }
        Err(e) => {
            cold(&crate::shim::pod::chain(&e));
            None
        }
    }
}

/// Asks the pool on `socket` for a VM of `shape`, its state directory to
/// be moved to `target` (which must not exist), and adopts it as `id`.
/// On success this process owns the VM: it runs at this process's
/// niceness and ends when this process kills it or it powers off.
/// Every error means no VM was taken and nothing is left behind.
pub async fn claim(
    socket: &Path,
    shape: &VmShape,
    id: &str,
    target: &Path,
) -> Result<RunningVm, PoolError> {
    let request = Request {
        shape: shape.clone(),
        target: target.to_path_buf(),
        id: id.to_string(),
    };
    let socket = socket.to_path_buf();
    let (stream, handover) = tokio::task::spawn_blocking(move || {
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
            (Reply::Offer(record), pidfds) => Ok((stream, Handover { record, pidfds })),
            (Reply::None(why), _) => Err(PoolError::Empty(why)),
        }
    })
    .await
    .map_err(|e| PoolError::Protocol(e.to_string()))??;
    // Without our confirmation the pool kills the VM: an adoption that
    // fails needs nothing more than dropping the connection.
    let vm =
        RunningVm::adopt(handover, id, target).map_err(|e| PoolError::Protocol(e.to_string()))?;
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
    Ok(vm)
}
