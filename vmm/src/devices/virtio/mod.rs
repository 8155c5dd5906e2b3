//! virtio devices behind the virtio-mmio transport ([`mmio`]). Each device
//! lives in its own folder and implements [`VirtioDevice`]; the transport
//! owns the register file, the queues' configuration and the device's
//! activation, and the event loop delivers queue notifications (ioeventfds)
//! and the device's host-side fds to it.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// virtio 1.x (the transport always offers it; legacy is not supported).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block.
pub const TYPE_BLOCK: u32 = 2;
/// Device type: entropy.
pub const TYPE_RNG: u32 = 4;
/// Device type: socket.
pub const TYPE_VSOCK: u32 = 19;
/// Device type: file system (virtio-fs).
pub const TYPE_FS: u32 = 26;

/// `InterruptStatus` bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// A device's interrupt line: the `InterruptStatus` register plus the irqfd
/// that injects the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in `InterruptStatus` and injects the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // EAGAIN means the counter is saturated: the guest is interrupted anyway.
        let _ = self.irqfd.write(1);
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's `InterruptACK`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (tests read it to see interrupts).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Interrupts the driver after a round that added to `queue`'s used ring
/// (`used_any`), unless the driver said it needs no interrupt yet
/// (`VIRTIO_RING_F_EVENT_IDX`). A ring we cannot read gets the interrupt:
/// a spurious one is harmless, a lost one stalls the driver.
pub fn signal_used_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    used_any: bool,
) {
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        irq.trigger(INT_VRING);
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and validated by the transport.
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The queues' notification eventfds (the transport's ioeventfds, one
    /// per queue), for devices whose queues another process serves.
    pub queue_kicks: Vec<Arc<EventFd>>,
}

impl Activation {
    /// Guest memory and the first queue, for a single-queue device; no
    /// queue at all is an error.
    pub fn into_single_queue(self) -> Result<(GuestMemoryMmap, Queue), ActivateError> {
        let got = self.queues.len();
        let queue = self
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::QueueCount { want: 1, got })?;
        Ok((self.mem, queue))
    }
}

/// Failure to activate a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device needs a different number of queues.
    #[error("The device needs {want} queues, the driver set up {got}.")]
    QueueCount {
        /// Queues the device uses.
        want: usize,
        /// Queues provided.
        got: usize,
    },
    /// A host resource the device needs failed.
    #[error("The device's host side failed to start.")]
    Host(#[source] std::io::Error),
    /// The device's backend process refused or failed the setup.
    #[error("The device's backend failed to start the queues.")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Device-specific features offered (the transport adds VERSION_1).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space. Out-of-range reads give zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with its queues.
    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError>;
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// The driver reset the device: drop the queues and all state.
    fn reset(&mut self);
    /// Whether another process (a vhost-user backend) serves the queues:
    /// the transport then leaves the queue eventfds to it and never reads
    /// them, so no notification is lost to our event loop.
    fn queues_served_externally(&self) -> bool {
        false
    }
    /// Host fds to watch from the start (e.g. a listening socket).
    fn init_host_events(&mut self, _ops: &mut EventOps) {}
    /// A host fd the device registered became ready.
    fn host_event(&mut self, _fd: RawFd, _events: EventSet) {}
}

/// Copies the `data.len()` bytes at `offset` of `config` into `data`, zeros
/// where the range runs past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}
