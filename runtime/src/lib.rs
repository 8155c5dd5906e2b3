//! nutshell's host side: the [`hypervisor::Hypervisor`] trait and its
//! backends (QEMU first), supervision of each VM's process tree, and the
//! client of the in-guest agent. The containerd shim is built on these.

pub mod agent;
pub mod config;
pub mod hypervisor;
pub mod sandbox;
pub mod shim;
