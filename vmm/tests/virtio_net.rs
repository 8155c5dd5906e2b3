//! virtio-net on a real tap: the device is brought up through the
//! virtio-mmio registers as Linux's driver does, frames go out on the TX
//! queue to the host kernel through the tap, and the kernel's answers (ARP
//! reply, ICMP echo reply) come back into the RX buffers.
//!
//! Each test runs in a network namespace of its own (a thread that
//! unshared CLONE_NEWNET; `ip` and the VMM binary it spawns inherit it), so
//! no interface, address or frame ever shows in the host's namespace. The
//! tap is deleted by a guard, and the namespace goes with the thread.

use std::os::fd::RawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_vmm::devices::bus::BusDevice;
use nutshell_vmm::devices::virtio::mmio::{reg, status, MmioTransport};
use nutshell_vmm::devices::virtio::net::{
    MacAddr, Net, StatsHandle, Tap, TapError, QUEUE_SIZE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
};
use nutshell_vmm::devices::virtio::{INT_VRING, TYPE_NET, VIRTIO_F_VERSION_1};
use nutshell_vmm::vstate::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common;
use common::require;

const QSIZE: u16 = 32;
const HDR: usize = 12;
const RX_BUFS: u64 = 0x40_0000;
const RX_BUF_LEN: u32 = 1518 + HDR as u32;
const TX_BUF: u64 = 0x80_0000;
const MAC: MacAddr = MacAddr([0x02, 0x6e, 0x75, 0x74, 0x73, 0x01]);

fn which(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(cmd).is_file())
}

fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    require(root, "a tap and a network namespace need root")
        && require(
            std::path::Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing",
        )
        && require(which("ip"), "iproute2's ip is not installed")
}

/// Runs `f` on a thread in a fresh network namespace; its panics are the
/// test's.
fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let t = std::thread::spawn(move || {
        // SAFETY: unshare takes flags only; CLONE_NEWNET moves just this
        // thread (and what it spawns) to a new, empty network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        f()
    });
    match t.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A persistent tap with 10.203.`subnet`.1/24, up, as a CNI plugin would
/// leave it; deleted on drop.
struct TapGuard {
    name: String,
    subnet: u8,
}

impl TapGuard {
    fn create(tag: &str) -> Self {
        let pid = std::process::id();
        let name = format!("nsvmm{tag}{}", pid % 10000);
        let subnet = (pid % 200) as u8 + 1;
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let g = TapGuard { name, subnet };
        // No IPv6 on it: its neighbour discovery would only be noise in the
        // guest's few RX buffers. (Absent without IPv6: nothing to silence.)
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", g.name),
            "1",
        );
        ip(&[
            "addr",
            "add",
            &format!("10.203.{subnet}.1/24"),
            "dev",
            &g.name,
        ]);
        ip(&["link", "set", &g.name, "up"]);
        g
    }

    fn host_ip(&self) -> [u8; 4] {
        [10, 203, self.subnet, 1]
    }

    fn guest_ip(&self) -> [u8; 4] {
        [10, 203, self.subnet, 2]
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// A split queue laid out by hand; one descriptor per chain.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Ring {
    fn at(base: u64) -> Self {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    fn push(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, writable: bool) -> u16 {
        let idx = self.next_desc;
        let at = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(at + 12))
            .unwrap();
        self.next_desc = (idx + 1) % QSIZE;
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(idx, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        idx
    }

    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.seen_used {
            return None;
        }
        let slot = u64::from(self.seen_used % QSIZE);
        let id = mem
            .read_obj(GuestAddress(self.used + 4 + 8 * slot))
            .unwrap();
        let len = mem
            .read_obj(GuestAddress(self.used + 8 + 8 * slot))
            .unwrap();
        self.seen_used = self.seen_used.wrapping_add(1);
        Some((id, len))
    }
}

/// The guest: transport, memory, RX (0) and TX (1) rings.
struct Guest {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    tap_fd: RawFd,
    stats: StatsHandle,
    rx: Ring,
    tx: Ring,
    ip: [u8; 4],
}

impl Guest {
    fn new(tap: &TapGuard) -> Self {
        let mem = create_guest_memory(16 << 20).unwrap();
        let net = Net::open(&tap.name, Some(MAC)).unwrap();
        let tap_fd = net.tap_fd();
        let stats = net.stats_handle();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
        let mut g = Guest {
            t,
            mem,
            tap_fd,
            stats,
            rx: Ring::at(0x1_0000),
            tx: Ring::at(0x2_0000),
            ip: tap.guest_ip(),
        };
        g.bring_up();
        for _ in 0..QSIZE {
            g.post_rx();
        }
        g.notify(0);
        g
    }

    fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// What Linux's virtio-mmio and virtio-net drivers do.
    fn bring_up(&mut self) {
        assert_eq!(self.read(reg::DEVICE_ID), TYPE_NET);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let f = lo | u64::from(self.read(reg::DEVICE_FEATURES)) << 32;
        assert_eq!(
            f,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        );
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        assert_ne!(self.read(reg::STATUS) & status::FEATURES_OK, 0);
        let mut mac = [0u8; 6];
        self.t.read(reg::CONFIG, &mut mac);
        assert_eq!(mac, MAC.0, "config space MAC");
        for (i, base) in [0x1_0000u64, 0x2_0000].into_iter().enumerate() {
            self.write(reg::QUEUE_SEL, i as u32);
            assert_eq!(self.read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            self.write(reg::QUEUE_NUM, u32::from(QSIZE));
            for (lo, hi, v) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, base),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, base + 0x1000),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, base + 0x2000),
            ] {
                self.write(lo, v as u32);
                self.write(hi, (v >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, s | status::DRIVER_OK);
        assert!(self.t.is_activated(), "the device did not activate");
    }

    /// The buffer of RX descriptor `idx`.
    fn rx_addr(idx: u32) -> u64 {
        RX_BUFS + u64::from(idx) * 0x1000
    }

    fn post_rx(&mut self) {
        let idx = self.rx.next_desc;
        let addr = Self::rx_addr(u32::from(idx));
        self.rx.push(&self.mem, addr, RX_BUF_LEN, true);
    }

    /// QueueNotify, then what the event loop does with the ioeventfd.
    fn notify(&mut self, q: u32) {
        self.write(reg::QUEUE_NOTIFY, q);
        self.t.handle_queue_event(q as usize);
    }

    /// Sends one frame behind a zeroed header.
    fn send(&mut self, frame: &[u8]) {
        self.mem
            .write_slice(&[0u8; HDR], GuestAddress(TX_BUF))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(TX_BUF + HDR as u64))
            .unwrap();
        self.tx
            .push(&self.mem, TX_BUF, (HDR + frame.len()) as u32, false);
        self.notify(1);
        let (_, len) = self.tx.pop_used(&self.mem).expect("TX chain returned");
        assert_eq!(len, 0);
    }

    /// The next frame the host sent for which `want` holds, with its used
    /// length. Answers the kernel's ARP requests for our address meanwhile;
    /// other frames (IPv6 neighbour discovery...) are skipped.
    fn wait_for(&mut self, deadline: Instant, want: impl Fn(&[u8]) -> bool) -> (Vec<u8>, u32) {
        loop {
            while let Some((id, len)) = self.rx.pop_used(&self.mem) {
                let addr = Self::rx_addr(id);
                let mut hdr = [0u8; HDR];
                self.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
                assert_eq!(&hdr[..10], &[0; 10], "no offload in the header");
                assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
                let mut f = vec![0u8; len as usize - HDR];
                self.mem
                    .read_slice(&mut f, GuestAddress(addr + HDR as u64))
                    .unwrap();
                self.post_rx();
                self.notify(0);
                if want(&f) {
                    return (f, len);
                }
                if is_arp(&f, 1) && f[38..42] == self.ip {
                    let reply = arp(
                        2,
                        MAC,
                        self.ip,
                        f[22..28].try_into().unwrap(),
                        ip4(&f[28..32]),
                    );
                    self.send(&reply);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no matching frame from the host in time");
            let mut pfd = libc::pollfd {
                fd: self.tap_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(100) as i32;
            // SAFETY: poll reads and writes one valid pollfd for at most `ms` ms.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.t.handle_host_event(self.tap_fd, EventSet::IN);
        }
    }
}

fn ip4(b: &[u8]) -> [u8; 4] {
    b.try_into().unwrap()
}

/// An ARP frame (`op` 1 request, 2 reply) from `sha`/`spa` to `tha`/`tpa`.
fn arp(op: u16, sha: MacAddr, spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(if op == 1 { &[0xff; 6] } else { &tha });
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

fn is_arp(f: &[u8], op: u16) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == op.to_be_bytes()
}

/// The Internet checksum (RFC 1071).
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request from `src` to `dst`.
fn echo_request(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..56u8).collect();
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(&payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&seq.to_be_bytes());
    iph.extend_from_slice(&[0x40, 0, 64, 1, 0, 0]);
    iph.extend_from_slice(&src);
    iph.extend_from_slice(&dst);
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

fn is_echo_reply(f: &[u8], src: [u8; 4], seq: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[26..30] == src
        && f[34] == 0
        && f[40..42] == seq.to_be_bytes()
}

#[test]
fn arp_and_ping_through_a_real_tap() {
    if !prerequisites() {
        return;
    }
    in_own_netns(|| {
        let tap = TapGuard::create("t");
        let mut g = Guest::new(&tap);
        let host = tap.host_ip();

        // ARP: who has 10.203.X.1? Tell 10.203.X.2.
        let started = Instant::now();
        g.send(&arp(1, MAC, g.ip, [0; 6], host));
        let deadline = started + Duration::from_secs(5);
        let (reply, used_len) = g.wait_for(deadline, |f| is_arp(f, 2));
        let arp_rtt = started.elapsed();
        assert_eq!(&reply[12..14], &[0x08, 0x06], "ethertype ARP");
        assert_eq!(&reply[20..22], &[0, 2], "opcode reply");
        assert_eq!(&reply[28..32], &host, "sender IP");
        assert_eq!(&reply[32..38], &MAC.0, "target MAC");
        assert_eq!(&reply[0..6], &MAC.0, "sent to us");
        assert_eq!(used_len as usize, HDR + reply.len());
        let host_mac: [u8; 6] = reply[22..28].try_into().unwrap();
        assert_ne!(g.read(reg::INTERRUPT_STATUS) & INT_VRING, 0);

        // Ping the host kernel.
        let (reply, _) = {
            g.send(&echo_request(host_mac, g.ip, host, 0x4e53, 1));
            g.wait_for(Instant::now() + Duration::from_secs(5), |f| {
                is_echo_reply(f, host, 1)
            })
        };
        let ihl = usize::from(reply[14] & 0xf) * 4;
        assert_eq!(checksum(&reply[14..14 + ihl]), 0, "IP checksum");
        assert_eq!(checksum(&reply[14 + ihl..]), 0, "ICMP checksum");
        assert_eq!(&reply[30..34], &g.ip, "to us");
        assert_eq!(&reply[38..40], &0x4e53u16.to_be_bytes(), "echo id");
        assert_eq!(reply[14 + ihl + 8..], (0..56u8).collect::<Vec<_>>()[..]);

        // Round trips: TX notify -> tap -> host kernel -> tap -> RX buffer.
        let n = 200u16;
        let mut rtts = Vec::new();
        for seq in 2..2 + n {
            let t0 = Instant::now();
            g.send(&echo_request(host_mac, g.ip, host, 0x4e53, seq));
            g.wait_for(t0 + Duration::from_secs(5), |f| is_echo_reply(f, host, seq));
            rtts.push(t0.elapsed());
        }
        rtts.sort();
        let s = g.stats.get();
        eprintln!(
            "virtio-net on tap {}: ARP round trip {arp_rtt:.1?}; ICMP echo over {n}: p50 {:.1?}, p99 {:.1?}; stats {s:?}",
            tap.name,
            rtts[rtts.len() / 2],
            rtts[rtts.len() * 99 / 100],
        );
        assert!(s.tx_frames > u64::from(n) && s.rx_frames > u64::from(n));
        assert_eq!((s.tx_dropped, s.tx_errors, s.rx_errors), (0, 0, 0));
    });
}

#[test]
fn a_held_tap_is_refused_and_a_missing_one_is_created() {
    if !prerequisites() {
        return;
    }
    in_own_netns(|| {
        let tap = TapGuard::create("b");
        let held = Tap::open(&tap.name).unwrap();
        let err = Tap::open(&tap.name).unwrap_err();
        assert!(matches!(err, TapError::Attach { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&tap.name) && msg.contains("already holds"),
            "{msg}"
        );
        drop(held);
        // Once let go, it can be attached again (a VMM restart).
        drop(Tap::open(&tap.name).unwrap());

        // A name that does not exist is created, and lives as long as the fd.
        let name = format!("nsvmmc{}", std::process::id() % 10000);
        let created = Tap::open(&name).unwrap();
        let shown = Command::new("ip")
            .args(["link", "show", &name])
            .output()
            .unwrap();
        assert!(shown.status.success());
        assert!(String::from_utf8_lossy(&shown.stdout).contains(&name));
        drop(created);
        let gone = Command::new("ip")
            .args(["link", "show", &name])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "the created tap outlived its fd");
    });
}

/// `mov dword [reg + disp32], imm32` with reg = rcx (0x81) or rbx (0x83).
fn store(c: &mut Vec<u8>, modrm: u8, disp: u32, imm: u32) {
    c.extend_from_slice(&[0xc7, modrm]);
    c.extend_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(&imm.to_le_bytes());
}

/// A CPL3 virtio-net "driver": after spinning a while (so that all of it
/// happens under the seccomp filter the VMM installs once the vCPUs run),
/// it lays out the RX queue (one 1530-byte buffer at 0x220000) and the TX
/// queue (one ARP request behind a zeroed header at 0x230000), brings the
/// device up at 0xd0000000, notifies RX then TX, spins until the RX used
/// ring moves and InterruptStatus shows it, prints InterruptStatus, the
/// used length and the reply's ethertype, opcode and the last byte of its
/// sender IP, then resets the device and the VM.
fn net_driver_payload(arp_request: &[u8]) -> Vec<u8> {
    const RC: u8 = 0x81;
    const RB: u8 = 0x83;
    let mut c = vec![0xb9, 0x00, 0x00, 0x00, 0x10]; // mov ecx, 0x10000000
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz back
    c.extend_from_slice(&[0xb9, 0x00, 0x00, 0x20, 0x00]); // mov ecx, 0x200000
                                                          // RX descriptor 0: 0x220000, 1530 bytes, device-writable; avail idx 1.
    store(&mut c, RC, 0x0, 0x22_0000);
    store(&mut c, RC, 0x8, RX_BUF_LEN);
    store(&mut c, RC, 0xc, 2);
    store(&mut c, RC, 0x1000, 1 << 16);
    // TX descriptor 0: header + ARP request at 0x230000; avail idx 1.
    let mut tx = vec![0u8; HDR];
    tx.extend_from_slice(arp_request);
    store(&mut c, RC, 0x1_0000, 0x23_0000);
    store(&mut c, RC, 0x1_0008, tx.len() as u32);
    store(&mut c, RC, 0x1_1000, 1 << 16);
    tx.resize(tx.len().next_multiple_of(4), 0);
    for (i, w) in tx.chunks(4).enumerate() {
        let v = u32::from_le_bytes(w.try_into().unwrap());
        store(&mut c, RC, 0x3_0000 + 4 * i as u32, v);
    }
    c.extend_from_slice(&[0xbb, 0x00, 0x00, 0x00, 0xd0]); // mov ebx, 0xd0000000
    let features = (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) as u32;
    let mut regs = vec![(0x70, 1), (0x70, 3), (0x24, 0), (0x20, features)];
    regs.extend([(0x24, 1), (0x20, 1), (0x70, 0xb)]);
    for (q, base) in [(0u32, 0x20_0000u32), (1, 0x21_0000)] {
        regs.extend([(0x30, q), (0x38, u32::from(QSIZE)), (0x80, base)]);
        regs.extend([(0x90, base + 0x1000), (0xa0, base + 0x2000), (0x44, 1)]);
    }
    regs.extend([(0x70, 0xf), (0x50, 0), (0x50, 1)]);
    for (off, v) in regs {
        store(&mut c, RB, off, v);
    }
    c.extend_from_slice(&[0xb9, 0x02, 0x20, 0x20, 0x00]); // mov ecx, 0x202002 (RX used.idx)
    c.extend_from_slice(&[0x0f, 0xb7, 0x01, 0x85, 0xc0, 0x74, 0xf9]); // spin while 0
    c.extend_from_slice(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xa8, 0x01, 0x74, 0xf6]); // spin on INT_VRING
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend_from_slice(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xee]); // InterruptStatus
    c.extend_from_slice(&[0xb9, 0x08, 0x20, 0x20, 0x00]); // mov ecx, 0x202008 (used[0].len)
    c.extend_from_slice(&[0x8a, 0x01, 0xee]);
    c.extend_from_slice(&[0xb9, 0x00, 0x00, 0x22, 0x00]); // mov ecx, 0x220000
    for off in [0x18u8, 0x19, 0x21, 0x2b] {
        c.extend_from_slice(&[0x8a, 0x41, off, 0xee]); // mov al, [rcx + off]; out
    }
    c.extend_from_slice(&[0xb0, 0x0a, 0xee]); // '\n'
    store(&mut c, RB, 0x70, 0); // device reset
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // VM reset
    c
}

/// The binary with its seccomp filter on: the tap opened at build time,
/// `writev` on TX, the tap's readiness in the event loop and `read` on RX
/// all work from a guest, and the VM ends with the guest's reset, not
/// SIGSYS.
#[test]
fn hardened_binary_carries_a_guest_arp_exchange() {
    if !prerequisites() || !require(common::kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    in_own_netns(|| {
        let tap = TapGuard::create("h");
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("net-driver.bin");
        let request = arp(1, MAC, tap.guest_ip(), [0; 6], tap.host_ip());
        std::fs::write(&code, net_driver_payload(&request)).unwrap();
        let serial = dir.path().join("serial.log");
        let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
            .arg("--payload")
            .arg(&code)
            .args(["--memory-mib", "32", "--timeout-ms", "20000", "--net"])
            .arg(format!("{},mac={MAC}", tap.name))
            .arg("--serial")
            .arg(&serial)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let got = std::fs::read(&serial).unwrap();
        // InterruptStatus, 12 + 42 bytes used, ARP, reply, from 10.203.X.1.
        assert_eq!(
            got,
            [INT_VRING as u8, 54, 0x08, 0x06, 2, 1, b'\n'],
            "{stderr}"
        );
    });
}

#[test]
fn the_binary_names_a_tap_it_cannot_open() {
    if !prerequisites() || !require(common::kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    in_own_netns(|| {
        let tap = TapGuard::create("e");
        let _held = Tap::open(&tap.name).unwrap();
        // From the JSON config too.
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("vm.json");
        let json = format!(
            r#"{{"payload": "/dev/null", "net": [{{"tap": "{}", "mac": "02:00:00:00:00:09"}}]}}"#,
            tap.name
        );
        std::fs::write(&cfg, json).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&tap.name) && stderr.contains("already holds"),
            "{stderr}"
        );
    });
}
