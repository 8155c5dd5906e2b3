//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its CPUs, the IOAPIC and the interrupt routing. Linux
//! (CONFIG_X86_MPPARSE) finds the floating pointer by scanning the last KiB
//! of base memory, where we put it.

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

/// Builds the floating pointer and configuration table for `cpus` vCPUs,
/// as they sit at [`MPTABLE_ADDR`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    let table_addr = MPTABLE_ADDR as u32 + 16;
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor: type 0, APIC id, APIC version, flags (EN, BP for cpu 0),
        // signature (family 6), features (FPU | APIC), reserved.
        let mut e = vec![0u8, id, 0x14, 1 | if id == 0 { 2 } else { 0 }];
        e.extend_from_slice(&0x600u32.to_le_bytes());
        e.extend_from_slice(&0x201u32.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0 is ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC: type 2, id, version, enabled, address.
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    // I/O interrupts: ExtINT on pin 0, then ISA IRQ i to pin i.
    let io_int = |kind: u8, irq: u8| [3, kind, 0, 0, 0, irq, ioapic_id, irq];
    entries.extend_from_slice(&io_int(3, 0));
    count += 1;
    for irq in 1..IOAPIC_PINS {
        entries.extend_from_slice(&io_int(0, irq));
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 of the BSP, NMI to LINT1 of all.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"NUTSHELL");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), rev 1.4
    fp[10] = checksum(&fp);

    let mut all = fp;
    all.extend_from_slice(&table);
    if all.len() > MAX_SIZE {
        return Err(MptableError::TooManyCpus(cpus));
    }
    Ok(all)
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

    #[test]
    fn pointer_and_table_check_out() {
        for cpus in [1u8, 2, 4, 32] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let addr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(u64::from(addr), MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            // CPUs, bus, IOAPIC, 24 I/O interrupts, 2 local interrupts.
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            let cpu_entries = table[44..].chunks(20).take(cpus as usize);
            for (i, e) in cpu_entries.enumerate() {
                assert_eq!((e[0], e[1]), (0, i as u8));
                assert_eq!(e[3] & 2 != 0, i == 0, "only cpu 0 is the BSP");
            }
        }
    }

    #[test]
    fn fits_below_640k_and_in_memory() {
        let mem = crate::vstate::memory::create_guest_memory(16 << 20).unwrap();
        write(&mem, 32).unwrap();
        assert!(build(32).unwrap().len() <= MAX_SIZE);
        assert!(MPTABLE_ADDR + MAX_SIZE as u64 <= 0xa0000);
    }
}
