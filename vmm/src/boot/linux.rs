//! Loading a Linux `vmlinux` with `linux-loader`, and the boot information it
//! reads: the PVH `hvm_start_info` with its memory map (preferred: the guest
//! kernel is built with CONFIG_PVH and PVH enters in 32-bit mode without the
//! 16-bit setup code), or the 64-bit boot protocol's zero page with its e820
//! table when the kernel has no PVH note.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::BootEntry;
use crate::arch::layout::{
    ram_ranges, BOOT_STACK_POINTER, CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START,
    PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use crate::arch::regs::EntryMode;

/// Failure to load the kernel or write its boot information.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// The kernel image could not be opened.
    #[error("Failed to open the kernel image {0}.")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The kernel image is not a loadable ELF vmlinux.
    #[error("Failed to load the kernel image {0} (an uncompressed ELF vmlinux is needed).")]
    LoadKernel(PathBuf, #[source] linux_loader::loader::Error),
    /// The command line is too long or has invalid characters.
    #[error("The kernel command line is invalid.")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("Failed to write the kernel command line.")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initramfs could not be read.
    #[error("Failed to read the initramfs {0}.")]
    ReadInitrd(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit below the MMIO hole.
    #[error("The {0}-byte initramfs does not fit in guest memory.")]
    InitrdTooBig(u64),
    /// Writing the PVH start info failed.
    #[error("Failed to write the PVH start info.")]
    Pvh(#[source] linux_loader::configurator::Error),
    /// Writing the zero page failed.
    #[error("Failed to write the boot parameters (zero page).")]
    ZeroPage(#[source] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// Uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub cmdline: String,
    /// Use the 64-bit boot protocol even when the kernel has a PVH entry.
    pub force_64bit_protocol: bool,
}

/// e820 "usable RAM".
pub const E820_RAM: u32 = 1;

/// The guest memory map for `mem_size` bytes of RAM: low memory up to the
/// EBDA, then everything from 1 MiB (around the MMIO hole).
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    for (base, len) in ram_ranges(mem_size) {
        let start = base.max(HIMEM_START);
        let end = base + len;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), LinuxBootError> {
    let data = std::fs::read(path).map_err(|e| LinuxBootError::ReadInitrd(path.into(), e))?;
    let size = data.len() as u64;
    // Highest page-aligned address below the end of low RAM, above the kernel.
    let low_end = ram_ranges(mem_size)[0].1;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(LinuxBootError::InitrdTooBig(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| LinuxBootError::InitrdTooBig(size))?;
    Ok((addr, size))
}

/// Loads the kernel, the command line and the initramfs, writes the boot
/// information and returns where the vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    boot: &LinuxBoot,
) -> Result<BootEntry, LinuxBootError> {
    let mut f = File::open(&boot.vmlinux)
        .map_err(|e| LinuxBootError::OpenKernel(boot.vmlinux.clone(), e))?;
    let kernel = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| LinuxBootError::LoadKernel(boot.vmlinux.clone(), e))?;

    let cmdline =
        Cmdline::try_from(&boot.cmdline, CMDLINE_MAX_SIZE).map_err(LinuxBootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(LinuxBootError::WriteCmdline)?;
    let cmdline_len = boot.cmdline.len() as u32 + 1;

    let initrd = match &boot.initrd {
        Some(p) => Some(load_initrd(mem, p, mem_size, kernel.kernel_end)?),
        None => None,
    };
    let map = memory_map(mem_size);

    match kernel.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if !boot.force_64bit_protocol => {
            write_pvh(mem, &map, initrd)?;
            Ok(BootEntry {
                mode: EntryMode::Protected32,
                rip: entry.raw_value(),
                rsp: 0,
                boot_arg: PVH_INFO_ADDR,
                idt_limit: 0,
            })
        }
        _ => {
            write_zero_page(mem, &map, initrd, cmdline_len)?;
            Ok(BootEntry {
                mode: EntryMode::Long64Kernel,
                rip: kernel.kernel_load.raw_value(),
                rsp: BOOT_STACK_POINTER,
                boot_arg: ZERO_PAGE_ADDR,
                idt_limit: 0,
            })
        }
    }
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

fn write_pvh(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), LinuxBootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        modules.push(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
    }
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(LinuxBootError::Pvh)
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

fn write_zero_page(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
) -> Result<(), LinuxBootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in map.iter().take(params.e820_table.len()).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.checked_offset(
        GuestAddress(ZERO_PAGE_ADDR),
        std::mem::size_of::<boot_params>(),
    )
    .ok_or(LinuxBootError::ZeroPage(
        vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(ZERO_PAGE_ADDR)),
    ))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(LinuxBootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_matches_configured_memory() {
        let map = memory_map(256 << 20);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, (256 << 20) - HIMEM_START, 1)
            ]
        );
        let big = memory_map(4 << 30);
        assert_eq!(big.len(), 3);
        let total: u64 = big.iter().map(|e| e.1).sum();
        assert_eq!(total, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn a_non_elf_kernel_is_a_clear_error() {
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"not an elf").unwrap();
        let boot = LinuxBoot {
            vmlinux: f.path().into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            force_64bit_protocol: false,
        };
        let e = load(&mem, 64 << 20, &boot).unwrap_err();
        assert!(matches!(e, LinuxBootError::LoadKernel(..)), "{e}");
    }
}
