//! The KVM VM: memory slots, the in-kernel irqchip and PIT, irqfds and
//! ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Failure to set up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("Failed to open /dev/kvm.")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one (12).
    #[error("KVM API version {0} is not the supported version 12.")]
    ApiVersion(i32),
    /// KVM_CREATE_VM failed.
    #[error("Failed to create the VM.")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A memory region had no host mapping.
    #[error("Guest memory region at {0:#x} has no host mapping.")]
    HostAddress(u64),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("Failed to register guest memory slot {0}.")]
    MemorySlot(u32, #[source] kvm_ioctls::Error),
    /// Setting up the TSS, irqchip or PIT failed.
    #[error("Failed to {0}.")]
    Irqchip(&'static str, #[source] kvm_ioctls::Error),
}

/// A KVM VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm and creates an empty VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Vm { kvm, fd })
    }

    /// The system fd (/dev/kvm).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a memory slot, in order.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::HostAddress(region.start_addr().0))?;
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `host` maps `region.len()` bytes that `mem` keeps
            // mapped for as long as the VM lives (the caller keeps `mem`
            // alongside this VM), and slots do not overlap because the
            // regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::MemorySlot(slot, e))?;
        }
        Ok(())
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPICs and the PIT. Must run before
    /// any vCPU is created.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Irqchip("set the identity map address", e))?;
        self.fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmError::Irqchip("set the TSS address", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| VmError::Irqchip("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| VmError::Irqchip("create the in-kernel PIT", e))
    }
}
