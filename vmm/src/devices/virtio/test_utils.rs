//! Test helpers: a recording device and a driver that programs a transport
//! through its registers, the way the guest's virtio-mmio driver does.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{reg, status, MmioTransport};
use super::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

/// What the test device saw.
#[derive(Default)]
pub struct Probe {
    pub activations: usize,
    pub resets: usize,
    pub queue_sizes: Vec<u16>,
    pub notifications: usize,
    /// Raw fds of the queue kicks the last activation handed over.
    pub kick_fds: Vec<i32>,
}

/// A device that records what the transport does to it.
pub struct TestDevice {
    sizes: Vec<u16>,
    pub probe: Arc<Mutex<Probe>>,
    /// Pretend a vhost-user backend serves the queues.
    pub external: bool,
}

impl TestDevice {
    pub fn new(sizes: &[u16]) -> Self {
        TestDevice {
            sizes: sizes.to_vec(),
            probe: Arc::default(),
            external: false,
        }
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        99
    }
    fn features(&self) -> u64 {
        0b101
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[1, 2, 3, 4], offset, data);
    }
    fn activate(&mut self, act: Activation, _irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        let mut p = self.probe.lock().unwrap();
        p.activations += 1;
        p.queue_sizes = act.queues.iter().map(|q| q.size()).collect();
        p.kick_fds = act.queue_kicks.iter().map(|k| k.as_raw_fd()).collect();
        Ok(())
    }
    fn process_queue(&mut self, _index: usize) {
        self.probe.lock().unwrap().notifications += 1;
    }
    fn queues_served_externally(&self) -> bool {
        self.external
    }
    fn reset(&mut self) {
        self.probe.lock().unwrap().resets += 1;
    }
}

/// Guest memory for device tests: 16 MiB at 0.
pub fn test_memory() -> GuestMemoryMmap {
    crate::vstate::memory::create_guest_memory(16 << 20).unwrap()
}

/// A transport plus register helpers.
pub struct Driver {
    pub transport: MmioTransport,
    probe: Option<Arc<Mutex<Probe>>>,
}

impl Driver {
    pub fn new(dev: Box<TestDevice>) -> Self {
        let probe = dev.probe.clone();
        let mut d = Self::with_device(dev, test_memory());
        d.probe = Some(probe);
        d
    }

    pub fn with_device(dev: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        Driver {
            transport: MmioTransport::new(dev, mem, irq).unwrap(),
            probe: None,
        }
    }

    pub fn probe(&self) -> &Arc<Mutex<Probe>> {
        self.probe.as_ref().unwrap()
    }

    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    pub fn ack_features(&mut self, f: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    pub fn negotiate(&mut self, f: u64) {
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.ack_features(f);
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(self.read(reg::STATUS) & status::FEATURES_OK, 0);
    }

    /// Sets DRIVER_OK on top of the current status.
    pub fn driver_ok(&mut self) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
    }

    /// Points queue `i` at rings laid out from `base` (desc, avail, used).
    pub fn setup_queue(&mut self, i: u32, base: u64) {
        self.write(reg::QUEUE_SEL, i);
        let size = u64::from(self.read(reg::QUEUE_NUM_MAX));
        self.write(reg::QUEUE_NUM, size as u32);
        self.set_rings(base, base + 16 * size, base + 0x1000 + 16 * size);
        self.write(reg::QUEUE_READY, 1);
    }

    pub fn set_rings(&mut self, desc: u64, avail: u64, used: u64) {
        for (lo, hi, v) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(lo, v as u32);
            self.write(hi, (v >> 32) as u32);
        }
    }

    /// Brings the device up with queues built by `virtio-queue`'s mock
    /// driver at `bases` (one per queue).
    pub fn activate_with_mock_queues(&mut self, features: u64, queues: &[(u64, u64, u64)]) {
        self.negotiate(features);
        for (i, &(d, a, u)) in queues.iter().enumerate() {
            self.write(reg::QUEUE_SEL, i as u32);
            let size = self.read(reg::QUEUE_NUM_MAX);
            self.write(reg::QUEUE_NUM, size);
            self.set_rings(d, a, u);
            self.write(reg::QUEUE_READY, 1);
        }
        self.driver_ok();
        assert!(self.transport.is_activated(), "device did not activate");
    }

    /// Notifies queue `q` through `QueueNotify` and runs what the event loop
    /// runs when that queue's eventfd fires.
    pub fn notify(&mut self, q: usize) {
        self.write(reg::QUEUE_NOTIFY, q as u32);
        self.transport.handle_queue_event(q);
    }
}

/// A split virtqueue laid out by hand in guest memory, driven like a guest
/// driver would: chains go in, used entries come out. (The mock driver in
/// `virtio-queue` resets the ring indexes whenever it is created, so tests
/// that submit over time use this.)
pub struct RawQueue {
    pub mem: GuestMemoryMmap,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    seen_used: u16,
}

impl RawQueue {
    /// Rings for a queue of `size` at `base` (needs 0x3000 bytes).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        RawQueue {
            mem: mem.clone(),
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x2000,
            size,
            next_desc: 0,
            seen_used: 0,
        }
    }

    pub fn rings(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Adds a chain of (addr, len, device-writable); returns its head.
    pub fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        use vm_memory::{Address, Bytes, GuestAddress};
        let head = self.next_desc % self.size;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let flags: u16 = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            let next = if last { 0 } else { (idx + 1) % self.size };
            let at = GuestAddress(self.desc + 16 * u64::from(idx));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        self.next_desc = self.next_desc.wrapping_add(descs.len() as u16);
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Used entries (id, len) added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        use vm_memory::{Bytes, GuestAddress};
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != idx {
            let slot = u64::from(self.seen_used % self.size);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(self.used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(self.used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}
