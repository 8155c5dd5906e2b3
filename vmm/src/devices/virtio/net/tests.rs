//! virtio-net against guest memory: the guest side is a hand-driven pair of
//! virtqueues behind the MMIO transport, the "tap" a `SOCK_SEQPACKET`
//! socket pair (one message per read and write, like a tap), so the whole
//! data path runs without root. `tests/virtio_net.rs` does it on a real tap.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::frame::{NetHeader, ETH_HLEN, MAX_FRAME_LEN, NET_HDR_LEN};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{reg, status};
use crate::devices::virtio::test_utils::{test_memory, Driver, Ring};
use crate::devices::virtio::{INT_VRING, VIRTIO_F_VERSION_1};

const MAC: MacAddr = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
const RX_BUFS: u64 = 0x40_0000;
const RX_BUF_LEN: u32 = 1518 + NET_HDR_LEN as u32;
const TX_BUF: u64 = 0x80_0000;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;

/// A stand-in tap and the host's end of it.
fn seqpacket_pair() -> (OwnedFd, File) {
    let (ours, host) = crate::devices::virtio::test_utils::seqpacket_pair().unwrap();
    (ours, File::from(host))
}

struct Guest {
    mem: GuestMemoryMmap,
    d: Driver,
    rx: Ring,
    tx: Ring,
    tap_fd: RawFd,
    rx_more_fd: RawFd,
    stats: StatsHandle,
    /// The host's end of the "tap".
    host: File,
    rx_posted: u64,
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
    // Destination broadcast, source our MAC, ethertype 0x88b5 (local experimental).
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&MAC.0);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

impl Guest {
    fn new() -> Self {
        let (fd, host) = seqpacket_pair();
        let dev = Net::new(Tap::from_fd(fd, "test").unwrap(), Some(MAC)).unwrap();
        let tap_fd = dev.tap_fd();
        let rx_more_fd = dev.rx_more_fd();
        let stats = dev.stats_handle();
        let mem = test_memory();
        let mut d = Driver::new(Box::new(dev), mem.clone());
        let rx = Ring::at(0x10_000, QUEUE_SIZE);
        let tx = Ring::at(0x20_000, QUEUE_SIZE);
        assert!(d.bring_up(FEATURES, &[&rx, &tx]));
        Guest {
            mem,
            d,
            rx,
            tx,
            tap_fd,
            rx_more_fd,
            stats,
            host,
            rx_posted: 0,
        }
    }

    fn rx_addr(i: u64) -> u64 {
        RX_BUFS + (i % 128) * 0x1000
    }

    /// Posts `n` MTU-sized RX buffers (what Linux posts without offloads).
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = Self::rx_addr(self.rx_posted);
            self.rx_posted += 1;
            self.rx.push(&self.mem, &[(addr, RX_BUF_LEN, true)]);
        }
        self.d.notify(RXQ);
    }

    /// The host sends `f` on the tap; the event loop sees the fd readable.
    fn host_send(&mut self, f: &[u8]) {
        assert_eq!(self.host.write(f).unwrap(), f.len());
    }

    fn tap_readable(&mut self) {
        self.d
            .transport
            .handle_host_event(self.tap_fd, EventSet::IN);
    }

    /// Whether the device asked to be called again (its "more RX" eventfd
    /// is readable), without consuming it.
    fn wants_more_rx(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.rx_more_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one valid, exclusively borrowed
        // pollfd; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        assert!(n >= 0, "{}", std::io::Error::last_os_error());
        p.revents & libc::POLLIN != 0
    }

    /// The event loop delivers the "more RX" eventfd.
    fn more_rx(&mut self) {
        self.d
            .transport
            .handle_host_event(self.rx_more_fd, EventSet::IN);
    }

    /// Frames the guest received since the last call: (header, frame).
    fn received(&mut self) -> Vec<(NetHeader, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, len) in self.rx.take_used(&self.mem) {
            // One descriptor per chain, posted in order: id = buffer number.
            let addr = Self::rx_addr(u64::from(id));
            let hdr: NetHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let mut f = vec![0u8; len as usize - NET_HDR_LEN];
            self.mem
                .read_slice(&mut f, GuestAddress(addr + NET_HDR_LEN as u64))
                .unwrap();
            out.push((hdr, f));
        }
        out
    }

    /// Puts `chain` on TX and notifies; returns the used entries.
    fn send_chain(&mut self, chain: &[(u64, u32, bool)]) -> Vec<(u32, u32)> {
        self.tx.push(&self.mem, chain);
        self.d.notify(TXQ);
        self.tx.take_used(&self.mem)
    }

    /// A frame behind a header in one TX buffer.
    fn send(&mut self, hdr: NetHeader, f: &[u8]) -> Vec<(u32, u32)> {
        self.mem.write_obj(hdr, GuestAddress(TX_BUF)).unwrap();
        self.mem
            .write_slice(f, GuestAddress(TX_BUF + NET_HDR_LEN as u64))
            .unwrap();
        self.send_chain(&[(TX_BUF, (NET_HDR_LEN + f.len()) as u32, false)])
    }

    /// What the host read from the tap, if anything.
    fn host_recv(&mut self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70_000];
        match self.host.read(&mut b) {
            Ok(n) => Some(b[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn stats(&self) -> NetStats {
        self.stats.get()
    }

    fn interrupted(&mut self) -> bool {
        let hit = self.d.transport.interrupt().status() & INT_VRING != 0;
        self.d.transport.interrupt().ack(INT_VRING);
        hit
    }
}

#[test]
fn identifies_as_a_network_card_with_mac_and_link_up() {
    let (fd, _host) = seqpacket_pair();
    let dev = Net::new(Tap::from_fd(fd, "t").unwrap(), Some(MAC)).unwrap();
    let mut d = Driver::new(Box::new(dev), test_memory());
    assert_eq!(d.read(reg::DEVICE_ID), 1);
    d.write(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        u64::from(d.read(reg::DEVICE_FEATURES)),
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    );
    d.write(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.read(reg::DEVICE_FEATURES), 1, "VERSION_1 only");
    d.write(reg::QUEUE_SEL, 0);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 256);
    d.write(reg::QUEUE_SEL, 1);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 256);
    d.write(reg::QUEUE_SEL, 2);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 0, "no control queue");

    // Config space: mac, then status = LINK_UP; byte reads as Linux does.
    let mut cfg = [0u8; 8];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        d.transport.read(reg::CONFIG + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(cfg, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 1, 0]);
    let mut past = [0xffu8; 4];
    d.transport.read(reg::CONFIG + 8, &mut past);
    assert_eq!(past, [0; 4], "no max_virtqueue_pairs without MQ");
    // A driver write to the MAC (legacy drivers do it) changes nothing.
    d.transport.write(reg::CONFIG, &[0xaa; 6]);
    let mut mac = [0u8; 6];
    d.transport.read(reg::CONFIG, &mut mac);
    assert_eq!(mac, MAC.0);
}

#[test]
fn features_we_do_not_offer_are_refused() {
    const MRG_RXBUF: u64 = 1 << 15;
    const CSUM: u64 = 1;
    const GUEST_TSO4: u64 = 1 << 7;
    for extra in [MRG_RXBUF, CSUM, GUEST_TSO4] {
        let (fd, _host) = seqpacket_pair();
        let dev = Net::new(Tap::from_fd(fd, "t").unwrap(), None).unwrap();
        let mut d = Driver::new(Box::new(dev), test_memory());
        d.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.ack_features(FEATURES | extra);
        d.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(d.read(reg::STATUS) & status::FEATURES_OK, 0, "{extra:#x}");
    }
    // MAC alone (no STATUS) is a valid subset.
    let (fd, _host) = seqpacket_pair();
    let mut d = Driver::new(
        Box::new(Net::new(Tap::from_fd(fd, "t").unwrap(), None).unwrap()),
        test_memory(),
    );
    d.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
}

#[test]
fn tx_frames_reach_the_tap_without_the_header() {
    let mut g = Guest::new();
    let f = frame(60, 1);
    assert_eq!(g.send(NetHeader::default(), &f), vec![(0, 0)]);
    assert_eq!(g.host_recv().unwrap(), f);
    assert!(g.interrupted(), "TX completion interrupts");
    assert_eq!(g.host_recv(), None);

    // Header and frame split across four descriptors, the header itself cut
    // in two: the tap still gets exactly the frame.
    let f = frame(1514, 7);
    g.mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    g.mem
        .write_slice(&f[..100], GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    g.mem
        .write_slice(&f[100..], GuestAddress(TX_BUF + 0x2000))
        .unwrap();
    let used = g.send_chain(&[
        (TX_BUF, 5, false),
        (TX_BUF + 5, 7, false),
        (TX_BUF + 0x1000, 100, false),
        (TX_BUF + 0x2000, 1414, false),
    ]);
    assert_eq!(used.len(), 1);
    assert_eq!(g.host_recv().unwrap(), f);
    // Header in the same buffer as the start of the frame (Linux's layout).
    let f2 = frame(42, 9);
    g.mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    g.mem.write_slice(&f2, GuestAddress(TX_BUF + 12)).unwrap();
    g.send_chain(&[(TX_BUF, 20, false), (TX_BUF + 20, 34, false)]);
    assert_eq!(g.host_recv().unwrap(), f2);
    let s = g.stats();
    assert_eq!(
        (s.tx_frames, s.tx_bytes, s.tx_dropped),
        (3, 60 + 1514 + 42, 0)
    );
}

#[test]
fn malformed_tx_chains_are_dropped_and_still_returned() {
    let mut g = Guest::new();
    let mut expected_drops = 0;
    let mut drop_it = |g: &mut Guest, chain: &[(u64, u32, bool)], what: &str| {
        let used = g.send_chain(chain);
        assert_eq!(used.len(), 1, "{what}: the chain goes back");
        assert_eq!(used[0].1, 0, "{what}");
        assert_eq!(g.host_recv(), None, "{what}: nothing reaches the tap");
        expected_drops += 1;
        assert_eq!(g.stats().tx_dropped, expected_drops, "{what}");
    };
    g.mem.write_slice(&[0u8; 64], GuestAddress(TX_BUF)).unwrap();
    drop_it(&mut g, &[(TX_BUF, 12, false)], "header only");
    drop_it(&mut g, &[(TX_BUF, 25, false)], "no Ethernet header");
    drop_it(
        &mut g,
        &[(TX_BUF, 12 + MAX_FRAME_LEN as u32 + 1, false)],
        "oversize",
    );
    drop_it(
        &mut g,
        &[(TX_BUF, 40_000, false), (TX_BUF, 40_000, false)],
        "oversize over two descriptors",
    );
    drop_it(
        &mut g,
        &[(TX_BUF, 12, false), (TX_BUF + 12, 60, true)],
        "writable buffer",
    );
    drop_it(&mut g, &[(0xffff_0000_0000, 60, false)], "outside memory");
    drop_it(
        &mut g,
        &[((16 << 20) - 30, 60, false)],
        "runs off the end of memory",
    );
    // Offloads that were never negotiated.
    for hdr in [
        NetHeader {
            gso_type: 1,
            ..Default::default()
        },
        NetHeader {
            flags: 1,
            ..Default::default()
        },
    ] {
        g.mem.write_obj(hdr, GuestAddress(TX_BUF)).unwrap();
        drop_it(&mut g, &[(TX_BUF, 60, false)], "offload header");
    }
    // The largest legal frame still goes through afterwards.
    let f = frame(MAX_FRAME_LEN, 3);
    assert_eq!(g.send(NetHeader::default(), &f).len(), 1);
    assert_eq!(g.host_recv().unwrap().len(), MAX_FRAME_LEN);
    assert_eq!(g.stats().tx_frames, 1);
}

#[test]
fn rx_frames_land_behind_a_header_with_one_buffer() {
    let mut g = Guest::new();
    g.post_rx(4);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    g.host_send(&a);
    g.host_send(&b);
    g.tap_readable();
    let got = g.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, NetHeader::rx());
    assert_eq!(got[0].0.num_buffers, 1);
    assert_eq!(got[0].1, a);
    assert_eq!(got[1].1, b);
    assert!(g.interrupted());
    // Used lengths are header + frame.
    let s = g.stats();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 60 + 1514));
}

#[test]
fn without_rx_buffers_frames_wait_and_flow_when_the_guest_posts() {
    let mut g = Guest::new();
    for i in 0..3 {
        g.host_send(&frame(100 + i, i as u8));
    }
    g.tap_readable();
    assert!(g.received().is_empty());
    assert!(!g.interrupted());
    assert!(g.stats().rx_waiting);
    // Reading stopped at one frame: the other two are still on the tap.
    g.tap_readable();
    assert!(g.received().is_empty());

    g.post_rx(1);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(100, 0));
    g.post_rx(5);
    let got = g.received();
    assert_eq!(
        got.iter().map(|f| f.1.len()).collect::<Vec<_>>(),
        [101, 102]
    );
    assert_eq!(g.stats().rx_dropped, 0);
    assert!(!g.stats().rx_waiting);
}

#[test]
fn rx_frames_too_big_for_the_buffer_are_dropped_and_the_buffer_kept() {
    let mut g = Guest::new();
    // A buffer with room for header + 100 bytes, over two descriptors.
    g.rx.push(&g.mem, &[(RX_BUFS, 12, true), (RX_BUFS + 12, 100, true)]);
    g.d.notify(RXQ);
    g.host_send(&frame(101, 1));
    g.host_send(&frame(100, 2));
    g.tap_readable();
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, vec![(0, 112)]);
    let mut got = vec![0u8; 100];
    g.mem
        .read_slice(&mut got, GuestAddress(RX_BUFS + 12))
        .unwrap();
    assert_eq!(got, frame(100, 2));
    assert_eq!(g.stats().rx_dropped, 1);
    // A buffer outside guest memory is handed back empty.
    g.rx.push(&g.mem, &[(0xffff_0000_0000, 2000, true)]);
    g.d.notify(RXQ);
    g.host_send(&frame(ETH_HLEN, 3));
    g.tap_readable();
    assert_eq!(g.rx.take_used(&g.mem), vec![(2, 0)]);
    assert_eq!(g.stats().rx_dropped, 2);
}

#[test]
fn reset_drops_the_waiting_frame_and_the_device_comes_back() {
    let mut g = Guest::new();
    g.host_send(&frame(80, 1));
    g.tap_readable();
    assert!(g.stats().rx_waiting);
    g.d.write(reg::STATUS, 0);
    assert!(!g.stats().rx_waiting);
    // Frames sent while the device is down wait on the tap.
    g.host_send(&frame(90, 2));
    g.tap_readable();
    let rx = Ring::at(0x30_000, QUEUE_SIZE);
    let tx = Ring::at(0x50_000, QUEUE_SIZE);
    assert!(g.d.bring_up(FEATURES, &[&rx, &tx]));
    g.rx = rx;
    g.tx = tx;
    g.rx_posted = 0;
    g.post_rx(2);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(90, 2));
}

#[test]
fn one_tap_event_delivers_at_most_the_budget_and_asks_to_come_back() {
    let mut g = Guest::new();
    const EXTRA: usize = 10;
    g.post_rx(RX_BUDGET + EXTRA + 5);
    let frames: Vec<Vec<u8>> = (0..RX_BUDGET + EXTRA)
        .map(|i| frame(60 + i % 7, i as u8))
        .collect();
    for f in &frames {
        g.host_send(f);
    }
    assert!(!g.wants_more_rx());
    g.tap_readable();
    let got: Vec<Vec<u8>> = g.received().into_iter().map(|(_, f)| f).collect();
    assert_eq!(got.len(), RX_BUDGET, "one event reads exactly the budget");
    assert_eq!(got, frames[..RX_BUDGET]);
    assert!(g.interrupted());
    assert!(g.wants_more_rx(), "the device asks to be called again");
    let s = g.stats();
    assert_eq!((s.rx_frames, s.rx_budget_exhausted), (RX_BUDGET as u64, 1));
    assert!(!s.rx_waiting, "no frame is held: the rest stays on the tap");

    // The loop comes back through the eventfd: the rest, in order, and no
    // further wake-up once the tap is empty.
    g.more_rx();
    let got: Vec<Vec<u8>> = g.received().into_iter().map(|(_, f)| f).collect();
    assert_eq!(got, frames[RX_BUDGET..]);
    assert!(g.interrupted());
    assert!(!g.wants_more_rx(), "read, and not written again");
    let s = g.stats();
    assert_eq!(
        (s.rx_frames, s.rx_budget_exhausted, s.rx_dropped),
        ((RX_BUDGET + EXTRA) as u64, 1, 0)
    );
    // A spurious wake-up (the tap was empty after all) is harmless.
    g.more_rx();
    assert!(g.received().is_empty());
    assert_eq!(g.stats().rx_frames, (RX_BUDGET + EXTRA) as u64);
}

#[test]
fn a_flood_of_frames_too_big_to_deliver_still_yields_after_the_budget() {
    let mut g = Guest::new();
    // One buffer with room for header + 60 bytes: every 100-byte frame is
    // dropped and the buffer kept, so nothing stops the loop but the budget.
    g.rx.push(&g.mem, &[(RX_BUFS, (NET_HDR_LEN + 60) as u32, true)]);
    g.d.notify(RXQ);
    let total = 2 * RX_BUDGET + 3;
    for i in 0..total {
        g.host_send(&frame(100, i as u8));
    }
    g.tap_readable();
    let s = g.stats();
    assert_eq!((s.rx_dropped, s.rx_budget_exhausted), (RX_BUDGET as u64, 1));
    assert!(g.wants_more_rx());
    assert!(g.rx.take_used(&g.mem).is_empty());
    assert!(!g.interrupted());

    g.more_rx();
    let s = g.stats();
    assert_eq!(
        (s.rx_dropped, s.rx_budget_exhausted),
        (2 * RX_BUDGET as u64, 2)
    );
    assert!(g.wants_more_rx());
    g.more_rx();
    assert_eq!(g.stats().rx_dropped, total as u64);
    assert!(!g.wants_more_rx(), "the tap is empty: no more wake-ups");
    // The kept buffer still takes a frame that fits.
    g.host_send(&frame(60, 9));
    g.tap_readable();
    assert_eq!(g.rx.take_used(&g.mem), vec![(0, (NET_HDR_LEN + 60) as u32)]);
    assert_eq!(g.stats().rx_frames, 1);
}

#[test]
fn the_rx_notify_path_is_budgeted_too_and_reset_clears_the_wake_up() {
    let mut g = Guest::new();
    for i in 0..RX_BUDGET + 2 {
        g.host_send(&frame(60, i as u8));
    }
    // No buffers yet: one frame is held.
    g.tap_readable();
    assert!(g.stats().rx_waiting);
    assert!(!g.wants_more_rx());
    // The guest posts plenty: its notification reads the budget (the held
    // frame included) and asks to come back for the rest.
    g.post_rx(RX_BUDGET + 10);
    assert_eq!(g.received().len(), RX_BUDGET);
    assert!(g.wants_more_rx());
    g.d.write(reg::STATUS, 0);
    assert!(!g.wants_more_rx(), "reset clears a pending wake-up");
    // A wake-up delivered to a reset device does nothing.
    g.more_rx();
    assert_eq!(g.stats().rx_frames, RX_BUDGET as u64);
}

/// Another device's host fd in the same event loop: counts its events.
struct OtherDevice {
    evt: vmm_sys_util::eventfd::EventFd,
    served: usize,
}

impl event_manager::MutEventSubscriber for OtherDevice {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.served += 1;
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
    }
}

#[test]
fn in_a_real_event_loop_a_flood_shares_the_thread_and_is_drained_in_turns() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    let mut g = Guest::new();
    g.post_rx(2 * RX_BUDGET + 10);
    let frames: Vec<Vec<u8>> = (0..2 * RX_BUDGET + 5).map(|i| frame(60, i as u8)).collect();
    for f in &frames {
        g.host_send(f);
    }
    // The transport moves into the loop as vmm.rs registers it.
    let (fd, _host) = seqpacket_pair();
    let spare = Net::new(Tap::from_fd(fd, "spare").unwrap(), None).unwrap();
    let spare = Driver::new(Box::new(spare), g.mem.clone()).transport;
    let net: Arc<Mutex<dyn MutEventSubscriber + Send>> =
        Arc::new(Mutex::new(std::mem::replace(&mut g.d.transport, spare)));
    let other = Arc::new(Mutex::new(OtherDevice {
        evt: vmm_sys_util::eventfd::EventFd::new(EFD_NONBLOCK).unwrap(),
        served: 0,
    }));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(net);
    em.add_subscriber(other.clone());

    // Each turn the other device has an event too, and is served every
    // turn while net works through the flood a budget at a time.
    let mut per_turn = Vec::new();
    for turn in 1..=4 {
        other.lock().unwrap().evt.write(1).unwrap();
        let events = em.run_with_timeout(0).unwrap();
        assert_eq!(other.lock().unwrap().served, turn, "turn {turn}");
        per_turn.push((events, g.received().len()));
    }
    // Turn 1: the tap's edge; turns 2 and 3: the wake-up eventfd (the last
    // one finds the tap empty before the budget); turn 4: net is idle.
    assert_eq!(
        per_turn,
        [(2, RX_BUDGET), (2, RX_BUDGET), (2, 5), (1, 0)],
        "(events dispatched, frames delivered) per turn"
    );
    let s = g.stats();
    assert_eq!(
        (s.rx_frames, s.rx_budget_exhausted),
        (frames.len() as u64, 2)
    );
}
