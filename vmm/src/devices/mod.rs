//! Devices: the port-I/O and MMIO buses, the legacy devices (serial console,
//! i8042 reset) and the virtio devices behind the virtio-mmio transport.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
