//! The guest's virtio-mmio driver, register by register, as Linux's does
//! it: for integration tests that drive a real device model (with a real
//! backend behind it) without a VM.

use nutshell_vmm::devices::bus::BusDevice;
use nutshell_vmm::devices::virtio::mmio::{reg, status, MmioTransport};
use nutshell_vmm::devices::virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ring::Ring;

/// The status once features are negotiated.
pub const NEGOTIATED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

/// A device behind its transport, and the guest memory they share.
pub struct Driver {
    pub t: MmioTransport,
    pub mem: GuestMemoryMmap,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(device, mem.clone(), irq).unwrap();
        Driver { t, mem }
    }

    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// What the device offers, both halves.
    pub fn features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        lo | u64::from(self.read(reg::DEVICE_FEATURES)) << 32
    }

    /// ACKNOWLEDGE and DRIVER, takes every feature the device offers, sets
    /// FEATURES_OK; returns the features.
    pub fn negotiate_all(&mut self) -> u64 {
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let f = self.features();
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
        self.write(reg::STATUS, NEGOTIATED);
        f
    }

    /// Whether the device kept FEATURES_OK (it accepted the features).
    pub fn features_ok(&mut self) -> bool {
        self.read(reg::STATUS) & status::FEATURES_OK != 0
    }

    /// Points queue `index` at `ring` and makes it ready; returns the
    /// queue's QueueNumMax.
    pub fn setup_queue(&mut self, index: u32, ring: &Ring) -> u32 {
        self.write(reg::QUEUE_SEL, index);
        let max = self.read(reg::QUEUE_NUM_MAX);
        self.write(reg::QUEUE_NUM, u32::from(ring.size));
        for (lo, hi, v) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, ring.desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, ring.avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, ring.used),
        ] {
            self.write(lo, v as u32);
            self.write(hi, (v >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
        max
    }

    /// Sets DRIVER_OK after negotiation: the device activates.
    pub fn driver_ok(&mut self) {
        self.write(reg::STATUS, NEGOTIATED | status::DRIVER_OK);
    }

    /// QueueNotify, then what the event loop does with the queue's
    /// ioeventfd.
    pub fn notify(&mut self, q: u32) {
        self.write(reg::QUEUE_NOTIFY, q);
        self.t.handle_queue_event(q as usize);
    }
}
