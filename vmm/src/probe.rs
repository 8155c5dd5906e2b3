//! Can this KVM run a Linux guest?
//!
//! Some KVMs (the nested, pagetable-based `kvm_pvm` on the project's own
//! machines) run user-mode guest code natively but emulate kernel mode, and
//! their emulator cannot do `int3`, `iret` or `xrstor`: Linux dies early in
//! boot. The probe runs a tiny 64-bit CPL0 guest with a GDT, an IDT and page
//! tables that announces itself on a port, executes `int3`, and whose `#BP`
//! handler writes a second port. Reaching the handler means exceptions are
//! delivered like on real hardware; an emulation-failure exit means no.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::BOOT_IDT_ADDR;
use crate::arch::regs::{self, EntryMode};
use crate::vstate::memory::create_guest_memory;
use crate::vstate::vcpu::install_kick_handler;
use crate::vstate::vm::Vm;

/// Port the probe guest writes to.
pub const PROBE_PORT: u16 = 0xf4;
const MARK_STARTED: u8 = 0x11;
const MARK_HANDLER: u8 = 0x42;
const CODE_ADDR: u64 = 0x2000;
const HANDLER_ADDR: u64 = 0x3000;
const STACK_TOP: u64 = 0x8000;

/// The probe's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// The `int3` handler ran: this KVM delivers exceptions at CPL0.
    CanRunLinux,
    /// KVM stopped the guest before the handler ran.
    CannotRunLinux {
        /// What happened, in words.
        detail: String,
    },
}

/// Failure to run the probe at all (no /dev/kvm, no permission, ...).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The VM could not be created.
    #[error("Failed to create the probe VM.")]
    Vm(#[from] crate::vstate::vm::VmError),
    /// Memory for the probe could not be created.
    #[error("Failed to create the probe's memory.")]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// The vCPU could not be created or set up.
    #[error("Failed to set up the probe vCPU: {0}")]
    Vcpu(String),
    /// The guest did not finish in time.
    #[error("The probe guest did not finish within {0:?}.")]
    Timeout(Duration),
    /// The guest did something the probe does not expect.
    #[error("The probe guest ended unexpectedly: {0}")]
    Unexpected(String),
}

/// The probe guest's code: mark, `int3`, `hlt`; the handler marks and halts.
fn code() -> (Vec<u8>, Vec<u8>) {
    let main = vec![
        0xb0,
        MARK_STARTED, // mov al, 0x11
        0xe6,
        PROBE_PORT as u8, // out 0xf4, al
        0xcc,             // int3
        0xf4,             // hlt
    ];
    let handler = vec![
        0xb0,
        MARK_HANDLER, // mov al, 0x42
        0xe6,
        PROBE_PORT as u8, // out 0xf4, al
        0xf4,             // hlt
    ];
    (main, handler)
}

/// A 64-bit interrupt gate to `handler` through the kernel code segment.
fn idt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x8u16.to_le_bytes());
    g[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Runs the probe, giving up after `timeout`.
pub fn probe_kvm(timeout: Duration) -> Result<ProbeVerdict, ProbeError> {
    let vm = Vm::new()?;
    let mem = create_guest_memory(2 << 20)?;
    vm.register_memory(&mem)?;
    let vcpu = vm
        .fd()
        .create_vcpu(0)
        .map_err(|e| ProbeError::Vcpu(e.to_string()))?;

    let (main, handler) = code();
    let w = |data: &[u8], at: u64| {
        mem.write_slice(data, GuestAddress(at))
            .map_err(|e| ProbeError::Vcpu(format!("writing the probe guest: {e}")))
    };
    w(&main, CODE_ADDR)?;
    w(&handler, HANDLER_ADDR)?;
    // Vectors 0-31, each to the handler: whatever fault happens is noticed.
    for v in 0..32u64 {
        w(&idt_gate(HANDLER_ADDR), BOOT_IDT_ADDR + v * 16)?;
    }
    regs::setup_sregs(&mem, &vcpu, EntryMode::Long64Kernel, 32 * 16 - 1)
        .map_err(|e| ProbeError::Vcpu(e.to_string()))?;
    regs::setup_regs(&vcpu, EntryMode::Long64Kernel, CODE_ADDR, STACK_TOP, 0)
        .map_err(|e| ProbeError::Vcpu(e.to_string()))?;

    install_kick_handler().map_err(|e| ProbeError::Vcpu(e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let mut vcpu = vcpu;
    let deadline = Instant::now() + timeout;
    let thread = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let mut marks = Vec::new();
            let result = loop {
                if Instant::now() > deadline {
                    break Err(ProbeError::Timeout(timeout));
                }
                match vcpu.run() {
                    Ok(VcpuExit::IoOut(PROBE_PORT, data)) => {
                        marks.push(data.first().copied().unwrap_or(0));
                        if marks.last() == Some(&MARK_HANDLER) {
                            break Ok(ProbeVerdict::CanRunLinux);
                        }
                    }
                    Ok(VcpuExit::InternalError) => {
                        let run = vcpu.get_kvm_run();
                        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR,
                        // so `internal` is the active union member.
                        let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                        let at = if marks.contains(&MARK_STARTED) {
                            "on `int3` at CPL0"
                        } else {
                            "before running any 64-bit kernel-mode code"
                        };
                        break Ok(ProbeVerdict::CannotRunLinux {
                            detail: format!(
                                "KVM_EXIT_INTERNAL_ERROR suberror {sub} ({}) {at}",
                                crate::exit::internal_error_name(sub)
                            ),
                        });
                    }
                    Ok(VcpuExit::Hlt) => {
                        break Err(ProbeError::Unexpected(format!(
                            "the guest halted without reaching the handler (marks {marks:x?})"
                        )))
                    }
                    Ok(other) => {
                        break Err(ProbeError::Unexpected(format!("exit {other:?}")));
                    }
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                    Err(e) => break Err(ProbeError::Unexpected(format!("KVM_RUN failed: {e}"))),
                }
            };
            let _ = tx.send(result);
        })
        .map_err(|e| ProbeError::Vcpu(e.to_string()))?;

    // An emulating KVM may spin on an instruction; kick it out at the deadline.
    let res = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    use vmm_sys_util::signal::Killable;
                    let _ = thread.kill(vmm_sys_util::signal::SIGRTMIN());
                }
                if Instant::now() > deadline + Duration::from_secs(1) {
                    // The thread is stuck in KVM_RUN: give up on it.
                    return Err(ProbeError::Timeout(timeout));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(ProbeError::Unexpected("the probe thread died".into()))
            }
        }
    };
    let _ = thread.join();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_encodes_a_64_bit_handler_address() {
        let g = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(u16::from_le_bytes([g[0], g[1]]), 0xdef0);
        assert_eq!(u16::from_le_bytes([g[6], g[7]]), 0x9abc);
        assert_eq!(u32::from_le_bytes([g[8], g[9], g[10], g[11]]), 0x1234_5678);
        assert_eq!((g[2], g[5]), (0x8, 0x8e));
    }
}
