//! virtio-fs against a real `virtiofsd`: the device is brought up through
//! the virtio-mmio registers the way Linux's driver does it, FUSE requests
//! go on the request queue, virtiofsd (a separate process mapping our
//! memfd guest memory) answers them, and its call eventfd becomes the
//! device's used-ring interrupt.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nutshell_vmm::devices::bus::BusDevice;
use nutshell_vmm::devices::virtio::fs::{Fs, QUEUE_SIZE};
use nutshell_vmm::devices::virtio::mmio::{reg, status, MmioTransport};
use nutshell_vmm::devices::virtio::{INT_VRING, TYPE_FS, VIRTIO_F_VERSION_1};
use nutshell_vmm::vstate::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common;
use common::require;

const FILE_NAME: &str = "hello.txt";
const FILE_BODY: &[u8] = b"hello from the host, through virtiofsd\n";
const QSIZE: u16 = 16;
const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const ROOT_NODE: u64 = 1;

/// virtiofsd where `tools/setup.sh` or a distribution puts it, or on PATH.
fn virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    [
        "/usr/local/bin",
        "/usr/libexec",
        "/usr/lib/qemu",
        "/usr/bin",
    ]
    .iter()
    .map(PathBuf::from)
    .chain(std::env::split_paths(&path))
    .map(|d| d.join("virtiofsd"))
    .find(|p| p.is_file())
}

fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    require(root, "virtiofsd's sandbox needs root")
        && require(
            virtiofsd().is_some(),
            "virtiofsd is not installed (tools/setup.sh installs it)",
        )
}

/// A running virtiofsd sharing a directory with one file; killed on drop.
struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Virtiofsd {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// `--sandbox none` keeps virtiofsd one process, so that killing and
    /// reaping it closes its end of the socket (the default namespace
    /// sandbox serves from a forked child that dies a little later).
    fn start_unsandboxed() -> Self {
        Self::start_with(&["--sandbox", "none"])
    }

    fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join(FILE_NAME), FILE_BODY).unwrap();
        let socket = dir.path().join("fs.sock");
        let child = Command::new(virtiofsd().unwrap())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--cache", "never", "--rlimit-nofile", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "virtiofsd made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Virtiofsd {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A split queue laid out by hand in guest memory.
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

    /// Adds a chain of (addr, len, device-writable) and makes it available.
    fn push(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags: u16 = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj((idx + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // used_event (VIRTIO_RING_F_EVENT_IDX is negotiated): interrupt me
        // once the device has used past what I have seen.
        mem.write_obj(
            self.seen_used,
            GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE)),
        )
        .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The next used entry (id, len), if the device added one.
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.seen_used {
            return None;
        }
        let slot = u64::from(self.seen_used % QSIZE);
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

/// The guest side: the transport programmed through its registers, guest
/// memory, and the rings of hiprio (0) and the request queue (1).
struct Guest {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    calls: Vec<RawFd>,
    rings: [Ring; 2],
    unique: u64,
}

impl Guest {
    fn new(socket: &Path) -> Self {
        let mem = create_guest_memory(16 << 20).unwrap();
        let fs = Fs::new("nutshell", socket).unwrap();
        let calls = fs.call_evts().iter().map(|e| e.as_raw_fd()).collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(fs), mem.clone(), irq).unwrap();
        Guest {
            t,
            mem,
            calls,
            rings: [Ring::at(0x1_0000), Ring::at(0x2_0000)],
            unique: 0,
        }
    }

    fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        lo | u64::from(self.read(reg::DEVICE_FEATURES)) << 32
    }

    /// What Linux's virtio-mmio + virtio-fs drivers do, with fresh rings at
    /// `bases`.
    fn bring_up(&mut self, bases: [u64; 2]) {
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let f = self.features();
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        assert_ne!(self.read(reg::STATUS) & status::FEATURES_OK, 0);
        for (i, base) in bases.into_iter().enumerate() {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            self.rings[i] = Ring::at(base);
            let r = &self.rings[i];
            let (d, a, u) = (r.desc, r.avail, r.used);
            self.write(reg::QUEUE_SEL, i as u32);
            assert_eq!(self.read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            self.write(reg::QUEUE_NUM, u32::from(QSIZE));
            for (lo, hi, v) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, d),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, a),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, u),
            ] {
                self.write(lo, v as u32);
                self.write(hi, (v >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, s | status::DRIVER_OK);
        assert!(self.t.is_activated(), "the device did not activate");
        assert_eq!(self.read(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    /// Sends one FUSE request on the request queue and returns the reply's
    /// header (len, error, unique) and body. Fails after 10 s.
    fn fuse(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: u32,
    ) -> (u32, i32, u64, Vec<u8>) {
        const IN: u64 = 0x10_0000;
        const OUT_HDR: u64 = 0x11_0000;
        const OUT_BODY: u64 = 0x11_1000;
        self.unique += 2;
        let len = 40 + body.len() as u32;
        let mut req = Vec::new();
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(IN)).unwrap();
        self.mem
            .write_slice(
                &vec![0xaau8; 16 + reply_len as usize],
                GuestAddress(OUT_HDR),
            )
            .unwrap();
        let head = self.rings[1].push(
            &self.mem,
            &[
                (IN, len, false),
                (OUT_HDR, 16, true),
                (OUT_BODY, reply_len, true),
            ],
        );
        // The guest's QueueNotify write: KVM turns it into the ioeventfd
        // that virtiofsd now watches (here the transport writes it).
        self.write(reg::QUEUE_NOTIFY, 1);
        self.wait_call(1);
        let (id, used_len) = self.rings[1].pop_used(&self.mem).expect("no used entry");
        assert_eq!(id, u32::from(head));
        let hdr_len: u32 = self.mem.read_obj(GuestAddress(OUT_HDR)).unwrap();
        let error: i32 = self.mem.read_obj(GuestAddress(OUT_HDR + 4)).unwrap();
        let unique: u64 = self.mem.read_obj(GuestAddress(OUT_HDR + 8)).unwrap();
        assert_eq!(used_len, hdr_len, "used length is the reply's length");
        let mut out = vec![0u8; hdr_len.saturating_sub(16) as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(OUT_BODY))
            .unwrap();
        assert_eq!(unique, self.unique);
        (hdr_len, error, unique, out)
    }

    /// Waits for virtiofsd's call eventfd of `queue`, then runs what the
    /// event loop runs for it and checks that the guest got a used-ring
    /// interrupt.
    fn wait_call(&mut self, queue: usize) {
        let fd = self.calls[queue];
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length we pass.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(n, 1, "virtiofsd did not signal queue {queue} within 10 s");
        self.t.interrupt().ack(u32::MAX);
        self.t.handle_host_event(fd, EventSet::IN);
        assert_eq!(self.read(reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING);
        assert!(self.t.interrupt().irqfd().read().unwrap() >= 1);
        self.write(reg::INTERRUPT_ACK, INT_VRING);
    }

    fn init(&mut self) -> (i32, u32) {
        let mut body = Vec::new();
        for v in [7u32, 31, 128 << 10, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (_, error, _, out) = self.fuse(FUSE_INIT, 0, &body, 64);
        let major = if out.len() >= 4 {
            u32::from_le_bytes(out[..4].try_into().unwrap())
        } else {
            0
        };
        (error, major)
    }

    /// LOOKUP of `name` in the root: (error, size from the attributes).
    fn lookup(&mut self, name: &str) -> (i32, u64) {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (_, error, _, out) = self.fuse(FUSE_LOOKUP, ROOT_NODE, &body, 128);
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid,
        // two u32 nsecs, then fuse_attr { ino, size, ... }.
        let size = if out.len() >= 56 {
            u64::from_le_bytes(out[48..56].try_into().unwrap())
        } else {
            0
        };
        (error, size)
    }
}

#[test]
fn fuse_init_and_lookup_through_a_real_virtiofsd() {
    if !prerequisites() {
        return;
    }
    let daemon = Virtiofsd::start();
    let mut g = Guest::new(&daemon.socket);
    assert_eq!(g.read(reg::DEVICE_ID), TYPE_FS);
    let f = g.features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(
        f & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES reached the guest"
    );
    let mut cfg = [0u8; 40];
    g.t.read(reg::CONFIG, &mut cfg);
    assert_eq!(&cfg[..9], b"nutshell\0");
    assert_eq!(u32::from_le_bytes(cfg[36..].try_into().unwrap()), 1);

    g.bring_up([0x1_0000, 0x2_0000]);
    let (error, major) = g.init();
    assert_eq!((error, major), (0, 7), "FUSE_INIT reply");
    let (error, size) = g.lookup(FILE_NAME);
    assert_eq!(error, 0);
    assert_eq!(size, FILE_BODY.len() as u64);
    let (error, _) = g.lookup("no-such-file");
    assert_eq!(error, -libc::ENOENT);

    // Many requests through the 16-entry ring: indexes wrap, chains wrap
    // around the descriptor table, EVENT_IDX keeps asking for interrupts.
    let n = 500;
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(g.lookup(FILE_NAME), (0, FILE_BODY.len() as u64));
    }
    let each = started.elapsed() / n;
    eprintln!("FUSE_LOOKUP round trip through virtiofsd: {each:?} on average over {n}");
}

/// The event loop's side: a backend that exits is noticed by its socket's
/// hang-up, without any guest activity.
#[test]
fn the_event_loop_notices_a_backend_that_exits() {
    use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
    use nutshell_vmm::devices::virtio::VirtioDevice;
    use std::sync::{Arc, Mutex};

    struct Sub(Fs);
    impl MutEventSubscriber for Sub {
        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            self.0.host_event(events.fd(), events.event_set());
        }
        fn init(&mut self, ops: &mut EventOps) {
            self.0.init_host_events(ops);
        }
    }

    if !prerequisites() {
        return;
    }
    let mut daemon = Virtiofsd::start_unsandboxed();
    let sub = Arc::new(Mutex::new(
        Sub(Fs::new("nutshell", &daemon.socket).unwrap()),
    ));
    let mut events = EventManager::<Arc<Mutex<Sub>>>::new().unwrap();
    events.add_subscriber(sub.clone());
    events.run_with_timeout(10).unwrap();
    assert!(!sub.lock().unwrap().0.is_broken());
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sub.lock().unwrap().0.is_broken() {
        assert!(Instant::now() < deadline, "the hang-up was not noticed");
        events.run_with_timeout(100).unwrap();
    }
}

#[test]
fn reset_and_reactivation_keep_working() {
    if !prerequisites() {
        return;
    }
    let daemon = Virtiofsd::start();
    let mut g = Guest::new(&daemon.socket);
    g.bring_up([0x1_0000, 0x2_0000]);
    assert_eq!(g.init(), (0, 7));

    // The driver resets the device (module reload, kexec, ...) and brings
    // it up again on rings elsewhere.
    g.write(reg::STATUS, 0);
    assert!(!g.t.is_activated());
    g.bring_up([0x4_0000, 0x5_0000]);
    // A driver that probes again starts its FUSE session again.
    assert_eq!(g.init(), (0, 7));
    let (error, size) = g.lookup(FILE_NAME);
    assert_eq!((error, size), (0, FILE_BODY.len() as u64));
}

#[test]
fn a_backend_that_dies_stops_the_device_not_the_vmm() {
    if !prerequisites() {
        return;
    }
    let mut daemon = Virtiofsd::start_unsandboxed();
    let mut g = Guest::new(&daemon.socket);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    // Activation now fails: the device asks for a reset instead of
    // running, and nothing hangs or panics.
    let started = Instant::now();
    g.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let f = g.features();
    g.write(reg::DRIVER_FEATURES_SEL, 0);
    g.write(reg::DRIVER_FEATURES, f as u32);
    g.write(reg::DRIVER_FEATURES_SEL, 1);
    g.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    g.write(reg::STATUS, s);
    for i in 0..2u32 {
        g.write(reg::QUEUE_SEL, i);
        g.write(reg::QUEUE_NUM, u32::from(QSIZE));
        g.write(reg::QUEUE_DESC_LOW, 0x1_0000 * (i + 1));
        g.write(reg::QUEUE_DRIVER_LOW, 0x1_0000 * (i + 1) + 0x1000);
        g.write(reg::QUEUE_DEVICE_LOW, 0x1_0000 * (i + 1) + 0x2000);
        g.write(reg::QUEUE_READY, 1);
    }
    g.write(reg::STATUS, s | status::DRIVER_OK);
    assert!(!g.t.is_activated());
    assert_ne!(g.read(reg::STATUS) & status::NEEDS_RESET, 0);
    g.write(reg::STATUS, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `mov dword [reg + disp32], imm32` with reg = rcx (0x81) or rbx (0x83).
fn store(c: &mut Vec<u8>, modrm: u8, disp: u32, imm: u32) {
    c.extend_from_slice(&[0xc7, modrm]);
    c.extend_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(&imm.to_le_bytes());
}

/// A CPL3 virtio-fs "driver": lays out the request queue's rings and a
/// FUSE_INIT request at 2 MiB, brings the device up through its MMIO
/// window, notifies queue 1 (an ioeventfd that virtiofsd reads), spins
/// until the used ring moves and then until InterruptStatus shows the
/// used-ring bit (virtiofsd's call eventfd, forwarded by our event loop),
/// prints InterruptStatus, the reply's error, unique, major and length,
/// resets the device (GET_VRING_BASE on the socket) and then the VM. It
/// first spins a while, so that all of this happens under the seccomp
/// filter, which the VMM installs just after starting the vCPUs.
fn fs_driver_payload() -> Vec<u8> {
    const RC: u8 = 0x81;
    const RB: u8 = 0x83;
    let mut c = vec![0xb9, 0x00, 0x00, 0x00, 0x10]; // mov ecx, 0x10000000
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz back
    c.extend_from_slice(&[0xb9, 0x00, 0x00, 0x20, 0x00]); // mov ecx, 0x200000
                                                          // Queue 1 (0x210000): in (FUSE_INIT), out header, out fuse_init_out.
    for (d, addr, len, flags_next) in [
        (0u32, 0x22_0000u32, 56u32, 1 | 1 << 16),
        (1, 0x22_1000, 16, 3 | 2 << 16),
        (2, 0x22_2000, 64, 2),
    ] {
        store(&mut c, RC, 0x1_0000 + 16 * d, addr);
        store(&mut c, RC, 0x1_0008 + 16 * d, len);
        store(&mut c, RC, 0x1_000c + 16 * d, flags_next);
    }
    store(&mut c, RC, 0x1_1000, 1 << 16); // avail.idx = 1, ring[0] = 0
    for (off, v) in [(0, 56), (4, FUSE_INIT), (8, 0x1234), (40, 7), (44, 31)] {
        store(&mut c, RC, 0x2_0000 + off, v);
    }
    c.extend_from_slice(&[0xbb, 0x00, 0x00, 0x00, 0xd0]); // mov ebx, 0xd0000000
    let mut regs = vec![(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x24, 0)];
    regs.extend([(0x20, 0), (0x70, 0xb)]);
    for (q, base) in [(0u32, 0x20_0000u32), (1, 0x21_0000)] {
        regs.extend([(0x30, q), (0x38, u32::from(QSIZE)), (0x80, base)]);
        regs.extend([(0x90, base + 0x1000), (0xa0, base + 0x2000), (0x44, 1)]);
    }
    regs.extend([(0x70, 0xf), (0x50, 1)]);
    for (off, v) in regs {
        store(&mut c, RB, off, v);
    }
    c.extend_from_slice(&[0xb9, 0x02, 0x20, 0x21, 0x00]); // mov ecx, 0x212002 (used.idx)
    c.extend_from_slice(&[0x0f, 0xb7, 0x01, 0x85, 0xc0, 0x74, 0xf9]); // spin while 0
    c.extend_from_slice(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xa8, 0x01, 0x74, 0xf6]); // spin on INT_VRING
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend_from_slice(&[0x8b, 0x83, 0x60, 0, 0, 0, 0xee]); // InterruptStatus
    c.extend_from_slice(&[0xb9, 0x00, 0x10, 0x22, 0x00]); // mov ecx, 0x221000
    c.extend_from_slice(&[0x8b, 0x41, 0x04, 0xee]); // error
    c.extend_from_slice(&[0x8b, 0x41, 0x08, 0xee]); // unique
    c.extend_from_slice(&[0x8b, 0x81, 0x00, 0x10, 0, 0, 0xee]); // major
    c.extend_from_slice(&[0x8b, 0x01, 0xee]); // len
    c.extend_from_slice(&[0xb0, 0x0a, 0xee]); // '\n'
    store(&mut c, RB, 0x70, 0); // device reset
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // VM reset
    c
}

/// The binary with its seccomp filter on: virtio-fs's activation (vhost-user
/// requests on the socket), virtiofsd's kick and call eventfds and the
/// interrupt forwarding all work from a guest, and the VM ends with the
/// guest's reset, not SIGSYS.
#[test]
fn hardened_binary_serves_a_guest_fuse_init_through_virtiofsd() {
    if !prerequisites() || !require(common::kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let daemon = Virtiofsd::start();
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("fs-driver.bin");
    std::fs::write(&code, fs_driver_payload()).unwrap();
    let serial = dir.path().join("serial.log");
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .arg("--payload")
        .arg(&code)
        .args(["--memory-mib", "32", "--timeout-ms", "20000", "--fs"])
        .arg(format!("nutshell,{}", daemon.socket.display()))
        .arg("--serial")
        .arg(&serial)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let got = std::fs::read(&serial).unwrap();
    // InterruptStatus, error 0, unique 0x34, major 7, reply length 80.
    assert_eq!(got, [INT_VRING as u8, 0, 0x34, 7, 80, b'\n'], "{stderr}");
    assert!(!stderr.contains("virtio-fs"), "the reset failed: {stderr}");
}

#[test]
fn the_binary_names_a_missing_virtiofsd_socket() {
    // Devices are created after the VM: the socket error needs a KVM first.
    if !require(common::kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .args([
            "--payload",
            "/dev/null",
            "--fs",
            "nutshell,/nonexistent/fs.sock",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/fs.sock"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .args(["--payload", "/dev/null", "--fs", "nutshell"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<tag>,<socket>"));

    // The JSON config's "fs" list reaches the same device.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    let json = r#"{"payload": "/dev/null", "fs": [{"tag": "nutshell", "socket": "/nonexistent/json-fs.sock"}]}"#;
    std::fs::write(&cfg, json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/json-fs.sock"), "{stderr}");
    let json = r#"{"payload": "/dev/null", "fs": [{"tag": "", "socket": "/x.sock"}]}"#;
    std::fs::write(&cfg, json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 to 36 bytes"), "{stderr}");
}
