//! nutshell's host side: the [`hypervisor::Hypervisor`] trait and its
//! backends (nutshell-vmm and QEMU), supervision of each VM's process tree,
//! the client of the in-guest agent, the sandbox (a VM with its agent), and
//! getting containers' filesystems into it ([`mounts`]). The front doors
//! (the containerd shim, `nutshell run`) are built on these.

pub mod agent;
pub mod config;
pub mod hypervisor;
pub mod mounts;
pub mod network;
pub mod pool;
pub mod sandbox;
pub mod shim;
