//! nutshell-runc driven as Docker's runc shim and conmon drive runc: every
//! verb a new process, the container's stand-in reparented to us (this test
//! process is a child subreaper, as those callers are), real VMs (the test
//! backend, QEMU/TCG here) with a busybox rootfs.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use nutshell_runtime::hypervisor::qemu::QemuHypervisor;
use nutshell_tests::containerd::{guest_kernel_release, test_nutshell_config};
use nutshell_tests::netns::{http_get, TestNetns};
use nutshell_tests::{busybox_rootfs, guest_dir, is_root, processes_mentioning, require, run_ok};
use serde_json::{json, Value};

/// One VM at a time: a TCG guest wants a whole CPU here.
static VM_LOCK: Mutex<()> = Mutex::new(());
/// Longest a stand-in may take to end after its process was told to.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_AUDIT_WRITE",
];

/// A root of our own, a bundle with a busybox rootfs, and our turn.
struct Setup {
    _turn: MutexGuard<'static, ()>,
    tmp: tempfile::TempDir,
    root: PathBuf,
    bundle: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

fn setup() -> Option<Setup> {
    if !require(is_root(), "needs root (VMs, mounts, network namespaces)") {
        return None;
    }
    let kernel = guest_dir().join("vmlinux");
    if !require(
        kernel.is_file(),
        &format!(
            "needs {} (guest-image/build.sh --install)",
            kernel.display()
        ),
    ) {
        return None;
    }
    if let Err(e) = QemuHypervisor::discover() {
        if !require(
            false,
            &format!("needs QEMU and its vhost-user backends ({e})"),
        ) {
            return None;
        }
    }
    let turn = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    busybox_rootfs(&bundle.join("rootfs")).unwrap();
    let config = tmp.path().join("nutshell.toml");
    std::fs::write(&config, test_nutshell_config("")).unwrap();
    Some(Setup {
        _turn: turn,
        root: tmp.path().join("root"),
        log: tmp.path().join("log.json"),
        tmp,
        bundle,
        config,
    })
}

fn spec(args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS, "ambient": CAPS},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "runc-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]}
    })
}

impl Setup {
    fn write_spec(&self, spec: &Value) {
        std::fs::write(self.bundle.join("config.json"), spec.to_string()).unwrap();
    }

    fn runc(&self) -> Command {
        self.runc_with(&self.config)
    }

    fn runc_with(&self, config: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nutshell-runc"));
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json", "--config"])
            .arg(config)
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        run_ok(self.runc().args(args)).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.runc().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// `create` with stdio from `stdin`/files, as a shim passes pipes.
    fn create(&self, id: &str, stdout: &Path, stdin: Stdio) -> u32 {
        let pid_file = self.tmp.path().join(format!("{id}.pid"));
        let out = std::fs::File::create(stdout).unwrap();
        let err = out.try_clone().unwrap();
        let r = self
            .runc()
            .args(["create", "--bundle"])
            .arg(&self.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(stdin)
            .stdout(out)
            .stderr(err)
            .status()
            .unwrap();
        assert!(r.success(), "create failed: {}", self.log_text());
        std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts nothing of container `id` is left on the host.
    fn assert_clean(&self, id: &str) {
        assert!(!self.root.join(id).exists(), "state of {id} left");
        let leftovers: Vec<_> = processes_mentioning(&self.root.display().to_string())
            .into_iter()
            .filter(|(pid, _)| *pid != std::process::id())
            .collect();
        assert_eq!(leftovers, Vec::new(), "processes left");
        // Pod directories say whose they are; ours name our root.
        let root = std::fs::canonicalize(self.tmp.path()).unwrap();
        let ours: Vec<_> = std::fs::read_dir("/run/nutshell")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("owner.json"))
                    .is_ok_and(|o| o.contains(&root.display().to_string()))
            })
            .map(|e| e.path())
            .collect();
        assert_eq!(ours, Vec::<PathBuf>::new(), "pod directories left");
    }
}

/// A failed test still takes its containers down: their VMs, mounts and
/// pod directories outlive the temporary root otherwise.
impl Drop for Setup {
    fn drop(&mut self) {
        let Ok(out) = self.runc().args(["list", "-q"]).output() else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.runc().args(["delete", "--force", id]).status();
        }
    }
}

/// Waits for our reparented stand-in `pid` to end, as a subreaper does.
fn reap(pid: u32) -> WaitStatus {
    let deadline = Instant::now() + EXIT_DEADLINE;
    loop {
        match waitpid(
            Pid::from_raw(pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(s) => return s,
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    }
}

#[test]
fn the_lifecycle_follows_the_oci_runtime_spec() {
    let Some(s) = setup() else { return };
    let mut sp = spec(
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo started; while true; do sleep 0.1; done",
        ],
        false,
    );
    let cgroup = format!("/nutshell-runc-test-{}", std::process::id());
    sp["linux"]["cgroupsPath"] = json!(cgroup);
    // Each host-side hook leaves the state it was given.
    let hook = |kind: &str| {
        let file = s.tmp.path().join(format!("{kind}.json"));
        json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", file.display())]}])
    };
    sp["hooks"] = json!({
        "createRuntime": hook("createRuntime"),
        "prestart": hook("prestart"),
        "poststart": hook("poststart"),
        "poststop": hook("poststop"),
    });
    let hook_state = |kind: &str| -> Value {
        let text = std::fs::read_to_string(s.tmp.path().join(format!("{kind}.json")))
            .unwrap_or_else(|e| panic!("the {kind} hook did not run: {e}"));
        serde_json::from_str(&text).unwrap()
    };
    s.write_spec(&sp);
    let out = s.tmp.path().join("c1.out");
    let pid = s.create("c1", &out, Stdio::null());
    // The stand-in, and with it the VM, sits in the container's cgroup on
    // the host, where engines read stats.
    let memberships = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        memberships
            .lines()
            .any(|l| l.ends_with(&format!(":{cgroup}"))),
        "{memberships}"
    );
    let st = s.state("c1");
    assert_eq!(st["status"], "created");
    assert_eq!(st["pid"], pid);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the pid is a host process"
    );
    assert!(s.fails(&["delete", "c1"]).contains("it is created"));
    assert!(s
        .fails(&["create", "--bundle", s.bundle.to_str().unwrap(), "c1"])
        .contains("already exists"));

    for kind in ["createRuntime", "prestart"] {
        let st = hook_state(kind);
        assert_eq!(
            (&st["id"], &st["pid"]),
            (&json!("c1"), &json!(pid)),
            "{kind}"
        );
        assert_eq!(st["status"], "creating", "{kind}");
    }
    s.ok(&["start", "c1"]);
    assert_eq!(s.state("c1")["status"], "running");
    assert_eq!(hook_state("poststart")["status"], "running");
    assert!(s
        .fails(&["start", "c1"])
        .contains("only a created container starts"));
    let e = s.fails(&["delete", "c1"]);
    assert!(e.contains("it is running"), "{e}");
    assert_eq!(
        s.state("c1")["status"],
        "running",
        "a refused delete changes nothing"
    );

    // exec: its own process in the same container, in the guest.
    let uname = s.ok(&["exec", "c1", "uname", "-r"]);
    assert_eq!(Some(uname.trim().to_string()), guest_kernel_release());
    let ps: Vec<u32> = serde_json::from_str(&s.ok(&["ps", "--format", "json", "c1"])).unwrap();
    assert_eq!(ps, vec![pid]);

    s.ok(&["pause", "c1"]);
    assert_eq!(s.state("c1")["status"], "paused");
    s.ok(&["resume", "c1"]);
    let resources = s.tmp.path().join("resources.json");
    std::fs::write(&resources, r#"{"pids": {"limit": 77}}"#).unwrap();
    s.ok(&["update", "--resources", resources.to_str().unwrap(), "c1"]);
    let stats: Value = serde_json::from_str(&s.ok(&["events", "--stats", "c1"])).unwrap();
    assert_eq!(stats["data"]["pids"]["limit"], 77, "{stats}");
    assert!(
        stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(s.ok(&["list"]).contains("c1"));

    s.ok(&["kill", "c1", "TERM"]);
    assert_eq!(reap(pid), WaitStatus::Exited(Pid::from_raw(pid as i32), 3));
    assert_eq!(s.state("c1")["status"], "stopped");
    assert!(s.fails(&["kill", "c1", "KILL"]).contains("not running"));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text, "started\ngot-term\n");
    s.ok(&["delete", "c1"]);
    assert_eq!(hook_state("poststop")["status"], "stopped");
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(cgroup.trim_start_matches('/')))
        .filter(|d| d.exists())
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "host cgroups left");
    assert!(s
        .fails(&["state", "c1"])
        .contains("container c1 does not exist"));
    s.ok(&["delete", "--force", "c1"]);
    s.assert_clean("c1");
}

#[test]
fn stdio_exit_codes_and_signals_pass_through() {
    let Some(s) = setup() else { return };
    s.write_spec(&spec(
        &["sh", "-c", "read l; echo \"in:$l\"; echo oops >&2; exit 7"],
        false,
    ));
    let out = s
        .runc()
        .args(["run", "--bundle"])
        .arg(&s.bundle)
        .arg("r1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Output {
        status,
        stdout,
        stderr,
    } = {
        let mut out = out;
        out.stdin.take().unwrap().write_all(b"hello\n").unwrap();
        out.wait_with_output().unwrap()
    };
    assert_eq!(status.code(), Some(7), "{}", s.log_text());
    assert_eq!(String::from_utf8_lossy(&stdout), "in:hello\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "oops\n");
    s.assert_clean("r1");

    // Killed by a signal: the stand-in dies by the same one. (SIGKILL: the
    // container's init, PID 1 of its namespace, ignores others it has no
    // handler for, as under runc.)
    s.write_spec(&spec(&["sleep", "600"], false));
    let pid = s.create("r2", &s.tmp.path().join("r2.out"), Stdio::null());
    s.ok(&["start", "r2"]);
    s.ok(&["kill", "r2", "9"]);
    assert_eq!(
        reap(pid),
        WaitStatus::Signaled(Pid::from_raw(pid as i32), Signal::SIGKILL, false)
    );
    s.ok(&["delete", "r2"]);
    s.assert_clean("r2");
}

/// Receives the pty master runc-style callers get on the console socket.
fn receive_master(listener: &UnixListener) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS gave us this fd; nothing else owns it.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd on the console socket");
}

#[test]
fn a_terminal_goes_through_the_console_socket_with_its_size() {
    let Some(s) = setup() else { return };
    s.write_spec(&spec(
        &["sh", "-c", "stty size; read l; echo \"got:$l\"; tty"],
        true,
    ));
    let sock = s.tmp.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_master(&listener));
    let pid_file = s.tmp.path().join("t1.pid");
    let r = s
        .runc()
        .args(["create", "--bundle"])
        .arg(&s.bundle)
        .arg("--console-socket")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("t1")
        .status()
        .unwrap();
    assert!(r.success(), "{}", s.log_text());
    let master = receiver.join().unwrap();
    let ws = libc::winsize {
        ws_row: 37,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize passed; the fd is ours.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
    s.ok(&["start", "t1"]);
    let mut term = std::fs::File::from(master);
    let mut reader = term.try_clone().unwrap();
    let output = std::thread::spawn(move || {
        let mut text = String::new();
        let mut chunk = [0u8; 4096];
        // Once the stand-in (the slave's last holder) is gone, reads end
        // in EIO after the data.
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        text
    });
    term.write_all(b"typed\r").unwrap();
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(
        reap(pid),
        WaitStatus::Exited(Pid::from_raw(pid as i32), 0),
        "{}",
        s.log_text()
    );
    drop(term);
    let text = output.join().unwrap();
    assert!(text.contains("37 111"), "the guest saw the size: {text:?}");
    assert!(text.contains("got:typed"), "{text:?}");
    assert!(
        text.contains("/dev/pts/"),
        "a terminal in the guest: {text:?}"
    );
    s.ok(&["delete", "t1"]);
    s.assert_clean("t1");
}

#[test]
fn prestart_hooks_configure_the_network_the_vm_mirrors() {
    let Some(s) = setup() else { return };
    let node = TestNetns::create().unwrap();
    // What Docker's libnetwork does from its prestart hook: a veth into the
    // namespace of the pid the state names, with an address and a route.
    let hook = s.tmp.path().join("net-hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\npid=$(sed 's/.*\"pid\":\\([0-9]*\\).*/\\1/')\n\
             ip -n {ns} link add vh-runc type veth peer name eth0 netns /proc/$pid/ns/net\n\
             ip -n {ns} addr add 10.214.0.1/24 dev vh-runc\nip -n {ns} link set vh-runc up\n\
             nsenter --net=/proc/$pid/ns/net ip addr add 10.214.0.2/24 dev eth0\n\
             nsenter --net=/proc/$pid/ns/net ip link set eth0 up\n",
            ns = node.path().file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let www = s.bundle.join("rootfs/www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "from the microVM\n").unwrap();
    let mut sp = spec(&["httpd", "-f", "-p", "8080", "-h", "/www"], false);
    sp["hooks"] =
        json!({"prestart": [{"path": hook, "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}]});
    s.write_spec(&sp);
    let pid = s.create("n1", &s.tmp.path().join("n1.out"), Stdio::null());
    s.ok(&["start", "n1"]);
    let addr: SocketAddr = "10.214.0.2:8080".parse().unwrap();
    let deadline = Instant::now() + EXIT_DEADLINE;
    let body = loop {
        match node.run(|| http_get(addr)).unwrap() {
            Ok(b) => break b,
            Err(e) if Instant::now() > deadline => panic!("{addr}: {e}\n{}", s.log_text()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(body, "from the microVM\n");
    // The stand-in's namespace holds the veth, redirected to our tap.
    let theirs = TestNetns::hold(Path::new(&format!("/proc/{pid}/ns/net"))).unwrap();
    assert!(
        theirs.tc_state("eth0").unwrap().is_some(),
        "eth0 has no redirect"
    );
    drop(theirs);
    s.ok(&["kill", "n1", "KILL"]);
    reap(pid);
    s.ok(&["delete", "n1"]);
    s.assert_clean("n1");
    // The veth goes with the stand-in's namespace (the kernel tears a
    // namespace down asynchronously).
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.links().unwrap() != vec!["lo".to_string()] {
        assert!(Instant::now() < deadline, "{:?} left", node.links());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_stand_in_or_vm_leaves_nothing_after_delete() {
    let Some(s) = setup() else { return };
    s.write_spec(&spec(&["sleep", "600"], false));
    let pid = s.create("k1", &s.tmp.path().join("k1.out"), Stdio::null());
    s.ok(&["start", "k1"]);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    reap(pid);
    assert_eq!(s.state("k1")["status"], "stopped");
    s.ok(&["delete", "k1"]);
    s.assert_clean("k1");

    let pid = s.create("k2", &s.tmp.path().join("k2.out"), Stdio::null());
    s.ok(&["start", "k2"]);
    let vm: Vec<u32> = processes_mentioning("qemu-system")
        .into_iter()
        .map(|(p, _)| p)
        .chain(
            processes_mentioning("nutshell-vmm")
                .into_iter()
                .map(|(p, _)| p),
        )
        .filter(|p| *p != std::process::id())
        .collect();
    assert!(!vm.is_empty(), "a VMM runs");
    for p in vm {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    assert_eq!(
        reap(pid),
        WaitStatus::Exited(Pid::from_raw(pid as i32), 255)
    );
    assert!(s.log_text().contains("VM went away"), "{}", s.log_text());
    s.ok(&["delete", "k2"]);
    s.assert_clean("k2");

    // A running one, deleted by force.
    let pid = s.create("k3", &s.tmp.path().join("k3.out"), Stdio::null());
    s.ok(&["start", "k3"]);
    s.ok(&["delete", "--force", "k3"]);
    reap(pid);
    s.assert_clean("k3");
}

#[test]
fn bad_input_gets_a_message_that_says_what_to_do_and_leaves_nothing() {
    let Some(s) = setup() else { return };
    for verb in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope"],
        &["delete", "nope"],
    ] {
        let e = s.fails(verb);
        assert!(e.contains("container nope does not exist"), "{verb:?}: {e}");
    }
    assert!(s
        .fails(&["state", "../x"])
        .contains("not a valid container id"));
    let e = s.fails(&["create", "--bundle", "/nonexistent", "b1"]);
    assert!(e.contains("the bundle /nonexistent does not exist"), "{e}");
    std::fs::write(s.bundle.join("config.json"), "{not json").unwrap();
    let e = s.fails(&["create", "--bundle", s.bundle.to_str().unwrap(), "b1"]);
    assert!(e.contains("config.json"), "{e}");
    // The error reaches the log as logrus JSON, where containerd reads it.
    let last = s.log_text().lines().last().unwrap().to_string();
    let line: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(line["level"], "error");

    // A missing guest kernel: named, with the fix, and no state left.
    s.write_spec(&spec(&["true"], false));
    let config = s.tmp.path().join("broken.toml");
    std::fs::write(&config, "[vm]\nkernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let out = s
        .runc_with(&config)
        .args(["create", "--bundle"])
        .arg(&s.bundle)
        .arg("b2")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("/nonexistent/vmlinux does not exist"), "{e}");
    assert!(e.contains("tools/setup.sh"), "{e}");
    s.assert_clean("b2");

    // A terminal without a console socket, and fds that cannot cross.
    s.write_spec(&spec(&["true"], true));
    let e = s.fails(&["create", "--bundle", s.bundle.to_str().unwrap(), "b3"]);
    assert!(e.contains("--console-socket"), "{e}");
    s.write_spec(&spec(&["true"], false));
    let e = s.fails(&[
        "create",
        "--preserve-fds",
        "2",
        "--bundle",
        s.bundle.to_str().unwrap(),
        "b4",
    ]);
    assert!(e.contains("cannot be passed into a VM"), "{e}");
    s.assert_clean("b3");
    s.assert_clean("b4");
}
