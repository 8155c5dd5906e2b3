//! Tiny 64-bit CPL3 payloads, assembled by hand: the pieces the tests'
//! guest "drivers" have in common. The VMM maps the first virtio-mmio window
//! at `MMIO_BASE` and COM1 at port 0x3f8; `rbx` holds the window's address
//! and `rcx` the address of the guest memory being worked on.

use nutshell_vmm::devices::virtio::mmio::{reg, status};

use nutshell_vmm::devices::virtio::test_utils::NEGOTIATED;

/// The guest address of the first virtio-mmio window.
pub const MMIO_BASE: u32 = 0xd000_0000;

/// ModRM of `[rcx + disp32]`.
const AT_RCX: u8 = 0x81;
/// ModRM of `[rbx + disp32]`.
const AT_RBX: u8 = 0x83;

/// The register writes of a driver that brings a device up: ACKNOWLEDGE,
/// DRIVER, the (DriverFeaturesSel, DriverFeatures) pairs of `features`,
/// FEATURES_OK, queue `i` with `size` entries on rings at `bases[i]` (the
/// layout of `test_utils::Ring::at`), DRIVER_OK, then a QueueNotify for each of
/// `notify`.
pub fn bring_up_regs(
    features: &[(u32, u32)],
    size: u16,
    bases: &[u32],
    notify: &[u32],
) -> Vec<(u64, u32)> {
    let mut regs = vec![
        (reg::STATUS, status::ACKNOWLEDGE),
        (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER),
    ];
    for &(sel, f) in features {
        regs.extend([(reg::DRIVER_FEATURES_SEL, sel), (reg::DRIVER_FEATURES, f)]);
    }
    regs.push((reg::STATUS, NEGOTIATED));
    for (q, &base) in bases.iter().enumerate() {
        regs.extend([
            (reg::QUEUE_SEL, q as u32),
            (reg::QUEUE_NUM, u32::from(size)),
            (reg::QUEUE_DESC_LOW, base),
            (reg::QUEUE_DRIVER_LOW, base + 0x1000),
            (reg::QUEUE_DEVICE_LOW, base + 0x2000),
            (reg::QUEUE_READY, 1),
        ]);
    }
    regs.push((reg::STATUS, NEGOTIATED | status::DRIVER_OK));
    regs.extend(notify.iter().map(|&q| (reg::QUEUE_NOTIFY, q)));
    regs
}

/// Machine code, appended to piece by piece.
#[derive(Default)]
pub struct Asm(Vec<u8>);

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn code(self) -> Vec<u8> {
        self.0
    }

    /// Bytes with no helper of their own (say what they are where used).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// Spins a while (2^28 rounds), so that what follows runs under the
    /// seccomp filter the VMM installs just after starting the vCPUs.
    pub fn delay(&mut self) -> &mut Self {
        self.mov_ecx(0x1000_0000);
        self.raw(&[0xff, 0xc9, 0x75, 0xfc]) // dec ecx; jnz back
    }

    /// `mov ecx, imm32`.
    pub fn mov_ecx(&mut self, imm: u32) -> &mut Self {
        self.raw(&[0xb9]).raw(&imm.to_le_bytes())
    }

    /// `mov ebx, imm32`.
    pub fn mov_ebx(&mut self, imm: u32) -> &mut Self {
        self.raw(&[0xbb]).raw(&imm.to_le_bytes())
    }

    fn store(&mut self, modrm: u8, disp: u32, imm: u32) -> &mut Self {
        self.raw(&[0xc7, modrm])
            .raw(&disp.to_le_bytes())
            .raw(&imm.to_le_bytes())
    }

    /// `mov dword [rcx + disp32], imm32`.
    pub fn store_at_rcx(&mut self, disp: u32, imm: u32) -> &mut Self {
        self.store(AT_RCX, disp, imm)
    }

    /// `mov ebx, MMIO_BASE`, then each (register, value) written in turn.
    pub fn mmio_writes(&mut self, regs: &[(u64, u32)]) -> &mut Self {
        self.mov_ebx(MMIO_BASE);
        for &(off, v) in regs {
            self.mmio_write(off, v);
        }
        self
    }

    /// One register of the window at `rbx`.
    pub fn mmio_write(&mut self, off: u64, v: u32) -> &mut Self {
        self.store(AT_RBX, off as u32, v)
    }

    /// Spins until the 16-bit word at `addr` (a used ring's index) is not 0;
    /// leaves `rcx = addr`.
    pub fn spin_while_zero_u16(&mut self, addr: u32) -> &mut Self {
        self.mov_ecx(addr);
        self.raw(&[0x0f, 0xb7, 0x01, 0x85, 0xc0, 0x74, 0xf9]) // movzx eax, word [rcx]; test; jz back
    }

    /// Spins until InterruptStatus of the window at `rbx` shows the
    /// used-ring bit.
    pub fn spin_until_vring_interrupt(&mut self) -> &mut Self {
        self.raw(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xa8, 0x01, 0x74, 0xf6]) // mov eax, [rbx + 0x60]; test al, 1; jz back
    }

    /// `mov dx, 0x3f8`: the `print_*` below write to COM1.
    pub fn serial(&mut self) -> &mut Self {
        self.raw(&[0x66, 0xba, 0xf8, 0x03])
    }

    /// Prints `byte`.
    pub fn print_byte(&mut self, byte: u8) -> &mut Self {
        self.raw(&[0xb0, byte, 0xee]) // mov al, byte; out dx, al
    }

    /// Prints the low byte of InterruptStatus of the window at `rbx`.
    pub fn print_interrupt_status(&mut self) -> &mut Self {
        self.raw(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xee]) // mov eax, [rbx + 0x60]; out
    }

    /// Prints the low byte of the dword at `rcx + disp`.
    pub fn print_u32_at_rcx(&mut self, disp: u32) -> &mut Self {
        match disp {
            0 => self.raw(&[0x8b, 0x01]),
            1..=0x7f => self.raw(&[0x8b, 0x41, disp as u8]),
            _ => self.raw(&[0x8b, 0x81]).raw(&disp.to_le_bytes()),
        };
        self.raw(&[0xee])
    }

    /// Prints the byte at `rcx + disp`.
    pub fn print_u8_at_rcx(&mut self, disp: u8) -> &mut Self {
        match disp {
            0 => self.raw(&[0x8a, 0x01]),
            _ => self.raw(&[0x8a, 0x41, disp]),
        };
        self.raw(&[0xee])
    }

    /// With `rbx = MMIO_BASE`: prints the window's magic (4 bytes) and its
    /// device id as a digit, writes ACKNOWLEDGE | DRIVER to Status and prints
    /// what Status reads back as a digit, then a newline.
    pub fn print_virtio_identity(&mut self) -> &mut Self {
        self.mov_ebx(MMIO_BASE).serial();
        self.raw(&[0x8b, 0x03]); // mov eax, [rbx] (MagicValue)
        for _ in 0..4 {
            self.raw(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
        }
        self.raw(&[0x8b, 0x43, 0x08, 0x04, 0x30, 0xee]); // DeviceID + '0', out
        self.raw(&[0xc7, 0x43, 0x70, 0x03, 0, 0, 0]); // Status = ACK|DRIVER
        self.raw(&[0x8b, 0x43, 0x70, 0x04, 0x30, 0xee]); // Status + '0', out
        self.print_byte(b'\n')
    }

    /// Resets the VM through the i8042 (the VMM ends with GuestReset), then
    /// spins should the write come back.
    pub fn reset_vm(&mut self) -> &mut Self {
        self.raw(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
        self.spin_forever()
    }

    /// `jmp $`.
    pub fn spin_forever(&mut self) -> &mut Self {
        self.raw(&[0xeb, 0xfe])
    }
}
