//! Why a VM ended, and the process exit status that tells the runtime so.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (KVM system event, or `hlt` without an irqchip).
    GuestPoweroff,
    /// The guest reset: i8042 reset (`reboot=k`), triple fault or a KVM reset
    /// event. nutshell guests reboot to stop, so this is a normal end.
    GuestReset,
    /// The host asked the VM to stop (API `shutdown`, SIGTERM).
    HostShutdown,
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`): on a KVM that
    /// emulates kernel mode, suberror 1 is an instruction it cannot emulate.
    KvmInternalError {
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// `kvm_run.internal.data[..ndata]` (bounded to 16).
        data: Vec<u64>,
        /// The last lines the guest printed on the serial console.
        console_tail: Vec<String>,
    },
    /// VM entry failed (`KVM_EXIT_FAIL_ENTRY`).
    KvmFailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
    },
    /// The configured time limit ran out.
    Timeout(std::time::Duration),
    /// Something on the host side failed while the VM ran.
    HostError(String),
}

/// Exit status of `nutshell-vmm` for setup errors (bad config, no KVM, ...).
pub const EXIT_SETUP_ERROR: i32 = 1;

impl ExitReason {
    /// The process exit status for this reason (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestPoweroff | ExitReason::GuestReset => 0,
            ExitReason::HostShutdown => 3,
            ExitReason::KvmInternalError { .. } => 4,
            ExitReason::KvmFailEntry { .. } => 5,
            ExitReason::HostError(_) => 6,
            ExitReason::Timeout(_) => 7,
        }
    }

    /// Whether the guest itself chose to stop.
    pub fn is_guest_stop(&self) -> bool {
        matches!(self, ExitReason::GuestPoweroff | ExitReason::GuestReset)
    }
}

/// The instruction bytes KVM reports with an emulation failure, if it did
/// (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES` in `data[0]`, then
/// the length byte and up to 15 bytes in `data[1..3]`).
pub fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != 1 || data.len() < 3 || data[0] & 1 == 0 {
        return None;
    }
    let mut raw = Vec::with_capacity(16);
    raw.extend_from_slice(&data[1].to_le_bytes());
    raw.extend_from_slice(&data[2].to_le_bytes());
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..=len].to_vec())
}

/// `kvm_run.internal.suberror` values (linux/kvm.h).
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event via an invalid vector",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

/// The internal-error sentence without the console lines.
fn write_internal_error(f: &mut impl fmt::Write, suberror: u32, data: &[u64]) -> fmt::Result {
    write!(
        f,
        "KVM internal error (KVM_EXIT_INTERNAL_ERROR), suberror {suberror} ({})",
        internal_error_name(suberror)
    )?;
    if let Some(bytes) = emulation_failure_bytes(suberror, data) {
        let b: Vec<String> = bytes.iter().map(|v| format!("{v:02x}")).collect();
        write!(f, ", at instruction bytes [{}]", b.join(" "))?;
    } else if !data.is_empty() {
        let d: Vec<String> = data.iter().map(|v| format!("{v:#x}")).collect();
        write!(f, ", data [{}]", d.join(", "))?;
    }
    if suberror == 1 {
        write!(
            f,
            "; this KVM cannot run an instruction the guest needs (see `nutshell check`)"
        )?;
    }
    Ok(())
}

impl ExitReason {
    /// The reason on one line, without the guest's console lines: what a
    /// supervisor that keeps only the tail of our stderr must still see.
    pub fn headline(&self) -> String {
        match self {
            ExitReason::KvmInternalError { suberror, data, .. } => {
                let mut s = String::new();
                // Writing to a String cannot fail.
                let _ = write_internal_error(&mut s, *suberror, data);
                s
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestPoweroff => write!(f, "the guest powered off"),
            ExitReason::GuestReset => write!(f, "the guest reset"),
            ExitReason::HostShutdown => write!(f, "the host asked the VM to shut down"),
            ExitReason::KvmInternalError {
                suberror,
                data,
                console_tail,
            } => {
                write_internal_error(f, *suberror, data)?;
                if console_tail.is_empty() {
                    write!(f, "; the guest printed nothing on the console")
                } else {
                    write!(f, "; the guest's last console lines:")?;
                    for l in console_tail {
                        write!(f, "\n  | {l}")?;
                    }
                    Ok(())
                }
            }
            ExitReason::KvmFailEntry { reason } => {
                write!(
                    f,
                    "VM entry failed (KVM_EXIT_FAIL_ENTRY), hardware reason {reason:#x}"
                )
            }
            ExitReason::Timeout(d) => write!(f, "the VM ran into its time limit of {d:?}"),
            ExitReason::HostError(e) => write!(f, "host error: {e}"),
        }
    }
}

/// Where vCPUs, devices and the API report that the VM must end. The first
/// reason wins; the eventfd wakes the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the loop.
    pub fn request(&self, reason: ExitReason) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        // A full counter still wakes the loop; nothing to do on error.
        let _ = self.evt.write(1);
    }

    /// Whether the VM is ending.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// The eventfd that becomes readable once an exit is requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_differ() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_stopping());
        s.request(ExitReason::GuestReset);
        s.request(ExitReason::HostShutdown);
        assert!(s.is_stopping());
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        let codes = [
            ExitReason::GuestReset.exit_code(),
            ExitReason::HostShutdown.exit_code(),
            ExitReason::KvmInternalError {
                suberror: 1,
                data: vec![],
                console_tail: vec![],
            }
            .exit_code(),
            ExitReason::KvmFailEntry { reason: 0 }.exit_code(),
            ExitReason::HostError(String::new()).exit_code(),
            ExitReason::Timeout(std::time::Duration::ZERO).exit_code(),
        ];
        let mut uniq = codes.to_vec();
        uniq.dedup();
        assert_eq!(uniq.len(), codes.len());
        assert!(!codes[1..].contains(&EXIT_SETUP_ERROR));
    }

    #[test]
    fn decodes_the_failing_instruction() {
        // What this project's KVM reported for Linux's int3 self-test.
        let data = [0x1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        let b = emulation_failure_bytes(1, &data).unwrap();
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..3], &[0xcc, 0x90, 0x90]);
        assert!(emulation_failure_bytes(1, &[0]).is_none());
        assert!(emulation_failure_bytes(2, &data).is_none());
    }

    #[test]
    fn internal_error_names_the_exit_and_console() {
        let r = ExitReason::KvmInternalError {
            suberror: 1,
            data: vec![0x10],
            console_tail: vec!["Linux version 6.1".into(), "last".into()],
        };
        let s = r.to_string();
        assert!(s.contains("KVM_EXIT_INTERNAL_ERROR"), "{s}");
        assert!(s.contains("data [0x10]"), "{s}");
        assert!(s.contains("suberror 1 (emulation failure)"), "{s}");
        assert!(s.contains("| last"), "{s}");
    }

    #[test]
    fn the_headline_is_one_line_without_the_console() {
        let r = ExitReason::KvmInternalError {
            suberror: 1,
            data: vec![],
            console_tail: vec!["Linux version 6.1".into(), "last".into()],
        };
        let h = r.headline();
        assert!(h.contains("suberror 1 (emulation failure)"), "{h}");
        assert!(!h.contains('\n') && !h.contains("last"), "{h}");
        assert_eq!(
            ExitReason::GuestReset.headline(),
            ExitReason::GuestReset.to_string()
        );
    }
}
