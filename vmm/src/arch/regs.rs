//! Initial vCPU state: descriptor tables, the boot identity map, segment and
//! control registers for the three ways we enter a guest (64-bit long mode at
//! CPL0 or CPL3, and 32-bit flat protected mode for PVH), the FPU and the
//! local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Failure to set up a vCPU's initial state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing a boot structure into guest memory failed.
    #[error("Failed to write the boot {0} into guest memory.")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A KVM register ioctl failed.
    #[error("Failed to {0} on the vCPU.")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, kernel privilege (the Linux 64-bit boot protocol).
    Long64Kernel,
    /// 64-bit long mode, user privilege with IOPL 3: code here runs natively
    /// even on a KVM that emulates CPL0, and may still do port I/O.
    Long64User,
    /// 32-bit flat protected mode without paging (the PVH entry).
    Protected32,
}

// GDT slots. The TSS is there only because VM entry requires a usable TR.
const GDT_NULL: usize = 0;
const GDT_CODE: usize = 1;
const GDT_DATA: usize = 2;
const GDT_TSS: usize = 3;
const GDT_USER_CODE: usize = 4;
const GDT_USER_DATA: usize = 5;

/// A segment descriptor from its flags, base and limit (Intel SDM 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The KVM view of the descriptor at GDT slot `index`.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let dpl = ((entry >> 45) & 3) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index as u16 * 8) | u16::from(dpl),
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

fn gdt_for(mode: EntryMode) -> [u64; 6] {
    let code = match mode {
        EntryMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
        _ => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
        gdt_entry(0xa0fb, 0, 0xfffff),
        gdt_entry(0xc0f3, 0, 0xfffff),
    ]
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + (i as u64) * 8))
            .map_err(|e| RegsError::GuestMemory("GDT", e))?;
    }
    Ok(())
}

/// Writes a 4-level identity map of the first 4 GiB (2 MiB pages), so that
/// both RAM and the MMIO hole are reachable. With `user`, every level allows
/// CPL3 access.
pub fn write_identity_map(mem: &GuestMemoryMmap, user: bool) -> Result<(), RegsError> {
    let u = if user { 0x4 } else { 0 };
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| RegsError::GuestMemory("page tables", e))
    };
    w(PDPT_ADDR | 0x3 | u, PML4_ADDR)?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        w(pd | 0x3 | u, PDPT_ADDR + gib * 8)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            w(((gib * 512 + i) << 21) | 0x83 | u, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Writes the boot GDT (and, for long mode, the identity map) and sets the
/// segment and control registers for `mode`. The IDT register points at
/// [`BOOT_IDT_ADDR`] with `idt_limit`; Linux replaces it early.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    mode: EntryMode,
    idt_limit: u16,
) -> Result<(), RegsError> {
    let gdt = gdt_for(mode);
    write_gdt(mem, &gdt)?;
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("read sregs", e))?;

    let (code, data) = match mode {
        EntryMode::Long64User => (GDT_USER_CODE, GDT_USER_DATA),
        _ => (GDT_CODE, GDT_DATA),
    };
    let code_seg = segment_from_gdt(gdt[code], code);
    let data_seg = segment_from_gdt(gdt[data], data);
    let tss_seg = segment_from_gdt(gdt[GDT_TSS], GDT_TSS);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = idt_limit;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;
    let _ = GDT_NULL;

    match mode {
        EntryMode::Protected32 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.cr3 = 0;
        }
        EntryMode::Long64Kernel | EntryMode::Long64User => {
            write_identity_map(mem, mode == EntryMode::Long64User)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("write sregs", e))
}

/// Sets the general-purpose registers: entry point, stack, and the boot
/// protocol's pointer argument (`rsi` for the zero page, `rbx` for PVH).
pub fn setup_regs(
    vcpu: &VcpuFd,
    mode: EntryMode,
    rip: u64,
    rsp: u64,
    boot_arg: u64,
) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        // Bit 1 is reserved and always set; IOPL 3 lets CPL3 payloads do port I/O.
        rflags: if mode == EntryMode::Long64User {
            0x3002
        } else {
            0x2
        },
        ..Default::default()
    };
    match mode {
        EntryMode::Protected32 => regs.rbx = boot_arg,
        _ => regs.rsi = boot_arg,
    }
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("write registers", e))
}

/// The x87 and SSE control words Linux expects at entry.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("write FPU state", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware would:
/// Linux's early interrupt routing through the PIC depends on it.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("read the LAPIC", e))?;
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state)
        .map_err(|e| RegsError::Kvm("write the LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_descriptor_round_trips() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(e, GDT_CODE);
        assert_eq!(
            (s.l, s.db, s.dpl, s.present, s.s, s.type_),
            (1, 0, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 0x8);
    }

    #[test]
    fn user_descriptors_carry_rpl3() {
        let s = segment_from_gdt(gdt_entry(0xa0fb, 0, 0xfffff), GDT_USER_CODE);
        assert_eq!((s.dpl, s.selector), (3, 0x23));
        let d = segment_from_gdt(gdt_entry(0xc0f3, 0, 0xfffff), GDT_USER_DATA);
        assert_eq!((d.dpl, d.selector, d.db), (3, 0x2b, 1));
    }

    #[test]
    fn base_is_split_across_the_descriptor() {
        let e = gdt_entry(0x008b, 0x1234_5678, 0x67);
        let s = segment_from_gdt(e, GDT_TSS);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.type_, 0xb);
    }
}
