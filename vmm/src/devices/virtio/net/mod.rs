//! virtio-net on a tap interface. Queues: 0 = RX (device to guest), 1 = TX;
//! no control queue, no multiqueue.
//!
//! Features: `MAC` (the config space carries the address) and `STATUS`
//! (link always up), nothing else. No offloads (no CSUM, TSO or UFO, for
//! host or guest), so Linux posts MTU-sized RX buffers (1518 + header) and
//! sends frames of at most MTU + 14 bytes; and no `MRG_RXBUF`, because
//! without offloads one buffer always holds one frame, so spreading a frame
//! over several buffers would be code without a use. The header is still
//! 12 bytes: virtio 1.x always has `num_buffers`, which we set to 1.
//!
//! Frames the host kernel queues on the tap are read when the tap fd
//! (edge-triggered) says so, until the tap is empty, the guest has no RX
//! buffer left, or [`RX_BUDGET`] frames were handled in this round. Out of
//! buffers, one frame waits in the device and reading resumes when the
//! guest notifies RX. Out of budget, the device writes its own "more RX"
//! eventfd and returns: the event loop serves the other devices' ready
//! events first and then comes back, so a flood from the network (which
//! may be hostile) cannot keep the single event-loop thread in this device.
//!
//! Everything the guest gets wrong (buffers outside its memory, frames too
//! short or too long, offloads it did not negotiate) drops that frame,
//! counts it and logs the first and every power-of-two occurrence: nothing
//! a guest does panics or stalls the event loop.

pub mod frame;
pub mod mac;
pub mod tap;

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    read_config_bytes, signal_used_queue, ActivateError, Activation, Interrupt, VirtioDevice,
    TYPE_NET,
};
use frame::{tx_frame, write_rx_frame, RxError, MAX_FRAME_LEN};
pub use mac::MacAddr;
pub use tap::{Tap, TapError};

/// The config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The config space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Link status bit: up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The RX queue.
pub const RXQ: usize = 0;
/// The TX queue.
pub const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Frames taken off the tap (delivered or dropped) per event before the
/// device yields the event loop. 64 is NAPI's default weight, the figure
/// Linux itself uses to keep one busy NIC from starving the rest: large
/// enough that the extra loop turn costs little (one eventfd write and one
/// epoll round per 64 frames), small enough that one turn is at most 64
/// reads of at most 64 KiB (4 MiB copied, around a millisecond) even when
/// every frame is dropped, so the vsock the agent talks over and the other
/// devices still get served in between.
pub const RX_BUDGET: usize = 64;

/// `struct virtio_net_config` for the features we offer: `mac[6]`, then
/// `le16 status`. (`max_virtqueue_pairs` and `mtu` follow only with `MQ`
/// and `MTU`, which we do not offer; reads past the end give zeros.)
pub fn config_space(mac: MacAddr) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..6].copy_from_slice(&mac.0);
    c[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
    c
}

/// What went through the device (for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Their bytes (headers excluded).
    pub tx_bytes: u64,
    /// Malformed TX chains, dropped and returned.
    pub tx_dropped: u64,
    /// Frames the tap refused.
    pub tx_errors: u64,
    /// Frames put in the guest's RX buffers.
    pub rx_frames: u64,
    /// Their bytes (headers excluded).
    pub rx_bytes: u64,
    /// Frames dropped: larger than the guest's buffer, or a bad buffer.
    pub rx_dropped: u64,
    /// Reads from the tap that failed.
    pub rx_errors: u64,
    /// Rounds that stopped after [`RX_BUDGET`] frames with the tap
    /// possibly not empty (the device then asked to be called again).
    pub rx_budget_exhausted: u64,
    /// A frame waits in the device for an RX buffer.
    pub rx_waiting: bool,
}

/// The device's counters as last published (the device itself moves into
/// the transport; tests and logs keep this).
#[derive(Clone, Default)]
pub struct StatsHandle(Arc<Mutex<NetStats>>);

impl StatsHandle {
    /// The counters after the last batch the device handled.
    pub fn get(&self) -> NetStats {
        self.0.lock().map(|s| *s).unwrap_or_default()
    }
}

/// Counts one event in `counter`; logs the first and every power of two,
/// so a guest that keeps doing it cannot flood the log.
fn count(counter: &mut u64, tap: &str, what: &str, err: &dyn std::fmt::Display) {
    *counter += 1;
    if counter.is_power_of_two() {
        tracing::warn!(tap, times = *counter, error = %err, "virtio-net: {what}");
    }
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<Interrupt>,
}

/// The network device.
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    config: [u8; 8],
    active: Option<Active>,
    /// Where frames from the tap land before they go to the guest.
    rx_buf: Vec<u8>,
    /// A frame in `rx_buf` that waits for an RX buffer.
    rx_pending: Option<usize>,
    /// Written when a round ran out of budget: the tap fd is edge-triggered,
    /// so a tap left partly read raises no new event, and this one
    /// (level-triggered, watched beside the tap) brings us back after the
    /// loop has served what else was ready. An eventfd rather than
    /// re-arming the tap level-triggered: `host_event` gets no `EventOps`
    /// to modify the registration with, and a level-triggered tap would
    /// spin the loop while the guest has no RX buffer.
    rx_more: EventFd,
    stats: NetStats,
    published: StatsHandle,
}

impl Net {
    /// A device on `tap` with address `mac` (random if `None`).
    pub fn new(tap: Tap, mac: Option<MacAddr>) -> Result<Self, TapError> {
        let mac = mac.unwrap_or_else(MacAddr::random);
        let rx_more = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| TapError::RxWakeup(tap.name().to_string(), e))?;
        Ok(Net {
            tap,
            mac,
            config: config_space(mac),
            active: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_more,
            stats: NetStats::default(),
            published: StatsHandle::default(),
        })
    }

    /// Opens (or creates) the tap `name` and makes a device on it.
    pub fn open(name: &str, mac: Option<MacAddr>) -> Result<Self, TapError> {
        Self::new(Tap::open(name)?, mac)
    }

    /// The guest's address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's fd (the event loop watches it).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// The "more RX" eventfd's fd: readable when a round ran out of budget
    /// and the device wants to be called again (the event loop watches it).
    pub fn rx_more_fd(&self) -> RawFd {
        self.rx_more.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// A handle on the counters that outlives handing the device over.
    pub fn stats_handle(&self) -> StatsHandle {
        self.published.clone()
    }

    fn publish(&mut self) {
        self.stats.rx_waiting = self.rx_pending.is_some();
        if let Ok(mut s) = self.published.0.lock() {
            *s = self.stats;
        }
    }

    fn process_tx(&mut self) {
        let Net {
            tap, active, stats, ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = a.tx.iter(&a.mem).ok().and_then(|mut it| it.next()) {
            let head = chain.head_index();
            match tx_frame(&a.mem, chain) {
                Ok(f) => match tap.write_frame(&f.segments) {
                    Ok(_) => {
                        stats.tx_frames += 1;
                        stats.tx_bytes += f.len as u64;
                    }
                    Err(e) => count(&mut stats.tx_errors, tap.name(), "tap write failed", &e),
                },
                Err(e) => count(&mut stats.tx_dropped, tap.name(), "TX frame dropped", &e),
            }
            // TX buffers are only read: nothing written, used length 0.
            if a.tx.add_used(&a.mem, head, 0).is_err() {
                break;
            }
            used_any = true;
        }
        signal_used_queue(&mut a.tx, &a.mem, &a.irq, used_any);
    }

    /// Moves frames from the tap to the guest until the tap is empty, the
    /// guest has no buffer (then one frame waits in `rx_pending`), or
    /// [`RX_BUDGET`] frames were handled (then `rx_more` is written).
    fn process_rx(&mut self) {
        let Net {
            tap,
            active,
            rx_buf,
            rx_pending,
            rx_more,
            stats,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let mut budget = RX_BUDGET;
        loop {
            if budget == 0 {
                // Checked before reading, so no frame is taken off the tap
                // that this round would then have to hold.
                stats.rx_budget_exhausted += 1;
                // EAGAIN: the counter is saturated, the wake-up is pending
                // anyway.
                let _ = rx_more.write(1);
                break;
            }
            let len = match *rx_pending {
                Some(n) => n,
                None => match tap.read_frame(rx_buf) {
                    // Only a socket stand-in whose peer closed says 0.
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Edge-triggered: the next frame wakes us again.
                        count(&mut stats.rx_errors, tap.name(), "tap read failed", &e);
                        break;
                    }
                },
            };
            *rx_pending = Some(len);
            let Some(chain) = a.rx.iter(&a.mem).ok().and_then(|mut it| it.next()) else {
                // No buffer: wait for the guest's RX notification.
                break;
            };
            // Dropped frames count too: a flood of frames too big for the
            // guest's buffers must not keep us reading either.
            budget -= 1;
            let head = chain.head_index();
            match write_rx_frame(&a.mem, chain, &rx_buf[..len]) {
                Ok(used) => {
                    if a.rx.add_used(&a.mem, head, used).is_err() {
                        break;
                    }
                    used_any = true;
                    stats.rx_frames += 1;
                    stats.rx_bytes += len as u64;
                }
                Err(e @ RxError::TooSmall { .. }) => {
                    // The buffer may fit the next frame: keep it.
                    a.rx.go_to_previous_position();
                    count(&mut stats.rx_dropped, tap.name(), "RX frame dropped", &e);
                }
                Err(e @ RxError::Memory) => {
                    count(&mut stats.rx_dropped, tap.name(), "RX frame dropped", &e);
                    if a.rx.add_used(&a.mem, head, 0).is_err() {
                        break;
                    }
                    used_any = true;
                }
            }
            *rx_pending = None;
        }
        signal_used_queue(&mut a.rx, &a.mem, &a.irq, used_any);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        let got = act.queues.len();
        let mut q = act.queues.into_iter();
        let (Some(rx), Some(tx), None) = (q.next(), q.next(), q.next()) else {
            return Err(ActivateError::QueueCount { want: 2, got });
        };
        self.active = Some(Active {
            mem: act.mem,
            rx,
            tx,
            irq,
        });
        // Frames may have queued on the tap before the driver came.
        self.process_rx();
        self.publish();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            _ => {}
        }
        self.publish();
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        // A wake-up still pending finds no queue and does nothing; clearing
        // it just spares the loop that turn.
        let _ = self.rx_more.read();
        self.publish();
    }

    fn init_host_events(&mut self, ops: &mut EventOps) {
        // Edge-triggered: while the guest has no RX buffer we stop reading
        // and the fd stays readable; level-triggered would spin the loop.
        let ev = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::new_raw(self.tap.as_raw_fd(), ev)) {
            tracing::error!(?e, tap = self.tap.name(), "failed to watch the tap");
        }
        if let Err(e) = ops.add(Events::new(&self.rx_more, EventSet::IN)) {
            tracing::error!(
                ?e,
                tap = self.tap.name(),
                "failed to watch the RX wake-up eventfd"
            );
        }
    }

    fn host_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.rx_more.as_raw_fd() {
            // Clear it (it is level-triggered) before the round that may
            // set it again.
            let _ = self.rx_more.read();
            self.process_rx();
            self.publish();
            return;
        }
        if fd != self.tap.as_raw_fd() {
            return;
        }
        if events.contains(EventSet::ERROR) {
            count(
                &mut self.stats.rx_errors,
                self.tap.name(),
                "tap fd error",
                &"EPOLLERR",
            );
        }
        self.process_rx();
        self.publish();
    }
}

#[cfg(test)]
mod tests;
