//! The guest's side of a virtio-mmio device, by hand: a [`Driver`] that
//! programs the transport register by register as Linux's virtio-mmio
//! driver does, split virtqueues ([`Ring`]) laid out in guest memory and
//! driven over time, and a [`TestDevice`] that records what the transport
//! does to it.
//!
//! The one harness for the unit tests, the integration tests (through the
//! `test-utils` feature) and the fuzz entry points (`fuzzing`). Never in
//! the shipped binary.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{reg, status, MmioError, MmioTransport};
use super::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

/// The status once features are negotiated.
pub const NEGOTIATED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

/// Descriptor flag: the chain goes on at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;

/// Guest memory for device tests: 16 MiB at 0.
pub fn test_memory() -> GuestMemoryMmap {
    crate::vstate::memory::create_guest_memory(16 << 20).unwrap()
}

/// A device behind its transport, and the guest memory they share.
pub struct Driver {
    /// The transport, for what the helpers do not cover.
    pub transport: MmioTransport,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    probe: Option<Arc<Mutex<Probe>>>,
}

impl Driver {
    /// `device` behind a fresh transport; fails only when the host is out of
    /// eventfds.
    pub fn try_new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        Ok(Driver {
            transport: MmioTransport::new(device, mem.clone(), irq)?,
            mem,
            probe: None,
        })
    }

    /// [`Self::try_new`] for tests.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Self {
        Self::try_new(device, mem).expect("the transport could not be created")
    }

    /// A [`TestDevice`] in [`test_memory`]; [`Self::probe`] shows what it saw.
    pub fn with_test_device(dev: TestDevice) -> Self {
        let probe = dev.probe.clone();
        let mut d = Self::new(Box::new(dev), test_memory());
        d.probe = Some(probe);
        d
    }

    /// What the [`TestDevice`] saw (panics for any other device).
    pub fn probe(&self) -> &Arc<Mutex<Probe>> {
        self.probe.as_ref().expect("not a TestDevice")
    }

    /// Reads a 32-bit register.
    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    /// What the device offers, both halves.
    pub fn device_features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        lo | u64::from(self.read(reg::DEVICE_FEATURES)) << 32
    }

    /// Writes both halves of the driver's features.
    pub fn ack_features(&mut self, f: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features `f`, FEATURES_OK; returns whether the
    /// device kept FEATURES_OK (it accepted the features).
    pub fn negotiate(&mut self, f: u64) -> bool {
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.ack_features(f);
        self.write(reg::STATUS, NEGOTIATED);
        self.read(reg::STATUS) & status::FEATURES_OK != 0
    }

    /// Points queue `index` at `ring` (its size too) and makes it ready;
    /// returns the queue's QueueNumMax.
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

    /// Sets DRIVER_OK on top of the current status: the device activates.
    pub fn driver_ok(&mut self) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
    }

    /// Features `f`, queue `i` on `rings[i]`, DRIVER_OK; returns whether
    /// the device accepted the features and activated.
    pub fn bring_up(&mut self, f: u64, rings: &[&Ring]) -> bool {
        if !self.negotiate(f) {
            return false;
        }
        for (i, ring) in rings.iter().enumerate() {
            self.setup_queue(i as u32, ring);
        }
        self.driver_ok();
        self.transport.is_activated()
    }

    /// QueueNotify, then what the event loop does with the queue's
    /// ioeventfd.
    pub fn notify(&mut self, q: usize) {
        self.write(reg::QUEUE_NOTIFY, q as u32);
        self.transport.handle_queue_event(q);
    }
}

/// A split virtqueue of `size` entries laid out by hand in guest memory and
/// driven the way a guest driver does, over time: chains go in, used
/// entries come out. Its memory must be zero when it starts.
pub struct Ring {
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Entries.
    pub size: u16,
    /// The descriptor the next chain starts at.
    pub next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Ring {
    /// Rings at explicit addresses.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Ring {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    /// The descriptor table at `base`, the available ring at
    /// `base + 0x1000`, the used ring at `base + 0x2000` (`size` at most
    /// 256).
    pub fn at(base: u64, size: u16) -> Self {
        Self::new(base, base + 0x1000, base + 0x2000, size)
    }

    /// Adds a chain of (addr, len, device-writable) and makes it available;
    /// returns its head.
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let flags = if last { 0 } else { F_NEXT } | if w { F_WRITE } else { 0 };
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj((idx + 1) % self.size, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // used_event, read by a device that negotiated
        // VIRTIO_RING_F_EVENT_IDX: interrupt me once the device has used
        // past what I have seen.
        mem.write_obj(
            self.seen_used,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
        )
        .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The next used entry (id, len), if the device added one.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.seen_used {
            return None;
        }
        let slot = u64::from(self.seen_used % self.size);
        let id: u32 = mem
            .read_obj(GuestAddress(self.used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = mem
            .read_obj(GuestAddress(self.used + 8 + 8 * slot))
            .unwrap();
        self.seen_used = self.seen_used.wrapping_add(1);
        Some((id, len))
    }

    /// Every used entry (id, len) added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| self.pop_used(mem)).collect()
    }
}

/// What the [`TestDevice`] saw.
#[derive(Default)]
pub struct Probe {
    /// Times it was activated.
    pub activations: usize,
    /// Times it was reset.
    pub resets: usize,
    /// The queue sizes of the last activation.
    pub queue_sizes: Vec<u16>,
    /// Queue notifications delivered to it.
    pub notifications: usize,
    /// Raw fds of the queue kicks the last activation handed over.
    pub kick_fds: Vec<i32>,
}

/// A device that records what the transport does to it.
pub struct TestDevice {
    sizes: Vec<u16>,
    /// What it saw.
    pub probe: Arc<Mutex<Probe>>,
    /// Pretend a vhost-user backend serves the queues.
    pub external: bool,
}

impl TestDevice {
    /// A device with queues of these maximum sizes.
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

/// A non-blocking `SOCK_SEQPACKET` socket pair: one end stands in for a
/// tap (one frame per read and write), the other is the host's.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into `fds`, a valid 2-element array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
