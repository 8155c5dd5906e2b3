//! virtio-vsock, hybrid (Firecracker-compatible): the guest's stream sockets
//! are carried to Unix sockets on the host by the [`muxer::Muxer`].
//!
//! Queues: 0 = RX (device to guest), 1 = TX (guest to device), 2 = events
//! (unused: we never reset the transport under the guest's feet).

pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{signal_used_queue, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_VSOCK};
use muxer::Muxer;
use packet::{read_packet, rx_room, write_packet};

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<Interrupt>,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    active: Option<Active>,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        if cid < 3 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a guest CID must be 3 or more",
            ));
        }
        Ok(Vsock {
            cid,
            muxer: Muxer::new(cid, uds_path)?,
            active: None,
        })
    }

    /// The host side (tests).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = a.tx.iter(&a.mem).ok().and_then(|mut it| it.next()) {
            let head = chain.head_index();
            // A malformed packet is dropped; the guest's driver never sends one.
            if let Ok((hdr, payload)) = read_packet(&a.mem, chain) {
                self.muxer.handle_guest_packet(&hdr, &payload);
            }
            if a.tx.add_used(&a.mem, head, 0).is_err() {
                break;
            }
            used_any = true;
        }
        signal_used_queue(&mut a.tx, &a.mem, &a.irq, used_any);
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while self.muxer.has_rx() {
            let Some(chain) = a.rx.iter(&a.mem).ok().and_then(|mut it| it.next()) else {
                break;
            };
            let head = chain.head_index();
            let Some(room) = rx_room(&a.mem, &chain) else {
                // Too small for a header: give it back empty.
                let _ = a.rx.add_used(&a.mem, head, 0);
                used_any = true;
                continue;
            };
            let Some((hdr, payload)) = self.muxer.next_rx(room) else {
                a.rx.go_to_previous_position();
                break;
            };
            let len = write_packet(&a.mem, chain, &hdr, &payload).unwrap_or(0);
            if a.rx.add_used(&a.mem, head, len).is_err() {
                break;
            }
            used_any = true;
        }
        signal_used_queue(&mut a.rx, &a.mem, &a.irq, used_any);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        let got = act.queues.len();
        let mut q = act.queues.into_iter();
        let (Some(rx), Some(tx)) = (q.next(), q.next()) else {
            return Err(ActivateError::QueueCount { want: 3, got });
        };
        self.active = Some(Active {
            mem: act.mem,
            rx,
            tx,
            irq,
        });
        // Host connections may have queued up before the driver came.
        self.process_rx();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            TXQ => {
                self.process_tx();
                self.process_rx();
            }
            RXQ => self.process_rx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn init_host_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.muxer.epoll_fd(), EventSet::IN)) {
            tracing::error!(?e, "failed to watch the vsock host sockets");
        }
    }

    fn host_event(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.muxer.epoll_fd() {
            self.muxer.process_host_events();
            self.process_rx();
        }
    }
}

#[cfg(test)]
mod tests;
