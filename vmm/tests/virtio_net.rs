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
use nutshell_vmm::devices::virtio::mmio::reg;
use nutshell_vmm::devices::virtio::net::{
    MacAddr, Net, StatsHandle, Tap, TapError, QUEUE_SIZE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
};
use nutshell_vmm::devices::virtio::test_utils::{Driver, Ring};
use nutshell_vmm::devices::virtio::{INT_VRING, TYPE_NET, VIRTIO_F_VERSION_1};
use nutshell_vmm::vstate::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

mod common;
use common::payload::{bring_up_regs, Asm};
use common::{is_root, kvm_usable, require, run_config, run_payload};

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
    require(is_root(), "a tap and a network namespace need root")
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

/// Runs `f` with a fresh tap named after `tag`, in a network namespace of
/// its own, once the prerequisites (and KVM, where `needs_kvm`) are there.
fn with_tap(tag: &'static str, needs_kvm: bool, f: impl FnOnce(&TapGuard) + Send + 'static) {
    if !prerequisites()
        || (needs_kvm && !require(kvm_usable(), "/dev/kvm is missing or not usable"))
    {
        return;
    }
    in_own_netns(move || {
        let tap = TapGuard::create(tag);
        f(&tap);
    });
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

/// The guest: transport, memory, RX (0) and TX (1) rings.
struct Guest {
    d: Driver,
    tap_fd: RawFd,
    stats: StatsHandle,
    rx: Ring,
    tx: Ring,
    ip: [u8; 4],
}

/// Waits until `name`'s link is up: attaching to a tap raises its carrier,
/// but the kernel's link watch activates the queueing discipline only later
/// (up to a second); until then the kernel drops what it sends through the
/// tap, such as its ARP reply.
fn wait_link_up(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "dev", name])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("state UP") {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never came up: {text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` for up to 3 s. Other tests of this process fork `ip`
/// meanwhile, and a child holds a copy of every fd between its fork and its
/// exec, so a closed tap may take a moment to be let go.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Guest {
    fn new(tap: &TapGuard) -> Self {
        let mem = create_guest_memory(16 << 20).unwrap();
        let net = Net::open(&tap.name, Some(MAC)).unwrap();
        wait_link_up(&tap.name);
        let tap_fd = net.tap_fd();
        let stats = net.stats_handle();
        let mut g = Guest {
            d: Driver::new(Box::new(net), mem),
            tap_fd,
            stats,
            rx: Ring::at(0x1_0000, QSIZE),
            tx: Ring::at(0x2_0000, QSIZE),
            ip: tap.guest_ip(),
        };
        g.bring_up();
        for _ in 0..QSIZE {
            g.post_rx();
        }
        g.d.notify(0);
        g
    }

    /// What Linux's virtio-mmio and virtio-net drivers do.
    fn bring_up(&mut self) {
        assert_eq!(self.d.read(reg::DEVICE_ID), TYPE_NET);
        let f = self.d.device_features();
        assert_eq!(
            f,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        );
        assert!(self.d.negotiate(f));
        let mut mac = [0u8; 6];
        self.d.transport.read(reg::CONFIG, &mut mac);
        assert_eq!(mac, MAC.0, "config space MAC");
        for (i, ring) in [&self.rx, &self.tx].into_iter().enumerate() {
            let max = self.d.setup_queue(i as u32, ring);
            assert_eq!(max, u32::from(QUEUE_SIZE));
        }
        self.d.driver_ok();
        assert!(
            self.d.transport.is_activated(),
            "the device did not activate"
        );
    }

    /// The buffer of RX descriptor `idx`.
    fn rx_addr(idx: u32) -> u64 {
        RX_BUFS + u64::from(idx) * 0x1000
    }

    fn post_rx(&mut self) {
        let idx = self.rx.next_desc;
        let addr = Self::rx_addr(u32::from(idx));
        self.rx.push(&self.d.mem, &[(addr, RX_BUF_LEN, true)]);
    }

    /// Sends one frame behind a zeroed header.
    fn send(&mut self, frame: &[u8]) {
        self.d
            .mem
            .write_slice(&[0u8; HDR], GuestAddress(TX_BUF))
            .unwrap();
        self.d
            .mem
            .write_slice(frame, GuestAddress(TX_BUF + HDR as u64))
            .unwrap();
        let len = (HDR + frame.len()) as u32;
        self.tx.push(&self.d.mem, &[(TX_BUF, len, false)]);
        self.d.notify(1);
        let (_, len) = self.tx.pop_used(&self.d.mem).expect("TX chain returned");
        assert_eq!(len, 0);
    }

    /// The next frame the host sent for which `want` holds, with its used
    /// length. Answers the kernel's ARP requests for our address meanwhile;
    /// other frames (IPv6 neighbour discovery...) are skipped.
    fn wait_for(&mut self, deadline: Instant, want: impl Fn(&[u8]) -> bool) -> (Vec<u8>, u32) {
        loop {
            while let Some((id, len)) = self.rx.pop_used(&self.d.mem) {
                let addr = Self::rx_addr(id);
                let mut hdr = [0u8; HDR];
                self.d.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
                assert_eq!(&hdr[..10], &[0; 10], "no offload in the header");
                assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
                let mut f = vec![0u8; len as usize - HDR];
                self.d
                    .mem
                    .read_slice(&mut f, GuestAddress(addr + HDR as u64))
                    .unwrap();
                self.post_rx();
                self.d.notify(0);
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
            self.d
                .transport
                .handle_host_event(self.tap_fd, EventSet::IN);
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
    with_tap("t", false, |tap| {
        let mut g = Guest::new(tap);
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
        assert_ne!(g.d.read(reg::INTERRUPT_STATUS) & INT_VRING, 0);

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
    with_tap("b", false, |tap| {
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
        assert!(
            eventually(|| Tap::open(&tap.name).is_ok()),
            "the tap was not let go"
        );

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
        let gone = || {
            !Command::new("ip")
                .args(["link", "show", &name])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(eventually(gone), "the created tap outlived its fd");
    });
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
    let mut c = Asm::new();
    c.delay().mov_ecx(0x20_0000);
    // RX descriptor 0: 0x220000, 1530 bytes, device-writable; avail idx 1.
    c.store_at_rcx(0x0, 0x22_0000)
        .store_at_rcx(0x8, RX_BUF_LEN)
        .store_at_rcx(0xc, 2)
        .store_at_rcx(0x1000, 1 << 16);
    // TX descriptor 0: header + ARP request at 0x230000; avail idx 1.
    let mut tx = vec![0u8; HDR];
    tx.extend_from_slice(arp_request);
    c.store_at_rcx(0x1_0000, 0x23_0000)
        .store_at_rcx(0x1_0008, tx.len() as u32)
        .store_at_rcx(0x1_1000, 1 << 16);
    tx.resize(tx.len().next_multiple_of(4), 0);
    for (i, w) in tx.chunks(4).enumerate() {
        let v = u32::from_le_bytes(w.try_into().unwrap());
        c.store_at_rcx(0x3_0000 + 4 * i as u32, v);
    }
    // MAC and STATUS, then VIRTIO_F_VERSION_1; notify RX, then TX.
    let features = [(0, (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) as u32), (1, 1)];
    let regs = bring_up_regs(&features, QSIZE, &[0x20_0000, 0x21_0000], &[0, 1]);
    c.mmio_writes(&regs);
    c.spin_while_zero_u16(0x20_2002) // RX used.idx
        .spin_until_vring_interrupt()
        .serial()
        .print_interrupt_status();
    c.mov_ecx(0x20_2008).print_u8_at_rcx(0); // used[0].len
    c.mov_ecx(0x22_0000); // the received frame, behind its header
    for off in [0x18, 0x19, 0x21, 0x2b] {
        c.print_u8_at_rcx(off);
    }
    c.print_byte(b'\n');
    c.mmio_write(reg::STATUS, 0).reset_vm(); // device reset, then the VM's
    c.code()
}

/// The binary with its seccomp filter on: the tap opened at build time,
/// `writev` on TX, the tap's readiness in the event loop and `read` on RX
/// all work from a guest, and the VM ends with the guest's reset, not
/// SIGSYS.
#[test]
fn hardened_binary_carries_a_guest_arp_exchange() {
    with_tap("h", true, |tap| {
        let request = arp(1, MAC, tap.guest_ip(), [0; 6], tap.host_ip());
        let net = format!("{},mac={MAC}", tap.name);
        let (out, got) = run_payload(&net_driver_payload(&request), &["--net", &net]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
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
    with_tap("e", true, |tap| {
        let _held = Tap::open(&tap.name).unwrap();
        // From the JSON config too.
        let (code, stderr) = run_config(&format!(
            r#"{{"payload": "/dev/null", "net": [{{"tap": "{}", "mac": "02:00:00:00:00:09"}}]}}"#,
            tap.name
        ));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(&tap.name) && stderr.contains("already holds"),
            "{stderr}"
        );
    });
}
