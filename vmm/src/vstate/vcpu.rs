//! vCPU threads: set up, then `KVM_RUN` in a loop, dispatching port and MMIO
//! exits to the buses and turning every other exit into an [`ExitReason`].
//!
//! A vCPU in `KVM_RUN` is stopped by a signal (`SIGRTMIN`), which makes the
//! ioctl return `EINTR`; the thread then looks at the shared flags. A kick
//! that lands just before the thread enters `KVM_RUN` is lost, so whoever
//! kicks repeats it until the thread acknowledges (see [`VcpuHandle`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::serial::SharedTail;
use crate::exit::{ExitReason, ExitSignal};

/// Failure to create or set up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Failed to create vCPU {0}.")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// CPUID setup failed.
    #[error("Failed to set up CPUID.")]
    Cpuid(#[from] cpuid::CpuidError),
    /// MSR setup failed.
    #[error("Failed to set up MSRs.")]
    Msr(#[from] msr::MsrError),
    /// Register setup failed.
    #[error("Failed to set up registers.")]
    Regs(#[from] regs::RegsError),
    /// The kick signal handler could not be installed.
    #[error("Failed to install the vCPU kick signal handler.")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("Failed to spawn the vCPU thread.")]
    Spawn(#[source] std::io::Error),
}

/// Pause state shared by the VMM and every vCPU.
#[derive(Default)]
pub struct PauseGate {
    paused: Mutex<bool>,
    cond: Condvar,
    parked: std::sync::atomic::AtomicUsize,
}

impl PauseGate {
    /// Asks the vCPUs to park (they do once kicked out of `KVM_RUN`).
    pub fn pause(&self) {
        if let Ok(mut p) = self.paused.lock() {
            *p = true;
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        if let Ok(mut p) = self.paused.lock() {
            *p = false;
        }
        self.cond.notify_all();
    }

    /// Whether a pause was asked for.
    pub fn is_paused(&self) -> bool {
        self.paused.lock().map(|p| *p).unwrap_or(false)
    }

    /// vCPUs currently parked.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn wait_while_paused(&self, exit: &ExitSignal) {
        self.parked.fetch_add(1, Ordering::SeqCst);
        self.park(exit);
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    fn park(&self, exit: &ExitSignal) {
        let Ok(mut p) = self.paused.lock() else {
            return;
        };
        while *p && !exit.is_stopping() {
            match self.cond.wait_timeout(p, Duration::from_millis(50)) {
                Ok((g, _)) => p = g,
                Err(_) => return,
            }
        }
    }
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Where the VM's end is reported.
    pub exit: Arc<ExitSignal>,
    /// The console tail, quoted in error reports.
    pub console: SharedTail,
    /// Pause/resume.
    pub pause: Arc<PauseGate>,
}

/// One vCPU, before its thread starts.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    shared: VcpuShared,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only there so that the signal interrupts KVM_RUN instead of killing us.
}

/// Installs the kick signal's handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| e.errno()))
        .map_err(|e| VcpuError::Signal(vmm_sys_util::errno::Error::new(e)))
}

impl Vcpu {
    /// Creates vCPU `id` on `vm`.
    pub fn new(vm: &VmFd, id: u8, shared: VcpuShared) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        Ok(Vcpu { fd, id, shared })
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// CPUID, MSRs, FPU and (with an irqchip) the LAPIC's LINT pins.
    pub fn configure(&self, base_cpuid: &CpuId, count: u8, irqchip: bool) -> Result<(), VcpuError> {
        cpuid::setup(&self.fd, base_cpuid, self.id, count)?;
        msr::setup(&self.fd)?;
        regs::setup_fpu(&self.fd)?;
        if irqchip {
            regs::setup_lint(&self.fd)?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let running = Arc::new(AtomicBool::new(true));
        let r = running.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                self.run_loop();
                r.store(false, Ordering::SeqCst);
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread, running })
    }

    /// Runs until the VM ends, and records why.
    pub fn run_loop(mut self) {
        crate::timing::first_run();
        loop {
            if self.shared.exit.is_stopping() {
                return;
            }
            if self.shared.pause.is_paused() {
                self.shared.pause.wait_while_paused(&self.shared.exit);
                continue;
            }
            if let Some(reason) = self.run_once() {
                self.shared.exit.request(reason);
                return;
            }
        }
    }

    /// One `KVM_RUN`. Returns the reason the VM must end, if it must.
    pub fn run_once(&mut self) -> Option<ExitReason> {
        let shared = &self.shared;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.io_bus.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.io_bus.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio_bus.write(addr, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio_bus.read(addr, data) {
                    data.fill(0);
                }
                None
            }
            // Without an in-kernel irqchip `hlt` reaches us: the payload is done.
            Ok(VcpuExit::Hlt) => Some(ExitReason::GuestPoweroff),
            // Triple fault.
            Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestReset),
            Ok(VcpuExit::SystemEvent(t, _)) => match t {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::GuestPoweroff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::GuestReset),
                other => Some(ExitReason::HostError(format!(
                    "unexpected KVM system event {other}"
                ))),
            },
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Some(ExitReason::KvmFailEntry { reason }),
            Ok(other) => Some(ExitReason::HostError(format!(
                "vCPU {} exited with unhandled reason {other:?}",
                self.id
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(ExitReason::HostError(format!(
                "KVM_RUN failed on vCPU {}: {e}",
                self.id
            ))),
        }
    }

    fn internal_error(&mut self) -> ExitReason {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, which makes
        // `internal` the active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let console_tail = self
            .shared
            .console
            .lock()
            .map(|t| t.lines())
            .unwrap_or_default();
        ExitReason::KvmInternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            console_tail,
        }
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    running: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Interrupts `KVM_RUN` once.
    pub fn kick(&self) {
        if self.running.load(Ordering::SeqCst) {
            // The thread may have just exited; ESRCH is fine.
            let _ = self.thread.kill(SIGRTMIN());
        }
    }

    /// Kicks until the thread ends (the caller has set the stop flag), for
    /// at most `timeout`. Returns whether it ended.
    pub fn stop(self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.running.load(Ordering::SeqCst) {
            if std::time::Instant::now() > deadline {
                // Leave the thread; the process is about to exit anyway.
                return false;
            }
            self.kick();
            std::thread::sleep(Duration::from_micros(100));
        }
        self.thread.join().is_ok()
    }

    /// Whether the thread still runs.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}
