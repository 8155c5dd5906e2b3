//! vsock against guest memory: the guest side is a hand-driven virtqueue
//! set, the host side real Unix sockets.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::muxer::CONN_BUF;
use super::packet::*;
use super::Vsock;
use crate::devices::virtio::test_utils::{test_memory, Driver, Ring};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

const CID: u64 = 3;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUF: u64 = 0x80_0000;
const RX_BUF_LEN: u32 = 4096;

struct Guest {
    mem: GuestMemoryMmap,
    d: Driver,
    rx: Ring,
    tx: Ring,
    epoll_fd: RawFd,
    rx_count: u64,
    dir: tempfile::TempDir,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mem = test_memory();
        let dev = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
        let epoll_fd = dev.muxer().epoll_fd();
        let mut d = Driver::new(Box::new(dev), mem.clone());
        let rx = Ring::at(0x10_000, 256);
        let tx = Ring::at(0x20_000, 256);
        let ev = Ring::at(0x30_000, 256);
        assert!(d.bring_up(VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]));
        let mut g = Guest {
            mem,
            d,
            rx,
            tx,
            epoll_fd,
            rx_count: 0,
            dir,
        };
        for _ in 0..16 {
            g.give_rx_buffer();
        }
        g
    }

    fn give_rx_buffer(&mut self) {
        let addr = RX_BUFS + (self.rx_count % 64) * u64::from(RX_BUF_LEN);
        self.rx_count += 1;
        self.rx.push(&self.mem, &[(addr, RX_BUF_LEN, true)]);
        self.d.notify(0);
    }

    fn uds(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Lets the device look at its host sockets (what the event loop does).
    fn host_event(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
        self.d
            .transport
            .handle_host_event(self.epoll_fd, EventSet::IN);
    }

    /// Packets the device put in RX since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        let mut out = Vec::new();
        for (id, len) in used {
            // One descriptor per chain: id == descriptor index == buffer order.
            let idx = u64::from(id);
            let addr = RX_BUFS + (idx % 64) * u64::from(RX_BUF_LEN);
            let hdr: Header = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let mut payload = vec![0u8; len as usize - HDR_SIZE];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            assert_eq!(hdr.len as usize, payload.len());
            out.push((hdr, payload));
        }
        for _ in 0..out.len() {
            self.give_rx_buffer();
        }
        out
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut h = hdr;
        h.len = payload.len() as u32;
        self.mem.write_obj(h, GuestAddress(TX_BUF)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(TX_BUF + HDR_SIZE as u64))
            .unwrap();
        self.tx.push(
            &self.mem,
            &[(TX_BUF, (HDR_SIZE + payload.len()) as u32, false)],
        );
        self.d.notify(1);
    }
}

fn guest_hdr(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Host connects to guest port 1024; the guest accepts. Returns the host
/// stream and the host port the device picked.
fn host_connect(g: &mut Guest) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.host_event(); // accept
    g.host_event(); // read the CONNECT line
    let pkts = g.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!({ req.op }, OP_REQUEST);
    assert_eq!(
        ({ req.dst_cid }, { req.dst_port }, { req.src_cid }),
        (CID, 1024, HOST_CID)
    );
    let host_port = req.src_port;
    g.send(guest_hdr(OP_RESPONSE, 1024, host_port), &[]);
    assert_eq!(read_line(&mut host), format!("OK {host_port}"));
    (host, host_port)
}

#[test]
fn host_connect_accept_and_data_both_ways() {
    let mut g = Guest::new();
    let (mut host, port) = host_connect(&mut g);
    host.write_all(b"ping").unwrap();
    g.host_event();
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        ({ pkts[0].0.op }, pkts[0].1.as_slice()),
        (OP_RW, &b"ping"[..])
    );
    assert_eq!({ pkts[0].0.buf_alloc }, CONN_BUF);

    g.send(guest_hdr(OP_RW, 1024, port), b"pong");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
}

#[test]
fn credit_limits_what_the_guest_gets() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.host_event();
    g.host_event();
    let port = g.received()[0].0.src_port;
    // The guest accepts with only 8 bytes of buffer.
    let mut resp = guest_hdr(OP_RESPONSE, 1024, port);
    resp.buf_alloc = 8;
    g.send(resp, &[]);
    read_line(&mut host);

    host.write_all(&[7u8; 20]).unwrap();
    g.host_event();
    let got: usize = g.received().iter().map(|p| p.1.len()).sum();
    assert_eq!(got, 8, "no more than the guest's credit");
    g.host_event();
    assert!(g.received().is_empty());

    // The guest consumed 8 bytes and says so.
    let mut upd = guest_hdr(OP_CREDIT_UPDATE, 1024, port);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    g.send(upd, &[]);
    g.host_event();
    let got: usize = g.received().iter().map(|p| p.1.len()).sum();
    assert_eq!(got, 8);

    // A credit request is answered with our counters.
    let mut req = guest_hdr(OP_CREDIT_REQUEST, 1024, port);
    req.buf_alloc = 8;
    req.fwd_cnt = 16;
    g.send(req, &[]);
    // It is answered with our counters, and the fresh credit lets the last
    // 4 bytes through.
    let pkts = g.received();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!(
        ({ pkts[0].0.op }, { pkts[0].0.buf_alloc }),
        (OP_CREDIT_UPDATE, CONN_BUF)
    );
    assert_eq!(({ pkts[1].0.op }, pkts[1].1.len()), (OP_RW, 4));
}

#[test]
fn guest_overrunning_our_buffer_is_reset() {
    let mut g = Guest::new();
    let (mut host, port) = host_connect(&mut g);
    // Nobody reads the host side. The guest sends exactly the credit it is
    // given, tracking our fwd_cnt as it arrives (the host socket absorbs
    // some, and we say so): never a reset, however full we are.
    let mut sent: u32 = 0;
    let mut fwd_cnt: u32 = 0;
    let mut rounds = 0;
    loop {
        let credit = CONN_BUF - sent.wrapping_sub(fwd_cnt);
        if credit == 0 {
            break;
        }
        rounds += 1;
        assert!(rounds < 100, "the host socket never filled up");
        let n = credit.min(60 * 1024);
        g.send(guest_hdr(OP_RW, 1024, port), &vec![1u8; n as usize]);
        sent += n;
        for (h, _) in g.received() {
            assert_eq!({ h.op }, OP_CREDIT_UPDATE, "after {sent} bytes");
            fwd_cnt = h.fwd_cnt;
        }
    }
    // One byte past the credit: reset at once.
    g.send(guest_hdr(OP_RW, 1024, port), &[1]);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let rst = pkts[0].0;
    assert_eq!(
        ({ rst.op }, { rst.src_port }, { rst.dst_port }),
        (OP_RST, port, 1024)
    );
    // The host side is closed; what it had not taken is dropped.
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(
        (fwd_cnt as usize..sent as usize).contains(&got.len()),
        "host got {} of {sent} bytes, {fwd_cnt} announced",
        got.len()
    );
    // The connection is gone: more data is refused.
    g.send(guest_hdr(OP_RW, 1024, port), b"x");
    assert_eq!({ g.received()[0].0.op }, OP_RST);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_5000", g.uds().display())).unwrap();
    g.send(guest_hdr(OP_REQUEST, 7777, 5000), &[]);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    let r = pkts[0].0;
    assert_eq!(
        ({ r.op }, { r.src_port }, { r.dst_port }),
        (OP_RESPONSE, 5000, 7777)
    );
    let (mut conn, _) = listener.accept().unwrap();
    g.send(guest_hdr(OP_RW, 7777, 5000), b"from guest");
    let mut b = [0u8; 10];
    conn.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"from guest");
    conn.write_all(b"back").unwrap();
    g.host_event();
    let pkts = g.received();
    assert_eq!(pkts[0].1, b"back");
}

#[test]
fn connecting_to_nothing_is_refused() {
    let mut g = Guest::new();
    g.send(guest_hdr(OP_REQUEST, 7777, 6000), &[]);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!({ pkts[0].0.op }, OP_RST);
    // Data on a connection that does not exist is answered with RST too.
    g.send(guest_hdr(OP_RW, 7777, 6000), b"x");
    assert_eq!({ g.received()[0].0.op }, OP_RST);
    // A bad CONNECT line closes the host stream.
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"HELLO\n").unwrap();
    g.host_event();
    g.host_event();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert!(g.received().is_empty());
}

#[test]
fn resets_and_shutdowns_close_the_host_side() {
    let mut g = Guest::new();
    let (mut host, port) = host_connect(&mut g);
    g.send(guest_hdr(OP_RST, 1024, port), &[]);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "EOF after RST");

    // The host closing makes the device send SHUTDOWN; the guest's RST ends it.
    let (host, port) = host_connect(&mut g);
    drop(host);
    g.host_event();
    let pkts = g.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(({ pkts[0].0.op }, { pkts[0].0.flags }), (OP_SHUTDOWN, 3));
    g.send(guest_hdr(OP_RST, 1024, port), &[]);
    assert!(g.received().is_empty(), "no RST answers an RST");

    // Packets from a wrong CID are refused.
    let mut h = guest_hdr(OP_REQUEST, 1, 2);
    h.src_cid = 99;
    g.send(h, &[]);
    assert_eq!({ g.received()[0].0.op }, OP_RST);
    let _ = Header::default().as_slice();
}
