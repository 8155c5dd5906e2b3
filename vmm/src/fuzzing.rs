//! Entry points shared by the cargo-fuzz targets (`vmm/fuzz`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`): fuzzer bytes become the
//! contents of a virtqueue (descriptor table, available ring, buffers) in
//! guest memory, exactly what a hostile guest controls, and the device
//! processes it. Nothing here may panic, hang or touch memory outside the
//! guest's.

use std::fs::File;
use std::io::Cursor;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{reg, status, MmioTransport};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::packet::parse_from;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::create_guest_memory;

const MEM_SIZE: u64 = 1 << 20;
const QUEUE_SIZE: u64 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x1100;
const USED: u64 = 0x1200;
const DATA: u64 = 0x2000;
/// Bytes of fuzz input that go into the descriptor table, then the avail ring.
const DESC_BYTES: usize = 16 * QUEUE_SIZE as usize;
const AVAIL_BYTES: usize = 4 + 2 * QUEUE_SIZE as usize;

fn write32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Lays `data` out as queue `q`'s rings and buffers (every queue of the
/// device shares them) and activates the device.
fn setup(device: Box<dyn VirtioDevice>, data: &[u8]) -> Option<(MmioTransport, GuestMemoryMmap)> {
    let mem: GuestMemoryMmap = create_guest_memory(MEM_SIZE).ok()?;
    let (desc, rest) = data.split_at(data.len().min(DESC_BYTES));
    let (avail, bufs) = rest.split_at(rest.len().min(AVAIL_BYTES));
    mem.write_slice(desc, GuestAddress(DESC)).ok()?;
    mem.write_slice(avail, GuestAddress(AVAIL)).ok()?;
    let bufs = &bufs[..bufs.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(bufs, GuestAddress(DATA)).ok()?;

    let features = device.features() | VIRTIO_F_VERSION_1;
    let queues = device.queue_max_sizes().len();
    let irq = EventFd::new(EFD_NONBLOCK).ok()?;
    let mut t = MmioTransport::new(device, mem.clone(), irq).ok()?;
    write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    write32(&mut t, reg::DRIVER_FEATURES, features as u32);
    write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    write32(&mut t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    write32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for q in 0..queues as u32 {
        write32(&mut t, reg::QUEUE_SEL, q);
        write32(&mut t, reg::QUEUE_NUM, QUEUE_SIZE as u32);
        write32(&mut t, reg::QUEUE_DESC_LOW, DESC as u32);
        write32(&mut t, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        write32(&mut t, reg::QUEUE_DEVICE_LOW, USED as u32);
        write32(&mut t, reg::QUEUE_READY, 1);
    }
    write32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    t.is_activated().then_some((t, mem))
}

/// The used ring's index: how many chains the device completed.
fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0)
}

fn memfd_image(size: u64) -> Option<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns
    // a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is new and owned by nobody else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).ok()?;
    Some(f)
}

/// virtio-blk request parsing and execution on a 64 KiB in-memory disk.
/// The first byte picks read-only (odd) or read-write. Returns how many
/// chains completed, None when the input did not get the device running.
pub fn block_queue(data: &[u8]) -> Option<u16> {
    let file = memfd_image(64 * 1024)?;
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let dev = Block::from_file(file, read_only, "fuzz").ok()?;
    let (mut t, mem) = setup(Box::new(dev), data.get(1..).unwrap_or(&[]))?;
    t.handle_queue_event(0);
    Some(used_idx(&mem))
}

/// Generic descriptor-chain walking (the rng device writes to every
/// writable buffer it is given).
pub fn virtqueue(data: &[u8]) -> Option<u16> {
    let (mut t, mem) = setup(Box::new(Rng::new()), data)?;
    t.handle_queue_event(0);
    Some(used_idx(&mem))
}

thread_local! {
    /// One directory per thread, so parallel callers do not share sockets.
    static VSOCK_DIR: PathBuf = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("nutshell-fuzz-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    };
}

fn vsock_dir() -> PathBuf {
    VSOCK_DIR.with(Clone::clone)
}

/// vsock: the packet parser alone, then the same bytes as the TX and RX
/// queues of a live device (its host side on a Unix socket in a temp dir).
pub fn vsock_packet(data: &[u8]) -> Option<u16> {
    let _ = parse_from(&mut Cursor::new(data));
    let dev = Vsock::new(3, &vsock_dir().join("v.sock")).ok()?;
    let (mut t, mem) = setup(Box::new(dev), data)?;
    t.handle_queue_event(1);
    t.handle_queue_event(0);
    Some(used_idx(&mem))
}

/// virtio-net: the same bytes as the TX queue (chains walked, bounded and
/// written to the "tap") and the RX queue (two frames waiting on the tap,
/// one bigger than an MTU-sized buffer). The tap is a `SOCK_SEQPACKET`
/// socket pair, which keeps frame boundaries as a tap does.
pub fn net_queue(data: &[u8]) -> Option<u16> {
    let (ours, peer) = seqpacket_pair().ok()?;
    let mut peer = File::from(peer);
    let dev = Net::new(Tap::from_fd(ours, "fuzz").ok()?, None).ok()?;
    let tap_fd = dev.tap_fd();
    let rx_more_fd = dev.rx_more_fd();
    let (mut t, mem) = setup(Box::new(dev), data)?;
    t.handle_queue_event(1);
    for len in [60usize, 1600] {
        let _ = peer.write(&vec![0x5a; len]);
    }
    t.handle_host_event(tap_fd, vmm_sys_util::epoll::EventSet::IN);
    // The budget's wake-up, as the loop delivers it (whether or not it was
    // written: a spurious one must be harmless too).
    t.handle_host_event(rx_more_fd, vmm_sys_util::epoll::EventSet::IN);
    t.handle_queue_event(0);
    Some(used_idx(&mem))
}

/// A non-blocking `SOCK_SEQPACKET` socket pair: one end stands in for a
/// tap (one frame per read and write), the other is the host's. Also used by
/// virtio-net's unit tests.
pub(crate) fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
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

/// Removes this thread's vsock directory (call when done).
pub fn cleanup() {
    let _ = std::fs::remove_dir_all(vsock_dir());
}
