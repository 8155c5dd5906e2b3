//! Where things live in guest-physical memory.
//!
//! Everything below 1 MiB follows the conventions Linux and PVH loaders
//! expect: the zero page/start info, command line and boot page tables sit in
//! low memory that the memory map marks usable, the kernel loads at 1 MiB or
//! above. Devices live in a 32-bit MMIO hole below 4 GiB.

/// Boot GDT (4 entries).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT (used only by probes and payloads; Linux installs its own).
pub const BOOT_IDT_ADDR: u64 = 0x1000;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Linux 64-bit boot protocol zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot identity map; the PDPT and PD follow, one page each.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories of the boot identity map (2 MiB pages,
/// first 4 GiB): 0xb000..0xf000.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line we pass (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole: the kernel loads at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (768 MiB below 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && VIRTIO_MMIO_BASE < MMIO_GAP_END);
/// First GSI handed to virtio devices (0-4 are the PIT, keyboard, cascade and
/// the serial ports' legacy lines).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Legacy IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// KVM needs three pages for the TSS just below 4 GiB on Intel hosts.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM's identity-map page, right before the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The guest RAM ranges for `size` bytes of memory: one range below the
/// MMIO hole and, when memory does not fit there, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
