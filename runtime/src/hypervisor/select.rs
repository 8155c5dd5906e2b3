//! Choosing the backend: the own VMM wherever this host's KVM can run a
//! Linux guest, QEMU otherwise (on KVM when it can, else TCG).

use std::path::Path;
use std::time::Duration;

use nutshell_vmm::probe::{probe_kvm, ProbeVerdict};

use super::nutshell_vmm::VmmHypervisor;
use super::qemu::QemuHypervisor;
use super::{Hypervisor, HypervisorError};
use crate::config::Backend;

/// What the KVM probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    /// KVM runs a CPL0 guest with an IDT: Linux boots.
    CanRunLinux,
    /// No usable KVM, or one that cannot run Linux; the text says why.
    Cannot(String),
}

/// Asks nutshell-vmm's CPL0 `int3` probe whether this host's KVM can run a
/// Linux guest (milliseconds), once per process.
pub async fn kvm_verdict() -> KvmVerdict {
    static VERDICT: tokio::sync::OnceCell<KvmVerdict> = tokio::sync::OnceCell::const_new();
    VERDICT
        .get_or_init(|| async {
            if !Path::new("/dev/kvm").exists() {
                return KvmVerdict::Cannot("/dev/kvm does not exist".into());
            }
            match tokio::task::spawn_blocking(|| probe_kvm(Duration::from_secs(2))).await {
                Ok(Ok(ProbeVerdict::CanRunLinux)) => KvmVerdict::CanRunLinux,
                Ok(Ok(ProbeVerdict::CannotRunLinux { detail })) => KvmVerdict::Cannot(detail),
                Ok(Err(e)) => KvmVerdict::Cannot(format!("the KVM probe failed: {e}")),
                Err(e) => KvmVerdict::Cannot(format!("the KVM probe task failed: {e}")),
            }
        })
        .await
        .clone()
}

/// The backend `backend` names on this host.
///
/// - `Vmm`: nutshell-vmm, refused with the probe's reason where KVM cannot
///   run Linux (it has no emulator to fall back on);
/// - `Qemu`: QEMU, on KVM where the probe allows, TCG otherwise;
/// - `Auto`: nutshell-vmm where KVM can run Linux and it is installed, QEMU
///   otherwise.
pub async fn select_backend(backend: Backend) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let verdict = kvm_verdict().await;
    let kvm_runs_linux = verdict == KvmVerdict::CanRunLinux;
    match backend {
        Backend::Vmm => match verdict {
            KvmVerdict::CanRunLinux => Ok(Box::new(VmmHypervisor::discover()?)),
            KvmVerdict::Cannot(detail) => Err(HypervisorError::KvmCannotRunLinux { detail }),
        },
        Backend::Qemu => Ok(Box::new(
            QemuHypervisor::discover()?.with_kvm_usable(kvm_runs_linux),
        )),
        Backend::Auto => {
            if kvm_runs_linux {
                match VmmHypervisor::discover() {
                    Ok(vmm) => return Ok(Box::new(vmm)),
                    Err(e) => {
                        tracing::info!(error = %e, "KVM runs Linux here but nutshell-vmm is not installed: QEMU on KVM")
                    }
                }
            } else if let KvmVerdict::Cannot(detail) = &verdict {
                tracing::info!(%detail, "KVM cannot run a Linux guest here: QEMU on TCG");
            }
            Ok(Box::new(
                QemuHypervisor::discover()?.with_kvm_usable(kvm_runs_linux),
            ))
        }
    }
}
