//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its CPUs, the IOAPIC and the interrupt routing. Linux
//! (CONFIG_X86_MPPARSE) finds the floating pointer by scanning the last KiB
//! of base memory, where we put it.
//!
//! The table describes the irqchip KVM emulates (`KVM_CREATE_IRQCHIP`) with
//! its default GSI routing: the PIC's output wired to every local APIC's
//! LINT0 (ExtINT), NMI on LINT1, and ISA IRQ `n` on IOAPIC pin `n` for all
//! 24 pins, the PIT's IRQ 0 included. The IOAPIC pins carry only ordinary
//! (`INT`) sources: an ExtINT source on an IOAPIC pin would tell Linux the
//! PIC is cascaded through the IOAPIC, which KVM's IOAPIC does not do
//! ("ExtINT not setup in hardware but reported by MP table", then a broken
//! timer set-up). [`super::regs::setup_lint`] programs the LINT pins to
//! match.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::EBDA_START;

/// Where the floating pointer goes (the table follows it).
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// The local APIC's MMIO base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
/// Room for the table: the last KiB of base memory.
const MAX_SIZE: usize = 1024;
/// The version KVM's local APICs report (register 0x30, low byte).
const LAPIC_VERSION: u8 = 0x14;
/// The version KVM's IOAPIC reports (register 1, low byte).
const IOAPIC_VERSION: u8 = 0x11;
/// The ISA bus's id: the only bus.
const BUS_ISA: u8 = 0;

/// Entry types (MP spec table 4-3).
const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;
/// Interrupt types (MP spec table 4-8).
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// A destination APIC id meaning every local APIC.
const ALL_APICS: u8 = 0xff;
/// Header sizes: floating pointer and configuration table header.
const FP_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Failure to write the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the space below 640 KiB.
    #[error("An MP table for {0} vCPUs does not fit in the last KiB of base memory.")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("Failed to write the MP table into guest memory.")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The IOAPIC's id: the first one after the CPUs' APIC ids.
fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// The entries, each as its bytes, in the order the spec wants: CPUs,
/// buses, IOAPICs, I/O interrupts, local interrupts.
fn entries(cpus: u8) -> Vec<Vec<u8>> {
    let ioapic = ioapic_id(cpus);
    let mut out = Vec::new();
    for id in 0..cpus {
        // APIC id and version, flags (enabled; BSP for cpu 0), signature
        // (family 6), features (FPU | APIC), reserved.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        let mut e = vec![ENTRY_CPU, id, LAPIC_VERSION, flags];
        e.extend_from_slice(&0x600u32.to_le_bytes());
        e.extend_from_slice(&0x201u32.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        out.push(e);
    }
    out.push(vec![ENTRY_BUS, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    // The IOAPIC: id, version, usable, address.
    let mut e = vec![ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1];
    e.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    out.push(e);
    // ISA IRQ n on pin n, conforming polarity and trigger (flags 0), as
    // KVM's default routing does.
    for irq in 0..IOAPIC_PINS {
        out.push(vec![
            ENTRY_IO_INT,
            INT_VECTORED,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic,
            irq,
        ]);
    }
    // The PIC on LINT0 of the BSP, NMI on LINT1 of every CPU.
    out.push(vec![ENTRY_LOCAL_INT, INT_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    out.push(vec![
        ENTRY_LOCAL_INT,
        INT_NMI,
        0,
        0,
        BUS_ISA,
        0,
        ALL_APICS,
        1,
    ]);
    out
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs,
/// as they sit at [`MPTABLE_ADDR`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    let entries = entries(cpus);
    let body: Vec<u8> = entries.concat();
    if FP_LEN + HEADER_LEN + body.len() > MAX_SIZE {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let mut table = Vec::with_capacity(HEADER_LEN + body.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"NUTSHELL");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let table_addr = MPTABLE_ADDR as u32 + FP_LEN as u32;
    let mut fp = Vec::with_capacity(FP_LEN + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    // Length 1 (16 bytes), revision 1.4, checksum, no default configuration,
    // IMCR absent (virtual wire mode).
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// The configuration table's entries, split the way a guest walks them.
    fn parse(t: &[u8]) -> Vec<&[u8]> {
        let table = &t[FP_LEN..];
        let mut rest = &table[HEADER_LEN..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = if rest[0] == ENTRY_CPU { 20 } else { 8 };
            out.push(&rest[..len]);
            rest = &rest[len..];
        }
        out
    }

    /// The entries of one type in the table for `cpus` vCPUs, in order.
    fn of_type(cpus: u8, ty: u8) -> Vec<Vec<u8>> {
        let t = build(cpus).unwrap();
        parse(&t)
            .into_iter()
            .filter(|e| e[0] == ty)
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn pointer_and_table_check_out() {
        for cpus in [1u8, 2, 4, 32] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..FP_LEN]), 0, "floating pointer checksum");
            assert_eq!((t[8], t[9]), (1, 4), "16-byte pointer, revision 1.4");
            let addr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(u64::from(addr), MPTABLE_ADDR + FP_LEN as u64);
            let table = &t[FP_LEN..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let lapic = u32::from_le_bytes([table[36], table[37], table[38], table[39]]);
            assert_eq!(lapic, APIC_DEFAULT_BASE);
            let count = u16::from_le_bytes([table[34], table[35]]);
            // CPUs, bus, IOAPIC, 24 I/O interrupts, 2 local interrupts.
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            assert_eq!(parse(&t).len(), usize::from(count));
        }
    }

    #[test]
    fn cpus_are_enabled_and_only_cpu0_boots() {
        let cpus = of_type(4, ENTRY_CPU);
        assert_eq!(cpus.len(), 4);
        for (i, e) in cpus.iter().enumerate() {
            assert_eq!((e[1], e[2]), (i as u8, LAPIC_VERSION));
            assert_eq!(e[3] & 1, 1, "cpu {i} enabled");
            assert_eq!(e[3] & 2 != 0, i == 0, "only cpu 0 is the BSP");
        }
    }

    #[test]
    fn isa_bus_and_ioapic_match_kvm() {
        let bus = of_type(2, ENTRY_BUS);
        assert_eq!(bus.len(), 1);
        assert_eq!((bus[0][1], &bus[0][2..8]), (BUS_ISA, &b"ISA   "[..]));
        let io = of_type(2, ENTRY_IOAPIC);
        assert_eq!(io.len(), 1);
        assert_eq!((io[0][1], io[0][2], io[0][3]), (2, 0x11, 1));
        let addr = u32::from_le_bytes([io[0][4], io[0][5], io[0][6], io[0][7]]);
        assert_eq!(addr, 0xfec0_0000);
    }

    #[test]
    fn isa_irq_n_is_ioapic_pin_n_and_no_extint_on_the_ioapic() {
        let ints = of_type(2, ENTRY_IO_INT);
        assert_eq!(ints.len(), usize::from(IOAPIC_PINS));
        for (pin, e) in ints.iter().enumerate() {
            // type INT, conforming flags, ISA bus, IRQ n -> IOAPIC 2 pin n.
            assert_eq!(
                e[1..],
                [INT_VECTORED, 0, 0, BUS_ISA, pin as u8, 2, pin as u8]
            );
        }
    }

    #[test]
    fn pic_on_lint0_and_nmi_on_lint1() {
        let local = of_type(2, ENTRY_LOCAL_INT);
        assert_eq!(local.len(), 2);
        assert_eq!(local[0][1..], [INT_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
        assert_eq!(local[1][1..], [INT_NMI, 0, 0, BUS_ISA, 0, ALL_APICS, 1]);
    }

    #[test]
    fn fits_below_640k_and_in_memory() {
        let mem = crate::vstate::memory::create_guest_memory(16 << 20).unwrap();
        write(&mem, 32).unwrap();
        let mut back = vec![0u8; build(32).unwrap().len()];
        mem.read_slice(&mut back, GuestAddress(MPTABLE_ADDR))
            .unwrap();
        assert_eq!(back, build(32).unwrap());
        assert!(build(32).unwrap().len() <= MAX_SIZE);
        assert!(MPTABLE_ADDR + MAX_SIZE as u64 <= 0xa0000);
        assert!(matches!(build(64), Err(MptableError::TooManyCpus(64))));
    }
}
