//! The virtio-mmio transport, virtio 1.x ("version 2") register layout. One
//! 4 KiB window per device, described to Linux on the command line as
//! `virtio_mmio.device=4K@<base>:<irq>`.
//!
//! The transport checks everything the driver writes before it reaches the
//! device: feature bits outside the offer fail `FEATURES_OK`, queue sizes
//! must be powers of two within the maximum, and a queue whose rings do not
//! lie in guest memory keeps the device from activating.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// "virt", little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The virtio 1.x register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("NUTS" would not fit the spirit; 0 is not valid, use 'NS').
pub const VENDOR_ID: u32 = 0x4e53;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A virtio device behind its MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<Arc<EventFd>>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

/// Failure to create a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("Failed to create a queue eventfd.")]
    EventFd(#[source] std::io::Error),
    /// A queue size the device declared is invalid.
    #[error("The device declared an invalid queue size.")]
    Queue(#[source] virtio_queue::Error),
}

impl MmioTransport {
    /// Wraps `device`; `irqfd` raises its GSI.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(MmioError::Queue)?);
            queue_evts.push(Arc::new(
                EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
            ));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The queue notification eventfds, one per queue (registered as
    /// ioeventfds on `QueueNotify` with the queue index as datamatch).
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device runs.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Queue `i`'s eventfd fired: drain it and let the device work.
    pub fn handle_queue_event(&mut self, i: usize) {
        if self.device.queues_served_externally() {
            return;
        }
        if let Some(e) = self.queue_evts.get(i) {
            let _ = e.read();
            if self.activated {
                self.device.process_queue(i);
            }
        }
    }

    /// Passes a ready host fd to the device (what the event loop does).
    pub fn handle_host_event(&mut self, fd: std::os::fd::RawFd, events: EventSet) {
        self.device.host_event(fd, events);
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues may only be set up between FEATURES_OK and DRIVER_OK.
        if self.status & status::FEATURES_OK == 0 || self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.interrupt.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new_bits = v & !self.status;
        // The driver may only add bits, in the order the spec gives.
        if v & self.status != self.status {
            self.status |= status::FAILED;
            return;
        }
        if new_bits & status::FEATURES_OK != 0 {
            let ok = self.status & status::DRIVER != 0
                && self.acked_features & !self.offered_features() == 0
                && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Not setting FEATURES_OK is how the device refuses.
                self.status |= v & !status::FEATURES_OK;
                return;
            }
        }
        if new_bits & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.status |= status::FAILED;
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !valid || self.queues.iter().all(|q| !q.ready()) {
            self.status |= status::NEEDS_RESET;
            self.interrupt.trigger(super::INT_CONFIG);
            return;
        }
        // The device gets its own copies; ours keep answering register reads.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.status |= status::NEEDS_RESET;
            return;
        };
        let act = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            queue_kicks: self.queue_evts.clone(),
        };
        match self.device.activate(act, self.interrupt.clone()) {
            Ok(()) => self.activated = true,
            Err(e) => {
                let cause = std::error::Error::source(&e).map(|s| s.to_string());
                tracing::warn!(error = %e, cause, "virtio device failed to activate");
                self.status |= status::NEEDS_RESET;
                self.interrupt.trigger(super::INT_CONFIG);
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Queue rejects sizes that are not powers of two or too big.
                    q.set_size(v as u16);
                    if u32::from(q.size()) != v {
                        q.set_size(q.max_size());
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Reached only where KVM did not take the write as an ioeventfd.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such.
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let (Ok(b), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            self.handle_queue_event(i);
            return;
        }
        let _ = ops;
        self.device.host_event(fd, events.event_set());
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A vhost-user backend reads these itself.
        let evts = if self.device.queues_served_externally() {
            &[][..]
        } else {
            &self.queue_evts[..]
        };
        for e in evts {
            if let Err(err) = ops.add(Events::new(e.as_ref(), EventSet::IN)) {
                tracing::error!(?err, "failed to watch a virtio queue eventfd");
            }
        }
        self.device.init_host_events(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{Driver, Ring, TestDevice};

    #[test]
    fn identifies_as_virtio_1_mmio() {
        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert_eq!(d.read(reg::MAGIC), MMIO_MAGIC);
        assert_eq!(d.read(reg::VERSION), 2);
        assert_eq!(d.read(reg::DEVICE_ID), 99);
        // Non-32-bit register accesses read as zero.
        let mut b = [0xffu8; 2];
        d.transport.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn feature_negotiation_accepts_a_subset_and_refuses_more() {
        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert_eq!(d.device_features(), 0b101 | VIRTIO_F_VERSION_1);
        // Ask for bit 1, which is not offered.
        assert!(!d.negotiate(0b010 | VIRTIO_F_VERSION_1));

        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert!(d.negotiate(0b100 | VIRTIO_F_VERSION_1));
        assert_eq!(d.transport.acked_features(), 0b100 | VIRTIO_F_VERSION_1);
        // Without VERSION_1 (a legacy driver) negotiation fails.
        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert!(!d.negotiate(0b100));
    }

    #[test]
    fn queue_setup_activates_and_notifies() {
        let mut d = Driver::with_test_device(TestDevice::new(&[16, 8]));
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.write(reg::QUEUE_SEL, 1);
        assert_eq!(d.read(reg::QUEUE_NUM_MAX), 8);
        d.write(reg::QUEUE_SEL, 0);
        assert_eq!(d.read(reg::QUEUE_NUM_MAX), 16);
        // A size that is not a power of two falls back to the maximum.
        d.setup_queue(0, &Ring::at(0x1_0000, 12));
        d.driver_ok();
        assert!(d.transport.is_activated());
        assert_eq!(d.probe().lock().unwrap().activations, 1);
        assert_eq!(d.probe().lock().unwrap().queue_sizes, vec![16, 8]);
        // Queue registers are frozen once the device runs.
        d.write(reg::QUEUE_READY, 0);
        assert_eq!(d.read(reg::QUEUE_READY), 1);
        // A notify written through MMIO reaches the queue's eventfd.
        d.write(reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.transport.queue_evts()[0].read().unwrap(), 1);
        d.write(reg::QUEUE_NOTIFY, 7);
    }

    #[test]
    fn queues_served_elsewhere_keep_their_kicks() {
        let mut dev = TestDevice::new(&[16, 16]);
        dev.external = true;
        let mut d = Driver::with_test_device(dev);
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_queue(0, &Ring::at(0x1_0000, 16));
        d.setup_queue(1, &Ring::at(0x2_0000, 16));
        d.driver_ok();
        let fds: Vec<i32> = d
            .transport
            .queue_evts()
            .iter()
            .map(|e| e.as_raw_fd())
            .collect();
        assert_eq!(
            d.probe().lock().unwrap().kick_fds,
            fds,
            "the device got the kicks"
        );
        // What the event loop would do on a notification: nothing is read,
        // the backend's eventfd keeps its count.
        d.notify(1);
        assert_eq!(d.probe().lock().unwrap().notifications, 0);
        assert_eq!(d.transport.queue_evts()[1].read().unwrap(), 1);
    }

    #[test]
    fn rings_outside_memory_do_not_activate() {
        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_queue(0, &Ring::at(0xffff_0000_0000, 16));
        d.driver_ok();
        assert!(!d.transport.is_activated());
        assert_ne!(d.read(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn status_reset_clears_everything() {
        let mut d = Driver::with_test_device(TestDevice::new(&[16]));
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_queue(0, &Ring::at(0x1_0000, 16));
        d.driver_ok();
        d.transport.interrupt().trigger(1);
        assert_eq!(d.read(reg::INTERRUPT_STATUS), 1);
        d.write(reg::STATUS, 0);
        assert_eq!(d.read(reg::STATUS), 0);
        assert_eq!(d.read(reg::INTERRUPT_STATUS), 0);
        assert_eq!(d.read(reg::QUEUE_READY), 0);
        assert!(!d.transport.is_activated());
        assert_eq!(d.probe().lock().unwrap().resets, 1);
        // And it can be brought up again.
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_queue(0, &Ring::at(0x1_0000, 16));
        d.driver_ok();
        assert_eq!(d.probe().lock().unwrap().activations, 2);
    }

    #[test]
    fn interrupt_ack_clears_only_acked_bits() {
        let d = Driver::with_test_device(TestDevice::new(&[16]));
        d.transport.interrupt().trigger(3);
        let mut d = d;
        d.write(reg::INTERRUPT_ACK, 1);
        assert_eq!(d.read(reg::INTERRUPT_STATUS), 2);
        assert!(d.transport.interrupt().irqfd().read().unwrap() >= 1);
    }
}
