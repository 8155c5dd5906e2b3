//! Runs the built `nutshell run` as a user would, with the QEMU backend
//! (TCG here) and a busybox rootfs, and checks what comes out of it and
//! what it leaves behind.
//!
//! A TCG boot costs seconds of CPU on a 2-core machine, so the VM tests
//! are few and take turns (`VM_LOCK`), with generous deadlines.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nutshell_runtime::hypervisor::qemu::QemuHypervisor;
use nutshell_tests::{assert_no_vm_left, busybox_rootfs, guest_dir, is_root, require, BUSYBOX};

/// VM tests run one at a time: each TCG guest wants a whole CPU here.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// The longest one `nutshell run` may take (a loaded machine, TCG).
const RUN_DEADLINE: Duration = Duration::from_secs(120);

fn nutshell() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nutshell"))
}

/// Everything a VM test needs; `false` means skip.
fn vm_prerequisites() -> bool {
    if !require(is_root(), "needs root (bind mounts, vhost-user sockets)") {
        return false;
    }
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        let p = guest_dir().join(f);
        if !require(
            p.is_file(),
            &format!("needs {} (guest-image/build.sh --install)", p.display()),
        ) {
            return false;
        }
    }
    if !require(
        Path::new(BUSYBOX).is_file(),
        "needs /bin/busybox (busybox-static)",
    ) {
        return false;
    }
    if let Err(e) = QemuHypervisor::discover() {
        return require(
            false,
            &format!("needs QEMU and the vhost-user backends ({e}); run tools/setup.sh"),
        );
    }
    true
}

/// What a VM test holds while it runs: its turn (VM tests run one at a
/// time) and a busybox rootfs in a fresh temporary directory.
struct VmTest {
    _turn: MutexGuard<'static, ()>,
    tmp: tempfile::TempDir,
    rootfs: PathBuf,
}

/// The VM test's setting, or `None` (skipped) without its prerequisites.
fn vm_test() -> Option<VmTest> {
    if !vm_prerequisites() {
        return None;
    }
    let turn = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs).unwrap();
    Some(VmTest {
        _turn: turn,
        tmp,
        rootfs,
    })
}

/// `nutshell run --backend qemu` with the guest image under test.
fn run_command(rootfs: &Path, options: &[&str], cmd: &[&str]) -> Command {
    run_with_initrd(rootfs, &guest_dir().join("initramfs.cpio.gz"), options, cmd)
}

fn run_with_initrd(rootfs: &Path, initrd: &Path, options: &[&str], cmd: &[&str]) -> Command {
    let mut c = nutshell();
    c.args(["run", "--backend", "qemu", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--initrd")
        .arg(initrd)
        .arg("--rootfs")
        .arg(rootfs)
        .args(options)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

struct Finished {
    status: i32,
    stdout: String,
    stderr: String,
    /// The run's state directory, `/run/nutshell/run-<pid>`.
    state_dir: PathBuf,
}

/// Lines of a child's output as they come.
fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `child` (killing it past the deadline) and collects its output.
fn finish(mut child: Child, out: mpsc::Receiver<String>, err: mpsc::Receiver<String>) -> Finished {
    let state_dir = state_dir_of(&child);
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nutshell run did not end within {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let join = |rx: mpsc::Receiver<String>| rx.iter().map(|l| l + "\n").collect::<String>();
    let f = Finished {
        status: status.code().expect("nutshell run was killed by a signal"),
        stdout: join(out),
        stderr: join(err),
        state_dir,
    };
    eprintln!(
        "status {}\n--- stdout\n{}--- stderr\n{}---",
        f.status, f.stdout, f.stderr
    );
    f
}

fn spawn(mut c: Command) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = c.spawn().unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    (child, out, err)
}

fn run_to_end(c: Command) -> Finished {
    let (child, out, err) = spawn(c);
    finish(child, out, err)
}

fn state_dir_of(child: &Child) -> PathBuf {
    PathBuf::from(format!("/run/nutshell/run-{}", child.id()))
}

/// The acceptance case: the container's stdout and stderr arrive on ours,
/// its exit status becomes ours, `--timing` reports its five milestones in
/// order, and nothing of the run is left afterwards.
#[test]
fn output_and_exit_status_pass_through_and_nothing_is_left() {
    let Some(VmTest { rootfs, .. }) = &vm_test() else {
        return;
    };
    let f = run_to_end(run_command(
        rootfs,
        &["--timing"],
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    ));
    assert_eq!(f.status, 7);
    assert_eq!(f.stdout, "out\n");
    let (timing, other): (Vec<&str>, Vec<&str>) =
        f.stderr.lines().partition(|l| l.starts_with("timing: "));
    assert_eq!(other, ["err"]);
    let milestones: Vec<(&str, u64)> = timing
        .iter()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!((w.len(), w[3]), (4, "ms"), "{l}");
            (w[1], w[2].parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = milestones.iter().map(|m| m.0).collect();
    assert_eq!(
        names,
        [
            "vm-launched",
            "agent-ready",
            "container-started",
            "container-exited",
            "vm-stopped"
        ]
    );
    assert!(
        milestones.windows(2).all(|w| w[0].1 <= w[1].1),
        "{milestones:?}"
    );
    assert_no_vm_left(&f.state_dir, &f.state_dir);
}

/// `--readonly` keeps the container (and the guest) from writing the
/// rootfs; `--env` reaches the container.
#[test]
fn readonly_rootfs_and_env() {
    let Some(VmTest { rootfs, .. }) = &vm_test() else {
        return;
    };
    let f = run_to_end(run_command(
        rootfs,
        &["--readonly", "--env", "GREETING=hello there"],
        &["sh", "-c", "echo \"$GREETING\"; touch /probe"],
    ));
    assert_eq!(f.stdout, "hello there\n");
    assert_eq!(f.status, 1, "touch on a read-only rootfs succeeded");
    assert!(f.stderr.contains("Read-only file system"), "{}", f.stderr);
    assert!(!rootfs.join("probe").exists());
    assert_no_vm_left(&f.state_dir, &f.state_dir);
}

/// The container starts with every signal at its default and none blocked
/// (the agent is a Rust program, whose runtime ignores SIGPIPE): a pipeline
/// whose reader stops early ends.
#[test]
fn containers_start_with_default_signal_dispositions() {
    let Some(VmTest { rootfs, .. }) = &vm_test() else {
        return;
    };
    let f = run_to_end(run_command(
        rootfs,
        &[],
        &[
            "sh",
            "-c",
            "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -c 100000 | wc -c",
        ],
    ));
    assert_eq!(f.status, 0, "{}", f.stderr);
    assert_eq!(
        f.stdout,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n100000\n"
    );
    assert_no_vm_left(&f.state_dir, &f.state_dir);
}

/// Ctrl-C while the container runs: the first SIGINT is passed on (the
/// container ignores it), the second kills the container; the run ends
/// with 137 and leaves nothing.
#[test]
fn interrupted_run_leaves_nothing() {
    let Some(VmTest { rootfs, .. }) = &vm_test() else {
        return;
    };
    let (child, out, err) = spawn(run_command(
        rootfs,
        &[],
        // Ignored before `ready` is written: no race with the first SIGINT.
        &["sh", "-c", "trap '' INT; echo ready; sleep 600"],
    ));
    let ready = out.recv_timeout(RUN_DEADLINE);
    assert_eq!(ready.as_deref(), Ok("ready"));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let f = finish(child, out, err);
    assert_eq!(f.status, 137, "the container was not killed");
    assert!(f.stderr.contains("SIGINT passed to the container"));
    assert_no_vm_left(&f.state_dir, &f.state_dir);
}

/// A guest that dies at boot (a broken initramfs: the kernel finds no
/// init and panics) is reported with the console's last lines.
#[test]
fn a_dead_guest_is_reported_with_its_console() {
    let Some(VmTest { tmp, rootfs, .. }) = &vm_test() else {
        return;
    };
    let initrd = tmp.path().join("broken-initramfs");
    let good = std::fs::read(guest_dir().join("initramfs.cpio.gz")).unwrap();
    std::fs::write(&initrd, &good[..4096.min(good.len())]).unwrap();
    let f = run_to_end(run_with_initrd(rootfs, &initrd, &[], &["true"]));
    assert_eq!(f.status, 125);
    assert!(f.stderr.contains("the VM did not come up"), "{}", f.stderr);
    assert!(
        f.stderr.contains("Kernel panic") || f.stderr.contains("No working init"),
        "no console quoted: {}",
        f.stderr
    );
    assert_no_vm_left(&f.state_dir, &f.state_dir);
}

/// A missing kernel is a clear error (naming the path and how to get one)
/// before anything is started.
#[test]
fn a_missing_kernel_is_a_clear_error_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-vmlinux");
    let f = run_to_end({
        let mut c = nutshell();
        c.args(["run", "--kernel"])
            .arg(&missing)
            .arg("--rootfs")
            .arg(tmp.path())
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    });
    assert_eq!(f.status, 125);
    assert!(
        f.stderr.contains(&missing.display().to_string())
            && f.stderr.contains("guest-image/build.sh --install"),
        "{}",
        f.stderr
    );
    assert_eq!(f.stdout, "");
    assert!(!f.state_dir.exists(), "the run made its state directory");
}

/// A rootfs without the command is refused before a VM starts, with
/// status 127 as a shell gives.
#[test]
fn a_rootfs_without_the_command_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Stand-ins: only their existence is checked before the rootfs.
    let (kernel, initrd) = (tmp.path().join("vmlinux"), tmp.path().join("initrd"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/present"), b"").unwrap();
    let f = run_to_end({
        let mut c = nutshell();
        c.args(["run", "--kernel"])
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["--", "absent", "arg"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    });
    assert_eq!(f.status, 127);
    assert!(
        f.stderr.contains("`absent` is not in the rootfs"),
        "{}",
        f.stderr
    );
    assert!(!f.state_dir.exists());
}
