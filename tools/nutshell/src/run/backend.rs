//! Which VM monitor `nutshell run` uses, and a wrapper that notes when the
//! VM has been launched (for `--timing`, and so that an interrupted start
//! can wait for the VM it started to be gone).

use std::time::Instant;

use anyhow::{Context, Result};
use async_trait::async_trait;
use nutshell_runtime::config::Backend;
use nutshell_runtime::hypervisor::select::select_backend;
use nutshell_runtime::hypervisor::{Hypervisor, HypervisorError, RunningVm, VmConfig, VmEndWatch};
use tokio::sync::watch;

/// The backend for `--backend`, chosen by the runtime's own rule (the same
/// as the shim's): `auto` is nutshell-vmm where KVM can run Linux and it
/// is installed, QEMU otherwise (on TCG where KVM cannot run Linux).
pub async fn select(backend: Backend) -> Result<Box<dyn Hypervisor>> {
    select_backend(backend).await.with_context(|| {
        let hint = match backend {
            Backend::Vmm => "",
            _ => "; tools/setup.sh installs QEMU, vhost-device-vsock and virtiofsd",
        };
        format!("the {backend} backend is not usable here{hint}")
    })
}

/// What the wrapper learnt when the launch returned.
#[derive(Debug, Clone)]
pub struct Launched {
    /// When the backend's launch returned.
    pub at: Instant,
    /// The VM's end, when the launch succeeded.
    pub end: Option<VmEndWatch>,
}

/// A [`Hypervisor`] that reports when its launch returned.
pub struct Watched<'a> {
    inner: &'a dyn Hypervisor,
    launched: watch::Sender<Option<Launched>>,
}

impl<'a> Watched<'a> {
    pub fn new(inner: &'a dyn Hypervisor) -> Self {
        Self {
            inner,
            launched: watch::channel(None).0,
        }
    }

    /// Resolves once the launch has returned (at once when it has).
    pub async fn launched(&self) -> Launched {
        let mut rx = self.launched.subscribe();
        loop {
            if let Some(l) = rx.borrow_and_update().clone() {
                return l;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: unreachable while borrowed.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The launch, if it has returned.
    pub fn try_launched(&self) -> Option<Launched> {
        self.launched.borrow().clone()
    }
}

#[async_trait]
impl Hypervisor for Watched<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn launch(&self, config: &VmConfig) -> Result<RunningVm, HypervisorError> {
        let r = self.inner.launch(config).await;
        self.launched.send_replace(Some(Launched {
            at: Instant::now(),
            end: r.as_ref().ok().map(RunningVm::end_watch),
        }));
        r
    }
}
