//! The engine tests, written once: each takes a started [`Engine`] and
//! asserts what a user of Docker or Podman sees, the same under runc and
//! under nutshell-runc, except where the kernel is the point
//! ([`kernel_and_runtime`]). `tests/tests/engine_*.rs` name the ones each
//! engine runs ([`engine_tests!`](crate::engine_tests)).

use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::time::{Duration, Instant};

use super::{text, Engine, Kind, Runtime, WWW_PAGE};
use crate::containerd::guest_kernel_release;
use crate::netns::http_get;

/// Containers that need no network get none: it keeps the bridge out of
/// the tests that are not about it.
const NO_NET: &str = "--network=none";

/// How long a container may take to get where a test waits for it.
const READY: Duration = Duration::from_secs(60);

/// `run --rm`: the command's stdout, stderr and exit code come back, and
/// without `-t` it has no terminal.
pub fn run_rm_exit_code(e: &Engine) {
    let out = e.run(
        &["--rm", NO_NET],
        &[
            "sh",
            "-c",
            "test -t 1 || echo no-tty; echo out; echo err >&2; exit 7",
        ],
    );
    assert_output(e, &out, 7, "no-tty\nout\n", "err");
}

/// `run -i`: piped stdin reaches the command, and its end closes the
/// command's stdin.
pub fn stdin_piped(e: &Engine) {
    let input = e.dir().join("stdin.txt");
    fs::write(&input, "line one\nline two\n").unwrap();
    let args = e.run_args(&["--rm", "-i", NO_NET], &["sh", "-c", "cat; echo end"]);
    let mut cmd = e.cmd(&args);
    cmd.stdin(File::open(&input).unwrap());
    let out = e.output_of(&mut cmd);
    assert!(out.status.success(), "{}", describe(e, &out));
    assert_eq!(text(&out.stdout), "line one\nline two\nend\n");
}

/// `run -t` on a terminal: the command's stdin and stdout are a terminal,
/// and the exit code comes back.
pub fn tty(e: &Engine) {
    let args = e.run_args(
        &["--rm", "-t", NO_NET],
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; exit 5",
        ],
    );
    let out = e.output_of(&mut e.cmd_in_pty(&args));
    assert_eq!(out.status.code(), Some(5), "{}", describe(e, &out));
    // A terminal's line discipline turns "\n" into "\r\n": the container's
    // (Docker's CLI leaves the outer one cooked too: "\r\r\n").
    let stdout = text(&out.stdout);
    assert!(stdout.contains("on-a-tty\r"), "{}", describe(e, &out));
    assert_eq!(stdout.replace('\r', ""), "on-a-tty\n");
}

/// `exec` into a running container: output and exit code come back, two
/// execs share the container's filesystem, and its PID 1 is the
/// container's command.
pub fn exec(e: &Engine) {
    start_sleeper(e, "box");
    let out = e.output(&[
        "exec",
        "box",
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; exit 3",
    ]);
    assert_output(e, &out, 3, "exec-out\n", "exec-err");
    e.ok(&["exec", "box", "sh", "-c", "echo shared > /tmp/f"]);
    assert_eq!(e.ok(&["exec", "box", "cat", "/tmp/f"]), "shared\n");
    let init = e.ok(&["exec", "box", "cat", "/proc/1/cmdline"]);
    assert!(init.starts_with("sleep\0"), "PID 1 is {init:?}");
}

/// `stop -t 2` of a command that ignores SIGTERM: the engine kills it
/// after the 2 s, the exit code says SIGKILL, and `logs` still has what it
/// printed.
pub fn stop_kills_after_the_timeout(e: &Engine) {
    e.ok(&e.run_args(
        &["-d", "--name", "stubborn", NO_NET],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo trap-set; while :; do sleep 1; done",
        ],
    ));
    wait_for_log(e, "stubborn", "trap-set");
    let t0 = Instant::now();
    e.ok(&["stop", "-t", "2", "stubborn"]);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "stop took {took:?}"
    );
    assert_eq!(inspect(e, "stubborn", "{{.State.ExitCode}}"), "137");
    assert_eq!(inspect(e, "stubborn", "{{.State.Running}}"), "false");
    assert_eq!(e.ok(&["logs", "stubborn"]), "trap-set\n");
    e.ok(&["rm", "stubborn"]);
}

/// `-v HOST:/data`: the container reads the host's file and the host sees
/// the file the container wrote.
pub fn volume_read_write(e: &Engine) {
    let host = e.dir().join("volume");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("in"), "from-the-host\n").unwrap();
    let spec = format!("{}:/data", host.display());
    let out = e.run(
        &["--rm", NO_NET, "-v", &spec],
        &[
            "sh",
            "-c",
            "cat /data/in && echo from-the-container > /data/out",
        ],
    );
    assert!(out.status.success(), "{}", describe(e, &out));
    assert_eq!(text(&out.stdout), "from-the-host\n");
    assert_eq!(
        fs::read_to_string(host.join("out")).unwrap(),
        "from-the-container\n"
    );
}

/// `--read-only`: writes to `/` fail with EROFS; the same write succeeds
/// without it.
pub fn read_only_root(e: &Engine) {
    let probe = "touch /probe && echo wrote";
    let out = e.run(&["--rm", NO_NET, "--read-only"], &["sh", "-c", probe]);
    assert_output(e, &out, 1, "", "Read-only file system");
    let out = e.run(&["--rm", NO_NET], &["sh", "-c", probe]);
    assert!(out.status.success(), "{}", describe(e, &out));
    assert_eq!(text(&out.stdout), "wrote\n");
}

/// `uname -r` in a container: the host's kernel under runc, the guest's
/// under nutshell-runc; and the engine says it used the runtime it was
/// given.
pub fn kernel_and_runtime(e: &Engine) {
    let release = e.ok(&e.run_args(&["--name", "kernel", NO_NET], &["uname", "-r"]));
    let release = release.trim();
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    match e.runtime {
        Runtime::Runc => assert_eq!(release, host.trim()),
        Runtime::Nutshell => {
            assert_ne!(release, host.trim(), "the host kernel shows through");
            if let Some(guest) = guest_kernel_release() {
                assert_eq!(release, guest, "uname -r is the guest kernel's");
            }
        }
    }
    let (format, expected) = match e.kind {
        Kind::Podman => ("{{.OCIRuntime}}", e.runtime_bin.display().to_string()),
        Kind::Docker => ("{{.HostConfig.Runtime}}", e.runtime.docker_name().into()),
    };
    assert_eq!(inspect(e, "kernel", format), expected);
    e.ok(&["rm", "kernel"]);
}

/// A busybox httpd on the engine's default bridge network: the test's
/// namespace (where the engine runs) fetches its page by the container's
/// IP from `inspect`, which is the address on the container's `eth0`.
pub fn bridge_network(e: &Engine) {
    // With a pool (NUTSHELL_TEST_POOL=1), the container claims a warm VM,
    // whose NIC moves into the container's namespace.
    e.wait_pool_warm().expect("the pool warms up");
    e.ok(&e.run_args(
        &["-d", "--name", "web"],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    ));
    let ip = inspect(e, "web", "{{.NetworkSettings.IPAddress}}");
    let ip: IpAddr = ip
        .parse()
        .unwrap_or_else(|_| panic!("inspect gave no IP address: {ip:?}"));
    let eth0 = e.ok(&[
        "exec", "web", "ip", "-o", "-4", "addr", "show", "dev", "eth0",
    ]);
    assert!(eth0.contains(&format!("inet {ip}/")), "{eth0}");
    let addr = SocketAddr::new(ip, 80);
    let deadline = Instant::now() + READY;
    let body = loop {
        match e.netns.run(|| http_get(addr)).expect("setns") {
            Ok(body) => break body,
            Err(err) if Instant::now() > deadline => {
                panic!("the test's namespace cannot fetch {addr}: {err}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(body, format!("{WWW_PAGE}\n"));
    if let Some(claims) = e.pool_claims() {
        assert_eq!(claims, 1, "the container's VM was not a warm one");
    }
}

/// `docker stats --no-stream`: one sample of a running container, with
/// memory in use and at least its one process.
pub fn stats(e: &Engine) {
    start_sleeper(e, "busy");
    let line = e.ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.MemUsage}} {{.PIDs}}",
        "busy",
    ]);
    // "busy 788KiB / 23.54GiB 1"
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "{line:?}");
    assert_eq!(fields[0], "busy");
    assert!(!fields[1].starts_with("0B"), "no memory in use: {line:?}");
    let pids: u32 = fields[4].parse().expect("a PID count");
    assert!(pids >= 1, "{line:?}");
}

/// `kill -9` of what the engine knows as the container's pid (runc's
/// init; nutshell-runc's stand-in) and, under nutshell-runc, of the VM's
/// processes: the engine sees the container exit, and `rm` leaves nothing
/// behind ([`Engine::finish`] checks).
pub fn killed_container_leaves_nothing(e: &Engine) {
    start_sleeper(e, "victim");
    let pid: i32 = inspect(e, "victim", "{{.State.Pid}}").parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until_exited(e, "victim");
    assert_eq!(inspect(e, "victim", "{{.State.ExitCode}}"), "137");
    e.ok(&["rm", "victim"]);
    if !e.runtime.runs_vms() {
        return;
    }
    start_sleeper(e, "vm-victim");
    let stand_in: u32 = inspect(e, "vm-victim", "{{.State.Pid}}").parse().unwrap();
    let vm = children_of(stand_in);
    assert!(
        !vm.is_empty(),
        "the stand-in {stand_in} has no VM processes"
    );
    for p in vm {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until_exited(e, "vm-victim");
    assert_ne!(inspect(e, "vm-victim", "{{.State.ExitCode}}"), "0");
    e.ok(&["rm", "vm-victim"]);
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| d.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Waits until the engine says container `name` no longer runs.
fn wait_until_exited(e: &Engine, name: &str) {
    let deadline = Instant::now() + READY;
    while inspect(e, name, "{{.State.Running}}") != "false" {
        assert!(Instant::now() < deadline, "{name} still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts container `name` running `sleep`, detached.
fn start_sleeper(e: &Engine, name: &str) {
    e.ok(&e.run_args(&["-d", "--name", name, NO_NET], &["sleep", "1000000"]));
}

/// `inspect -f FORMAT NAME`, trimmed.
fn inspect(e: &Engine, name: &str, format: &str) -> String {
    e.ok(&["inspect", "-f", format, name]).trim().to_string()
}

/// Waits until `logs NAME` has `needle`.
fn wait_for_log(e: &Engine, name: &str, needle: &str) {
    let deadline = Instant::now() + READY;
    while !text(&e.output(&["logs", name]).stdout).contains(needle) {
        assert!(Instant::now() < deadline, "{name} never logged {needle:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts `out` exited with `code`, printed `stdout` and said `stderr_has`
/// on stderr.
fn assert_output(e: &Engine, out: &Output, code: i32, stdout: &str, stderr_has: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", describe(e, out));
    assert_eq!(text(&out.stdout), stdout, "{}", describe(e, out));
    assert!(
        text(&out.stderr).contains(stderr_has),
        "{}",
        describe(e, out)
    );
}

/// A command's status and output, and the engine's log, for a message.
fn describe(e: &Engine, out: &Output) -> String {
    format!(
        "{}\nstdout: {:?}\nstderr: {:?}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        e.log_tail(20)
    )
}
