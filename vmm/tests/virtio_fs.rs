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
use nutshell_vmm::devices::virtio::mmio::{reg, status};
use nutshell_vmm::devices::virtio::test_utils::{Driver, Ring};
use nutshell_vmm::devices::virtio::{INT_VRING, TYPE_FS, VIRTIO_F_VERSION_1};
use nutshell_vmm::vstate::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

mod common;
use common::payload::{bring_up_regs, Asm};
use common::{is_root, kvm_usable, require, run_config, run_payload};

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
    require(is_root(), "virtiofsd's sandbox needs root")
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

/// The guest side: the transport programmed through its registers, guest
/// memory, and the rings of hiprio (0) and the request queue (1).
struct Guest {
    d: Driver,
    calls: Vec<RawFd>,
    rings: [Ring; 2],
    unique: u64,
}

impl Guest {
    fn new(socket: &Path) -> Self {
        let mem = create_guest_memory(16 << 20).unwrap();
        let fs = Fs::new("nutshell", socket).unwrap();
        let calls = fs.call_evts().iter().map(|e| e.as_raw_fd()).collect();
        Guest {
            d: Driver::new(Box::new(fs), mem),
            calls,
            rings: [Ring::at(0x1_0000, QSIZE), Ring::at(0x2_0000, QSIZE)],
            unique: 0,
        }
    }

    /// What Linux's virtio-mmio + virtio-fs drivers do, with fresh rings at
    /// `bases`.
    fn bring_up(&mut self, bases: [u64; 2]) {
        let f = self.d.device_features();
        assert!(self.d.negotiate(f));
        for (i, base) in bases.into_iter().enumerate() {
            self.d
                .mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            self.rings[i] = Ring::at(base, QSIZE);
            let max = self.d.setup_queue(i as u32, &self.rings[i]);
            assert_eq!(max, u32::from(QUEUE_SIZE));
        }
        self.d.driver_ok();
        assert!(
            self.d.transport.is_activated(),
            "the device did not activate"
        );
        assert_eq!(self.d.read(reg::STATUS) & status::NEEDS_RESET, 0);
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
        self.d.mem.write_slice(&req, GuestAddress(IN)).unwrap();
        self.d
            .mem
            .write_slice(
                &vec![0xaau8; 16 + reply_len as usize],
                GuestAddress(OUT_HDR),
            )
            .unwrap();
        let head = self.rings[1].push(
            &self.d.mem,
            &[
                (IN, len, false),
                (OUT_HDR, 16, true),
                (OUT_BODY, reply_len, true),
            ],
        );
        // The guest's QueueNotify write: KVM turns it into the ioeventfd
        // that virtiofsd now watches (here the transport writes it).
        self.d.write(reg::QUEUE_NOTIFY, 1);
        self.wait_call(1);
        let (id, used_len) = self.rings[1].pop_used(&self.d.mem).expect("no used entry");
        assert_eq!(id, u32::from(head));
        let hdr_len: u32 = self.d.mem.read_obj(GuestAddress(OUT_HDR)).unwrap();
        let error: i32 = self.d.mem.read_obj(GuestAddress(OUT_HDR + 4)).unwrap();
        let unique: u64 = self.d.mem.read_obj(GuestAddress(OUT_HDR + 8)).unwrap();
        assert_eq!(used_len, hdr_len, "used length is the reply's length");
        let mut out = vec![0u8; hdr_len.saturating_sub(16) as usize];
        self.d
            .mem
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
        self.d.transport.interrupt().ack(u32::MAX);
        self.d.transport.handle_host_event(fd, EventSet::IN);
        assert_eq!(self.d.read(reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING);
        assert!(self.d.transport.interrupt().irqfd().read().unwrap() >= 1);
        self.d.write(reg::INTERRUPT_ACK, INT_VRING);
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
    assert_eq!(g.d.read(reg::DEVICE_ID), TYPE_FS);
    let f = g.d.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(
        f & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES reached the guest"
    );
    let mut cfg = [0u8; 40];
    g.d.transport.read(reg::CONFIG, &mut cfg);
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
    g.d.write(reg::STATUS, 0);
    assert!(!g.d.transport.is_activated());
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
    let f = g.d.device_features();
    g.d.negotiate(f);
    for (i, base) in [0x1_0000, 0x2_0000].into_iter().enumerate() {
        g.d.setup_queue(i as u32, &Ring::at(base, QSIZE));
    }
    g.d.driver_ok();
    assert!(!g.d.transport.is_activated());
    assert_ne!(g.d.read(reg::STATUS) & status::NEEDS_RESET, 0);
    g.d.write(reg::STATUS, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
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
    let mut c = Asm::new();
    c.delay().mov_ecx(0x20_0000);
    // Queue 1 (0x210000): in (FUSE_INIT), out header, out fuse_init_out.
    for (d, addr, len, flags_next) in [
        (0u32, 0x22_0000u32, 56u32, 1 | 1 << 16),
        (1, 0x22_1000, 16, 3 | 2 << 16),
        (2, 0x22_2000, 64, 2),
    ] {
        c.store_at_rcx(0x1_0000 + 16 * d, addr);
        c.store_at_rcx(0x1_0008 + 16 * d, len);
        c.store_at_rcx(0x1_000c + 16 * d, flags_next);
    }
    c.store_at_rcx(0x1_1000, 1 << 16); // avail.idx = 1, ring[0] = 0
    for (off, v) in [(0, 56), (4, FUSE_INIT), (8, 0x1234), (40, 7), (44, 31)] {
        c.store_at_rcx(0x2_0000 + off, v);
    }
    // VIRTIO_F_VERSION_1 (high half first); notify queue 1.
    let features = [(1, 1), (0, 0)];
    let regs = bring_up_regs(&features, QSIZE, &[0x20_0000, 0x21_0000], &[1]);
    c.mmio_writes(&regs);
    c.spin_while_zero_u16(0x21_2002) // queue 1's used.idx
        .spin_until_vring_interrupt()
        .serial()
        .print_interrupt_status();
    c.mov_ecx(0x22_1000) // the reply's header, its body 0x1000 further
        .print_u32_at_rcx(4) // error
        .print_u32_at_rcx(8) // unique
        .print_u32_at_rcx(0x1000) // major
        .print_u32_at_rcx(0) // len
        .print_byte(b'\n');
    c.mmio_write(reg::STATUS, 0).reset_vm(); // device reset, then the VM's
    c.code()
}

/// The binary with its seccomp filter on: virtio-fs's activation (vhost-user
/// requests on the socket), virtiofsd's kick and call eventfds and the
/// interrupt forwarding all work from a guest, and the VM ends with the
/// guest's reset, not SIGSYS.
#[test]
fn hardened_binary_serves_a_guest_fuse_init_through_virtiofsd() {
    if !prerequisites() || !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let daemon = Virtiofsd::start();
    let fs = format!("nutshell,{}", daemon.socket.display());
    let (out, got) = run_payload(&fs_driver_payload(), &["--fs", &fs]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // InterruptStatus, error 0, unique 0x34, major 7, reply length 80.
    assert_eq!(got, [INT_VRING as u8, 0, 0x34, 7, 80, b'\n'], "{stderr}");
    assert!(!stderr.contains("virtio-fs"), "the reset failed: {stderr}");
}

#[test]
fn the_binary_names_a_missing_virtiofsd_socket() {
    // Devices are created after the VM: the socket error needs a KVM first.
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let out = common::vmm()
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
    let out = common::vmm()
        .args(["--payload", "/dev/null", "--fs", "nutshell"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<tag>,<socket>"));

    // The JSON config's "fs" list reaches the same device.
    let (code, stderr) = run_config(
        r#"{"payload": "/dev/null", "fs": [{"tag": "nutshell", "socket": "/nonexistent/json-fs.sock"}]}"#,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/json-fs.sock"), "{stderr}");
    let (_, stderr) =
        run_config(r#"{"payload": "/dev/null", "fs": [{"tag": "", "socket": "/x.sock"}]}"#);
    assert!(stderr.contains("1 to 36 bytes"), "{stderr}");
}
