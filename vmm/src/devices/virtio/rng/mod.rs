//! virtio-rng: fills every buffer the driver offers with bytes from the
//! host's `getrandom`.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::TYPE_RNG;
use super::{
    read_config_bytes, signal_used_queue, ActivateError, Activation, Interrupt, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per descriptor chain; a guest cannot make us
/// allocate more.
const MAX_CHAIN_BYTES: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is a valid, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        let (mem, queue) = act.into_single_queue()?;
        self.active = Some((mem, queue, irq));
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, queue, irq)) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let mut buf = Vec::new();
        while let Some(chain) = queue.iter(&*mem).ok().and_then(|mut it| it.next()) {
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.clone() {
                if !desc.is_write_only() {
                    continue;
                }
                let room = MAX_CHAIN_BYTES.saturating_sub(written as usize);
                let len = (desc.len() as usize).min(room);
                if len == 0 {
                    break;
                }
                buf.resize(len, 0);
                if !fill_random(&mut buf) || mem.write_slice(&buf, desc.addr()).is_err() {
                    break;
                }
                written += len as u32;
            }
            if queue.add_used(&*mem, head, written).is_err() {
                break;
            }
            used_any = true;
        }
        signal_used_queue(queue, mem, irq, used_any);
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, Driver, Ring};
    use crate::devices::virtio::{INT_VRING, VIRTIO_F_VERSION_1};
    use vm_memory::GuestAddress;

    /// An rng device on one queue of 16 at 0x10000, brought up.
    fn rng() -> (Driver, Ring) {
        let mut d = Driver::new(Box::new(Rng::new()), test_memory());
        let ring = Ring::at(0x10000, 16);
        assert!(d.bring_up(VIRTIO_F_VERSION_1, &[&ring]));
        (d, ring)
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let (mut d, mut ring) = rng();
        ring.push(&d.mem, &[(0x100000, 512, true)]);
        ring.push(&d.mem, &[(0x200000, 64, true)]);
        d.notify(0);

        assert_eq!(ring.take_used(&d.mem), vec![(0, 512), (1, 64)]);
        let mut a = [0u8; 512];
        d.mem.read_slice(&mut a, GuestAddress(0x100000)).unwrap();
        assert!(a.iter().filter(|b| **b != 0).count() > 400, "random bytes");
        assert_eq!(d.transport.interrupt().status() & INT_VRING, INT_VRING);
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let (mut d, mut ring) = rng();
        ring.push(&d.mem, &[(0x100000, 512, false)]);
        d.notify(0);
        assert_eq!(ring.take_used(&d.mem), vec![(0, 0)]);
        assert_eq!(d.mem.read_obj::<u64>(GuestAddress(0x100000)).unwrap(), 0);
    }
}
