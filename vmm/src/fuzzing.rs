//! Entry points shared by the cargo-fuzz targets (`vmm/fuzz`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`): fuzzer bytes become the
//! contents of a virtqueue (descriptor table, available ring, buffers) in
//! guest memory, exactly what a hostile guest controls, and the device
//! processes it. Nothing here may panic, hang or touch memory outside the
//! guest's. Built only with the `fuzzing` feature.

use std::fs::File;
use std::io::Cursor;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_utils::{seqpacket_pair, Driver, Ring};
use crate::devices::virtio::vsock::packet::parse_from;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::create_guest_memory;

const MEM_SIZE: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x1100;
const USED: u64 = 0x1200;
const DATA: u64 = 0x2000;
/// Bytes of fuzz input that go into the descriptor table, then the avail ring.
const DESC_BYTES: usize = 16 * QUEUE_SIZE as usize;
const AVAIL_BYTES: usize = 4 + 2 * QUEUE_SIZE as usize;

/// Lays `data` out as the rings and buffers that every queue of the device
/// shares, and activates the device.
fn setup(device: Box<dyn VirtioDevice>, data: &[u8]) -> Option<Driver> {
    let mem: GuestMemoryMmap = create_guest_memory(MEM_SIZE).ok()?;
    let (desc, rest) = data.split_at(data.len().min(DESC_BYTES));
    let (avail, bufs) = rest.split_at(rest.len().min(AVAIL_BYTES));
    mem.write_slice(desc, GuestAddress(DESC)).ok()?;
    mem.write_slice(avail, GuestAddress(AVAIL)).ok()?;
    let bufs = &bufs[..bufs.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(bufs, GuestAddress(DATA)).ok()?;

    let features = device.features() | VIRTIO_F_VERSION_1;
    let queues = device.queue_max_sizes().len();
    let mut d = Driver::try_new(device, mem).ok()?;
    let ring = Ring::new(DESC, AVAIL, USED, QUEUE_SIZE);
    d.bring_up(features, &vec![&ring; queues]).then_some(d)
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
    let mut d = setup(Box::new(dev), data.get(1..).unwrap_or(&[]))?;
    d.notify(0);
    Some(used_idx(&d.mem))
}

/// Generic descriptor-chain walking (the rng device writes to every
/// writable buffer it is given).
pub fn virtqueue(data: &[u8]) -> Option<u16> {
    let mut d = setup(Box::new(Rng::new()), data)?;
    d.notify(0);
    Some(used_idx(&d.mem))
}

/// A directory removed when its thread ends (a test's thread; libFuzzer's
/// process exits without running this, which `fuzz/run.sh` covers with a
/// TMPDIR of its own).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    /// One directory per thread, so parallel callers do not share sockets.
    static VSOCK_DIR: TempDir = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("nutshell-fuzz-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        TempDir(d)
    };
}

fn vsock_dir() -> PathBuf {
    VSOCK_DIR.with(|d| d.0.clone())
}

/// vsock: the packet parser alone, then the same bytes as the TX and RX
/// queues of a live device (its host side on a Unix socket in a temp dir).
pub fn vsock_packet(data: &[u8]) -> Option<u16> {
    let _ = parse_from(&mut Cursor::new(data));
    let dev = Vsock::new(3, &vsock_dir().join("v.sock")).ok()?;
    let mut d = setup(Box::new(dev), data)?;
    d.notify(1);
    d.notify(0);
    Some(used_idx(&d.mem))
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
    let mut d = setup(Box::new(dev), data)?;
    d.notify(1);
    for len in [60usize, 1600] {
        let _ = peer.write(&vec![0x5a; len]);
    }
    d.transport
        .handle_host_event(tap_fd, vmm_sys_util::epoll::EventSet::IN);
    // The budget's wake-up, as the loop delivers it (whether or not it was
    // written: a spurious one must be harmless too).
    d.transport
        .handle_host_event(rx_more_fd, vmm_sys_util::epoll::EventSet::IN);
    d.notify(0);
    Some(used_idx(&d.mem))
}

/// Removes this thread's vsock directory (call when done).
pub fn cleanup() {
    let _ = std::fs::remove_dir_all(vsock_dir());
}
