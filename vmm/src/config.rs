//! What a VM is made of, as the binary's command line or a library caller
//! describes it.

use std::path::PathBuf;
use std::time::Duration;

use crate::arch::regs::EntryMode;
use crate::boot::linux::LinuxBoot;
use crate::devices::virtio::net::MacAddr;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere (the tail is still kept for error reports).
    Discard,
}

/// What the boot vCPU runs.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux kernel.
    Linux(LinuxBoot),
    /// Raw machine code (probes and tests).
    Payload {
        /// The code.
        code: Vec<u8>,
        /// Guest-physical load address (also the entry point).
        load_addr: u64,
        /// CPU mode at entry.
        mode: EntryMode,
    },
}

/// A virtio device to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceConfig {
    /// An entropy source (virtio-rng) fed from the host's getrandom.
    Rng,
    /// A raw disk image (virtio-blk).
    Block {
        /// The image file.
        path: PathBuf,
        /// Refuse guest writes.
        read_only: bool,
    },
    /// Hybrid vsock (Firecracker's protocol over a host Unix socket).
    Vsock {
        /// The guest's context id (3 or more).
        guest_cid: u32,
        /// Host socket path; guest-initiated connections go to `<uds>_<port>`.
        uds_path: PathBuf,
    },
    /// A shared directory (virtio-fs) served by a `virtiofsd` listening on
    /// `socket` (vhost-user).
    Fs {
        /// The mount tag the guest mounts (1 to 36 bytes).
        tag: String,
        /// The backend's vhost-user socket.
        socket: PathBuf,
    },
    /// A network card (virtio-net) on a host tap interface.
    Net {
        /// The tap.
        tap: TapSource,
        /// The guest's MAC address; random and locally administered if unset.
        mac: Option<MacAddr>,
    },
}

/// Where a virtio-net device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// A tap by name: attached to if it exists (the runtime or CNI made
    /// it), created otherwise (needs `CAP_NET_ADMIN`).
    Name(String),
    /// An open tap fd the parent passed down (`fd=<n>` on the command
    /// line): the runtime opens it in the pod's network namespace.
    Fd(i32),
}

impl std::fmt::Display for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Fd(fd) => write!(f, "fd={fd}"),
        }
    }
}

/// A whole VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPU count (1..=32).
    pub vcpus: u8,
    /// What to run.
    pub boot: BootSource,
    /// The serial console's destination.
    pub serial: SerialOutput,
    /// Feed the VMM's stdin to the serial console (interactive debugging).
    pub serial_stdin: bool,
    /// Create the in-kernel PIC/IOAPIC/PIT (Linux needs it; payloads that
    /// stop with `hlt` must not have it, or `hlt` never reaches us).
    pub irqchip: bool,
    /// virtio-mmio devices, in the order they get windows and IRQs.
    pub devices: Vec<VirtioDeviceConfig>,
    /// End the VM after this long (reported as [`crate::ExitReason::Timeout`]).
    pub timeout: Option<Duration>,
    /// Control API socket path.
    pub api_socket: Option<PathBuf>,
    /// Once the VM runs, drop all capabilities and confine every thread to
    /// a seccomp allowlist. Process-wide and irreversible: for the binary,
    /// not for library callers that go on doing other things.
    pub harden: bool,
}

impl VmConfig {
    /// A config with defaults for everything but the boot source.
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            memory_mib: 128,
            vcpus: 1,
            boot,
            serial: SerialOutput::Stdout,
            serial_stdin: false,
            irqchip: true,
            devices: Vec::new(),
            timeout: None,
            api_socket: None,
            harden: false,
        }
    }
}
