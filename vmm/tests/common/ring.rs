//! A split virtqueue laid out by hand in guest memory and driven the way a
//! guest driver does it, over time: chains go in, used entries come out.
//! (`virtio-queue`'s mock driver resets the ring indexes whenever it is
//! created, and its `test-utils` are not built for integration tests.)

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: the chain goes on at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;

/// The rings of one queue of `size` entries: descriptor table at `base`,
/// available ring at `base + 0x1000`, used ring at `base + 0x2000`.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// The descriptor the next chain starts at.
    pub next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Ring {
    pub fn at(base: u64, size: u16) -> Self {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
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
}
