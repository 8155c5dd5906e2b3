//! Replays the fuzz targets (`vmm/fuzz`) as a plain test, bounded in time:
//! the committed seed corpus, structured inputs that describe real request
//! chains, and a few thousand pseudo-random mutations of them. Runs where
//! cargo-fuzz (nightly) is not available; `vmm/fuzz/run.sh` runs the real
//! fuzzers for a bounded time.

use std::path::Path;
use std::time::{Duration, Instant};

use nutshell_vmm::fuzzing;

/// A tiny xorshift PRNG: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// A queue image: descriptors, then an avail ring listing `heads`, then buffers.
fn queue_image(descs: &[Vec<u8>], heads: &[u16], bufs: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = descs.concat();
    v.resize(256, 0);
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&(heads.len() as u16).to_le_bytes());
    let mut ring = vec![0u8; 32];
    for (i, h) in heads.iter().enumerate() {
        ring[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&ring);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(bufs);
    v
}

fn seeds() -> Vec<Vec<u8>> {
    // A block read: header (16 bytes at 0x2000), 512-byte buffer, status.
    let mut hdr = 0u32.to_le_bytes().to_vec();
    hdr.extend_from_slice(&[0; 4]);
    hdr.extend_from_slice(&3u64.to_le_bytes());
    let read = queue_image(
        &[
            desc(0x2000, 16, 1, 1),
            desc(0x3000, 512, 3, 2),
            desc(0x4000, 1, 2, 0),
        ],
        &[0],
        &hdr,
    );
    // A descriptor loop, an out-of-memory buffer, a huge length.
    let looped = queue_image(&[desc(0x2000, 16, 1, 0)], &[0, 0, 0], &[]);
    let wild = queue_image(
        &[
            desc(u64::MAX - 8, u32::MAX, 3, 1),
            desc(0xffff_0000, 4096, 2, 0),
        ],
        &[0, 1, 15],
        &[],
    );
    // A vsock REQUEST from cid 3 to the host.
    let mut pkt = 3u64.to_le_bytes().to_vec();
    pkt.extend_from_slice(&2u64.to_le_bytes());
    pkt.extend_from_slice(&1234u32.to_le_bytes());
    pkt.extend_from_slice(&5000u32.to_le_bytes());
    pkt.extend_from_slice(&0u32.to_le_bytes());
    pkt.extend_from_slice(&1u16.to_le_bytes());
    pkt.extend_from_slice(&1u16.to_le_bytes());
    pkt.extend_from_slice(&[0; 12]);
    let vsock = queue_image(
        &[desc(0x2000, 44, 0, 0), desc(0x3000, 4096, 2, 0)],
        &[0, 1],
        &pkt,
    );
    // A virtio-net TX chain: zeroed header, then a 42-byte ARP request,
    // split over two descriptors.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.resize(54, 0);
    let net = queue_image(
        &[desc(0x2000, 20, 1, 1), desc(0x2014, 34, 0, 0)],
        &[0],
        &frame,
    );
    vec![read, looped, wild, vsock, net, Vec::new(), vec![0xff; 4096]]
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut v = seeds();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                v.push(b);
            }
        }
    }
    v
}

fn replay(target: &str, f: fn(&[u8]) -> Option<u16>) {
    let inputs = corpus(target);
    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut runs = 0;
    for input in &inputs {
        let _ = f(input);
        runs += 1;
    }
    // Mutations, within a time budget.
    while started.elapsed() < Duration::from_secs(3) && runs < 3000 {
        let mut m = inputs[(rng.next() as usize) % inputs.len()].clone();
        if m.is_empty() {
            m.push(0);
        }
        for _ in 0..(1 + rng.next() % 8) {
            let i = (rng.next() as usize) % m.len();
            m[i] = rng.next() as u8;
        }
        if rng.next().is_multiple_of(4) {
            m.truncate((rng.next() as usize) % (m.len() + 1));
        }
        let _ = f(&m);
        runs += 1;
    }
    eprintln!("{target}: {runs} inputs in {:.1?}", started.elapsed());
}

#[test]
fn seeds_reach_the_devices() {
    let s = seeds();
    // The block read seed (prefixed with the read-write selector byte).
    let mut read = vec![0u8];
    read.extend_from_slice(&s[0]);
    assert_eq!(fuzzing::block_queue(&read), Some(1));
    // Each avail entry of the loop seed is completed without hanging.
    let mut looped = vec![0u8];
    looped.extend_from_slice(&s[1]);
    assert_eq!(fuzzing::block_queue(&looped), Some(3));
    assert!(fuzzing::virtqueue(&s[2]).is_some());
    // The vsock REQUEST seed is consumed from TX.
    assert!(fuzzing::vsock_packet(&s[3]).is_some());
    fuzzing::cleanup();
    // The virtio-net TX chain is completed.
    assert_eq!(fuzzing::net_queue(&s[4]), Some(1));
}

#[test]
fn fuzz_block_queue_corpus() {
    replay("block_queue", fuzzing::block_queue);
}

#[test]
fn fuzz_virtqueue_corpus() {
    replay("virtqueue", fuzzing::virtqueue);
}

#[test]
fn fuzz_vsock_packet_corpus() {
    replay("vsock_packet", fuzzing::vsock_packet);
    fuzzing::cleanup();
}

#[test]
fn fuzz_net_queue_corpus() {
    replay("net_queue", fuzzing::net_queue);
}
