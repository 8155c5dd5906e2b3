//! Getting code into the guest and deciding where the vCPU starts: a Linux
//! `vmlinux` (PVH or the 64-bit boot protocol), or a raw payload (probes and
//! tests).

pub mod linux;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::regs::EntryMode;

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// CPU mode at entry.
    pub mode: EntryMode,
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// The boot protocol's pointer argument (zero page or PVH start info).
    pub boot_arg: u64,
    /// IDT limit (the boot IDT lives at `BOOT_IDT_ADDR`; Linux ignores it).
    pub idt_limit: u16,
}

/// Failure to place a raw payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The payload does not fit in guest memory at the given address.
    #[error("The {len}-byte payload does not fit in guest memory at {addr:#x}.")]
    DoesNotFit {
        /// Load address.
        addr: u64,
        /// Payload size.
        len: usize,
    },
}

/// Copies a raw payload to `addr` and enters it in `mode` with the stack
/// right below `stack_top`.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    code: &[u8],
    addr: u64,
    mode: EntryMode,
    stack_top: u64,
) -> Result<BootEntry, PayloadError> {
    mem.write_slice(code, GuestAddress(addr))
        .map_err(|_| PayloadError::DoesNotFit {
            addr,
            len: code.len(),
        })?;
    Ok(BootEntry {
        mode,
        rip: addr,
        rsp: stack_top,
        boot_arg: 0,
        idt_limit: 0,
    })
}
