//! `nutshell-vmm`: nutshell's own KVM microVM monitor, on the rust-vmm crates.
//!
//! It owns the VM ([`vstate`]), the x86_64 boot state ([`arch`], [`boot`]),
//! the devices ([`devices`]: serial console, i8042 reset, virtio-mmio), the
//! event loop and vCPU threads ([`vmm`]), and the probe that tells whether
//! this host's KVM can run a Linux guest at all ([`probe`]).

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod exit;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hardening;
pub mod probe;
pub mod timing;
pub mod vmm;
pub mod vstate;

pub use config::{BootSource, SerialOutput, TapSource, VirtioDeviceConfig, VmConfig};
pub use exit::ExitReason;
pub use vmm::{run_vm, Vmm, VmmControl, VmmError};
