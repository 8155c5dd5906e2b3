//! The host side of hybrid vsock, Firecracker's protocol: one listening Unix
//! socket for host-initiated connections (`CONNECT <port>\n`, answered with
//! `OK <host port>\n` once the guest accepts), and `<uds>_<port>` sockets
//! that guest-initiated connections are forwarded to.
//!
//! Flow control is the virtio-vsock credit scheme: we advertise
//! [`CONN_BUF`] bytes of buffer per connection and never send the guest more
//! than it advertised. A guest that sends more than the credit we gave it
//! (judged by the `fwd_cnt` it last received from us, not by how fast the
//! host side happens to drain) is reset, as Firecracker does; that also
//! bounds what we buffer for it.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;

/// Receive buffer we advertise per connection.
pub const CONN_BUF: u32 = 256 * 1024;
/// First port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most connections at once; more are refused.
const MAX_CONNS: usize = 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// We sent SHUTDOWN and wait for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest-to-host bytes not yet written to the host socket.
    tx_buf: VecDeque<u8>,
    /// Bytes we forwarded to the host (our `fwd_cnt`).
    fwd_cnt: u32,
    fwd_cnt_announced: u32,
    /// The `fwd_cnt` in the last packet the guest received: its credit
    /// is [`CONN_BUF`] bytes past it.
    fwd_cnt_told: u32,
    /// Guest-to-host payload bytes received (the guest's `tx_cnt`).
    guest_tx_cnt: u32,
    /// Host-to-guest bytes sent (our `tx_cnt` in the guest's terms).
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    readable: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Conn {
            stream,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_announced: 0,
            fwd_cnt_told: 0,
            guest_tx_cnt: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            interest: EventSet::empty(),
        }
    }

    /// Whether `len` more bytes from the guest stay within the credit we
    /// gave it.
    fn within_our_credit(&self, len: usize) -> bool {
        let in_flight = self.guest_tx_cnt.wrapping_sub(self.fwd_cnt_told);
        u32::try_from(len)
            .ok()
            .and_then(|len| in_flight.checked_add(len))
            .is_some_and(|n| n <= CONN_BUF)
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Clone, Copy)]
enum FdOwner {
    Listener,
    Pending,
    Conn(Key),
}

/// The host side of the device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    pending: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    owners: HashMap<RawFd, FdOwner>,
    control: VecDeque<Header>,
    next_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            epoll,
            conns: HashMap::new(),
            pending: HashMap::new(),
            owners: HashMap::new(),
            control: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
        };
        let fd = m.listener.as_raw_fd();
        m.watch(fd, EventSet::IN, FdOwner::Listener)?;
        Ok(m)
    }

    /// The epoll fd that becomes readable when any host socket is ready.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open (tests, limits).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, ev: EventSet, owner: FdOwner) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))?;
        self.owners.insert(fd, owner);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.owners.remove(&fd);
    }

    fn header(&self, op: u16, key: Key, flags: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn push_control(&mut self, op: u16, key: Key, flags: u32) {
        let h = self.header(op, key, flags);
        self.control.push_back(h);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(c.stream.as_raw_fd());
        }
    }

    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.push_control(OP_RST, key, 0);
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        let (op, src_cid, dst_cid, type_) = (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.type_);
        if src_cid != self.guest_cid || dst_cid != HOST_CID || type_ != TYPE_STREAM {
            if op != OP_RST {
                self.push_control(OP_RST, key, 0);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match op {
            OP_REQUEST => self.guest_connect(key, hdr),
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => {
                    c.state = State::Established;
                    c.tx_buf.extend(format!("OK {}\n", key.0).as_bytes());
                    // The reply is ours, not guest data: it does not count
                    // towards the guest's credit.
                    c.fwd_cnt = c.fwd_cnt.wrapping_sub(c.tx_buf.len() as u32);
                    c.fwd_cnt_announced = c.fwd_cnt;
                    self.flush(key);
                }
                _ => self.reset(key),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.push_control(OP_RST, key, 0);
                    return;
                };
                if c.state != State::Established || !c.within_our_credit(payload.len()) {
                    self.reset(key);
                    return;
                }
                c.guest_tx_cnt = c.guest_tx_cnt.wrapping_add(payload.len() as u32);
                c.tx_buf.extend(payload);
                self.flush(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.push_control(OP_CREDIT_UPDATE, key, 0);
                }
            }
            OP_SHUTDOWN => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.reset(key);
                } else if let Some(c) = self.conns.get_mut(&key) {
                    if hdr.flags & SHUTDOWN_SEND != 0 {
                        let _ = c.flush();
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            OP_RST => self.remove(key),
            _ => self.reset(key),
        }
        self.update_interest(key);
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.push_control(OP_RST, key, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let stream = match UnixStream::connect(&path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(_) => {
                self.push_control(OP_RST, key, 0);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let mut c = Conn::new(stream, State::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, c);
        if self
            .watch(fd, EventSet::empty(), FdOwner::Conn(key))
            .is_err()
        {
            self.reset(key);
            return;
        }
        self.push_control(OP_RESPONSE, key, 0);
    }

    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.flush().is_err() {
            self.reset(key);
            return;
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_announced) >= CONN_BUF / 2 {
            c.fwd_cnt_announced = c.fwd_cnt;
            self.push_control(OP_CREDIT_UPDATE, key, 0);
        }
    }

    fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut ev = EventSet::empty();
        if c.state == State::Established && !c.readable && c.peer_credit() > 0 {
            ev |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !c.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        if ev != c.interest {
            c.interest = ev;
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64));
        }
    }

    /// Handles whatever host sockets are ready (call when [`Self::epoll_fd`]
    /// is readable).
    pub fn process_host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for e in &events[..n] {
            let fd = e.fd();
            let set = e.event_set();
            match self.owners.get(&fd).copied() {
                Some(FdOwner::Listener) => self.accept(),
                Some(FdOwner::Pending) => self.read_connect_line(fd),
                Some(FdOwner::Conn(key)) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
                        {
                            c.readable = true;
                        }
                    }
                    if set.contains(EventSet::OUT) {
                        self.flush(key);
                    }
                    self.update_interest(key);
                }
                None => {}
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            if s.set_nonblocking(true).is_err() || self.pending.len() >= MAX_CONNS {
                continue;
            }
            let fd = s.as_raw_fd();
            self.pending.insert(fd, (s, Vec::new()));
            if self.watch(fd, EventSet::IN, FdOwner::Pending).is_err() {
                self.pending.remove(&fd);
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some((s, line)) = self.pending.get_mut(&fd) else {
            return;
        };
        // One byte at a time: whatever follows the newline is the guest's.
        let mut b = [0u8; 1];
        let done = loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break Some(true),
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break Some(false),
            }
        };
        let Some(ok) = done else { return };
        self.unwatch(fd);
        let Some((stream, line)) = self.pending.remove(&fd) else {
            return;
        };
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (Some(guest_port), true) = (port, ok) else {
            // Dropping the stream tells the host client no.
            return;
        };
        if self.conns.len() >= MAX_CONNS {
            return;
        }
        let host_port = self.alloc_port(guest_port);
        let key = (host_port, guest_port);
        let sfd = stream.as_raw_fd();
        self.conns.insert(key, Conn::new(stream, State::Connecting));
        if self
            .watch(sfd, EventSet::empty(), FdOwner::Conn(key))
            .is_err()
        {
            self.remove(key);
            return;
        }
        self.push_control(OP_REQUEST, key, 0);
    }

    fn alloc_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// The next packet for the guest that fits `room` payload bytes: control
    /// packets first, then data from connections with credit.
    pub fn next_rx(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        let (h, payload) = self.next_packet(room)?;
        // The guest is about to see this fwd_cnt: it sets its credit.
        if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
            c.fwd_cnt_told = h.fwd_cnt;
        }
        Some((h, payload))
    }

    fn next_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.readable && c.state == State::Established)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = room.min(MAX_PAYLOAD).min(c.peer_credit() as usize);
            if want == 0 {
                c.readable = false;
                self.update_interest(key);
                continue;
            }
            let mut buf = vec![0u8; want];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    // The host closed: tell the guest, wait for its RST.
                    c.state = State::Closing;
                    c.readable = false;
                    self.push_control(OP_SHUTDOWN, key, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    self.update_interest(key);
                    return self.control.pop_front().map(|h| (h, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let mut h = self.header(OP_RW, key, 0);
                    h.len = n as u32;
                    return Some((h, buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.readable = false;
                    self.update_interest(key);
                }
                Err(_) => self.reset(key),
            }
        }
        None
    }

    /// Whether [`Self::next_rx`] may have something.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.readable && c.state == State::Established && c.peer_credit() > 0)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
