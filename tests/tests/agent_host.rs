//! nutshell-agent on this host, as root, driven through its ttrpc protocol
//! on a Unix socket: containers from a busybox rootfs, stdio, terminals,
//! exec, signals, security settings, bad input and leaks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nutshell_protocol::agent as pb;
use nutshell_protocol::agent_ttrpc::AgentClient;
use nutshell_tests::{agent_binary, busybox_rootfs, is_root, require, BUSYBOX};
use serde_json::{json, Value};

/// Every call gets a deadline so a bug fails the test instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// A running agent on a socket in its own temp dir, killed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prerequisites() -> Option<PathBuf> {
    if !require(is_root(), "needs root (namespaces, mounts)") {
        return None;
    }
    if !require(
        Path::new(BUSYBOX).is_file(),
        "needs /bin/busybox (busybox-static)",
    ) {
        return None;
    }
    let bin = agent_binary();
    if !require(
        bin.is_some(),
        "needs the nutshell-agent binary (cargo build -p nutshell-agent)",
    ) {
        return None;
    }
    bin
}

impl Agent {
    async fn start() -> Option<Self> {
        Self::start_with(false).await
    }

    /// `private_cgroup2`: run the agent in its own mount namespace with a
    /// cgroup2 hierarchy mounted on /sys/fs/cgroup, so the cgroup v2 code
    /// runs even on a cgroup v1 host (with whatever controllers v2 has).
    async fn start_with(private_cgroup2: bool) -> Option<Self> {
        let bin = prerequisites()?;
        let dir = tempfile::Builder::new()
            .prefix("nutshell-agent-test")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("agent.sock");
        let listen = format!("unix://{}", sock.display());
        let mut cmd = if private_cgroup2 {
            let mut c = Command::new("unshare");
            c.args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" --listen \"$1\"",
            ]);
            c.arg(&bin).arg(&listen);
            c
        } else {
            let mut c = Command::new(&bin);
            c.arg("--listen").arg(&listen);
            c
        };
        let child = cmd
            .env("NUTSHELL_AGENT_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            if sock.exists() {
                if let Ok(c) =
                    ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display())).await
                {
                    break AgentClient::new(c);
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {} within 10 s",
                sock.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs).unwrap();
        let agent = Self {
            child,
            dir,
            sock,
            client,
        };
        agent.health().await;
        Some(agent)
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    async fn new_client(&self) -> AgentClient {
        AgentClient::new(
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.sock.display()))
                .await
                .unwrap(),
        )
    }

    async fn health(&self) {
        let h = self
            .client
            .health(ctx(), &pb::HealthRequest::new())
            .await
            .expect("the agent answers Health");
        assert_eq!(h.status, "SERVING");
    }

    async fn create(
        &self,
        id: &str,
        spec: &Value,
        stdin: bool,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            spec_json: serde_json::to_vec(spec).unwrap(),
            stdin,
            ..Default::default()
        };
        self.client.create_container(ctx(), &req).await
    }

    async fn start_c(&self, id: &str) -> ttrpc::Result<pb::Empty> {
        self.client
            .start_container(
                ctx(),
                &pb::StartContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn run(&self, id: &str, spec: &Value) {
        self.create(id, spec, false).await.unwrap();
        self.start_c(id).await.unwrap();
    }

    async fn wait(&self, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
        let req = pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).await.unwrap()
    }

    async fn read_chunk(&self, id: &str, exec_id: &str, stderr: bool) -> pb::ReadOutputResponse {
        let req = pb::ReadOutputRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            max_bytes: 65536,
            ..Default::default()
        };
        if stderr {
            self.client.read_stderr(ctx(), &req).await.unwrap()
        } else {
            self.client.read_stdout(ctx(), &req).await.unwrap()
        }
    }

    /// Reads a stream to EOF.
    async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let r = self.read_chunk(id, exec_id, stderr).await;
            out.extend_from_slice(&r.data);
            if r.eof {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
    }

    /// Reads until `needle` shows up (or EOF), returning what was read.
    async fn read_until(&self, id: &str, exec_id: &str, needle: &str) -> String {
        let mut out = Vec::new();
        loop {
            let r = self.read_chunk(id, exec_id, false).await;
            out.extend_from_slice(&r.data);
            let text = String::from_utf8_lossy(&out).into_owned();
            if text.contains(needle) || r.eof {
                return text;
            }
        }
    }

    async fn signal(&self, id: &str, exec_id: &str, sig: u32) {
        let req = pb::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).await.unwrap();
    }

    async fn remove(&self, id: &str) {
        self.client
            .remove_container(
                ctx(),
                &pb::RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        stdin: bool,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        let process = json!({ "args": args, "cwd": "/", "user": { "uid": 0, "gid": 0 }, "env": ["PATH=/bin:/sbin:/usr/bin"] });
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: serde_json::to_vec(&process).unwrap(),
            stdin,
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).await
    }

    /// Runs a container to its end: (exit, stdout, stderr), then removes it.
    async fn run_to_end(
        &self,
        id: &str,
        spec: &Value,
    ) -> (pb::WaitProcessResponse, String, String) {
        self.run(id, spec).await;
        let out = self.read_all(id, "", false).await;
        let err = self.read_all(id, "", true).await;
        let exit = self.wait(id, "").await;
        self.remove(id).await;
        (exit, out, err)
    }
}

const ALL_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A spec like `runc spec` makes, for the busybox rootfs.
fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": { "bounding": ALL_CAPS, "effective": ALL_CAPS, "permitted": ALL_CAPS, "inheritable": [], "ambient": [] },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": "nutshell-test",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"] }
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn sh(agent: &Agent, script: &str) -> Value {
    spec(&agent.rootfs(), &["sh", "-c", script])
}

fn status_of(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an rpc status, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_is_captured_and_exit_codes_come_back() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let (exit, out, err) = a
        .run_to_end("echo", &sh(&a, "echo hello; echo oops >&2"))
        .await;
    assert_eq!((exit.exit_status, exit.signal), (0, 0));
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert!(exit.exited_at_sec > 1_600_000_000);
    let (exit, _, _) = a.run_to_end("exit3", &sh(&a, "exit 3")).await;
    assert_eq!((exit.exit_status, exit.signal), (3, 0));
}

#[tokio::test]
async fn sigkill_gives_the_signal_status() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("kill", &spec(&a.rootfs(), &["sleep", "100"])).await;
    a.signal("kill", "", 9).await;
    let exit = a.wait("kill", "").await;
    assert_eq!((exit.exit_status, exit.signal), (137, 9));
    a.remove("kill").await;
}

#[tokio::test]
async fn stdin_is_piped_through_cat() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.create("cat", &spec(&a.rootfs(), &["cat"]), true)
        .await
        .unwrap();
    a.start_c("cat").await.unwrap();
    let w = pb::WriteStdinRequest {
        container_id: "cat".into(),
        data: b"through the pipe\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.client.write_stdin(ctx(), &w).await.unwrap().written, 17);
    a.client
        .close_stdin(
            ctx(),
            &pb::CloseStdinRequest {
                container_id: "cat".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.read_all("cat", "", false).await, "through the pipe\n");
    assert_eq!(a.wait("cat", "").await.exit_status, 0);
    a.remove("cat").await;
}

#[tokio::test]
async fn terminal_session_with_resize() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "tty; read x; stty size; exit 0");
    s["process"]["terminal"] = json!(true);
    a.create("tty", &s, true).await.unwrap();
    a.start_c("tty").await.unwrap();
    let first = a.read_until("tty", "", "/dev/pts/").await;
    assert!(first.contains("/dev/pts/"), "tty printed {first:?}");
    let r = pb::ResizeTerminalRequest {
        container_id: "tty".into(),
        rows: 42,
        cols: 123,
        ..Default::default()
    };
    a.client.resize_terminal(ctx(), &r).await.unwrap();
    let w = pb::WriteStdinRequest {
        container_id: "tty".into(),
        data: b"go\n".to_vec(),
        ..Default::default()
    };
    a.client.write_stdin(ctx(), &w).await.unwrap();
    let rest = a.read_until("tty", "", "42 123").await;
    assert!(rest.contains("42 123"), "stty size printed {rest:?}");
    assert_eq!(a.wait("tty", "").await.exit_status, 0);
    a.remove("tty").await;
}

#[tokio::test]
async fn exec_shares_the_pid_namespace_and_the_init_is_pid_1() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("ex", &sh(&a, "echo pid=$$; exec sleep 100")).await;
    assert!(a.read_until("ex", "", "pid=").await.contains("pid=1"));
    a.exec(
        "ex",
        "e1",
        &["sh", "-c", "cat /proc/1/cmdline; echo; echo me=$$"],
        false,
    )
    .await
    .unwrap();
    let out = a.read_all("ex", "e1", false).await;
    assert!(out.starts_with("sleep"), "pid 1 seen by the exec: {out:?}");
    assert!(!out.contains("me=1\n"), "the exec is not pid 1: {out:?}");
    assert_eq!(a.wait("ex", "e1").await.exit_status, 0);
    let e = a.exec("ex", "e1", &["true"], false).await.unwrap_err();
    assert_eq!(status_of(&e).0, ttrpc::Code::ALREADY_EXISTS);
    let procs = a
        .client
        .list_processes(
            ctx(),
            &pb::ListProcessesRequest {
                container_id: "ex".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        procs.processes.len(),
        1,
        "only the sleep is left: {:?}",
        procs.processes
    );
    // Exec processes can be removed one by one; their ids are free again
    // and nothing of them stays in the agent.
    let fds = count_fds(a.pid());
    for i in 0..30 {
        a.exec("ex", "probe", &["sh", "-c", "echo probe"], false)
            .await
            .unwrap();
        assert_eq!(
            a.read_all("ex", "probe", false).await,
            "probe\n",
            "round {i}"
        );
        assert_eq!(a.wait("ex", "probe").await.exit_status, 0);
        let rm = pb::RemoveContainerRequest {
            container_id: "ex".into(),
            exec_id: "probe".into(),
            ..Default::default()
        };
        a.client.remove_container(ctx(), &rm).await.unwrap();
    }
    assert_eq!(
        count_fds(a.pid()),
        fds,
        "descriptors of removed execs are closed"
    );
    let req = pb::WaitProcessRequest {
        container_id: "ex".into(),
        exec_id: "probe".into(),
        ..Default::default()
    };
    let (code, _) = status_of(&a.client.wait_process(ctx(), &req).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    a.remove("ex").await;
}

#[tokio::test]
async fn hostname_is_isolated() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_ne!(host, "nutshell-test");
    let (exit, out, _) = a.run_to_end("host", &sh(&a, "hostname")).await;
    assert_eq!(exit.exit_status, 0);
    assert_eq!(out, "nutshell-test\n");
    assert_eq!(
        nix::unistd::gethostname().unwrap().into_string().unwrap(),
        host
    );
}

#[tokio::test]
async fn signals_reach_the_process() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run(
        "trap",
        &sh(
            &a,
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ),
    )
    .await;
    assert!(a.read_until("trap", "", "ready").await.contains("ready"));
    a.signal("trap", "", 15).await;
    assert!(a.read_all("trap", "", false).await.contains("got TERM"));
    assert_eq!(a.wait("trap", "").await.exit_status, 7);
    a.remove("trap").await;
}

#[tokio::test]
async fn readonly_rootfs_refuses_writes() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "touch /written");
    s["root"]["readonly"] = json!(true);
    let (exit, _, err) = a.run_to_end("ro", &s).await;
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Read-only file system"), "stderr: {err:?}");
    assert!(!a.rootfs().join("written").exists());
    // The same write works on a writable rootfs (the test can fail).
    let (exit, _, _) = a.run_to_end("rw", &sh(&a, "touch /written")).await;
    assert_eq!(exit.exit_status, 0);
    assert!(a.rootfs().join("written").exists());
}

#[tokio::test]
async fn seccomp_rule_denies_mkdir_with_eperm() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "mkdir /tmp/denied");
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
    });
    let (exit, _, err) = a.run_to_end("sec", &s).await;
    assert_eq!(exit.exit_status, 1);
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
    let (exit, _, _) = a.run_to_end("nosec", &sh(&a, "mkdir /tmp/allowed")).await;
    assert_eq!(exit.exit_status, 0);
}

#[tokio::test]
async fn a_dropped_cap_chown_prevents_chown() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let script = "touch /tmp/f && chown 65534 /tmp/f";
    let (exit, _, _) = a.run_to_end("chown-ok", &sh(&a, script)).await;
    assert_eq!(exit.exit_status, 0, "chown works with CAP_CHOWN");
    let mut s = sh(&a, script);
    let caps: Vec<&str> = ALL_CAPS
        .iter()
        .copied()
        .filter(|c| *c != "CAP_CHOWN")
        .collect();
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set] = json!(caps);
    }
    let (exit, _, err) = a.run_to_end("chown-denied", &s).await;
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_agent_keeps_serving() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let (code, msg) = status_of(
        &a.create("bad", &json!("not a spec"), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("malformed"), "{msg}");
    let raw = pb::CreateContainerRequest {
        container_id: "bad".into(),
        spec_json: b"{\"ociVersion\":".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        status_of(&a.client.create_container(ctx(), &raw).await.unwrap_err()).0,
        ttrpc::Code::INVALID_ARGUMENT
    );
    a.health().await;

    let mut s = sh(&a, "true");
    s["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "user" }]);
    let (code, msg) = status_of(&a.create("userns", &s, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("user") && msg.contains("not supported"),
        "{msg}"
    );

    let (code, msg) = status_of(&a.start_c("nobody").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    assert!(msg.contains("nobody"), "{msg}");

    let mut s = sh(&a, "true");
    s["root"]["path"] = json!("/no/such/rootfs");
    let (code, msg) = status_of(&a.create("norootfs", &s, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("/no/such/rootfs"), "{msg}");

    let (code, msg) = status_of(
        &a.create("noexec", &spec(&a.rootfs(), &["/no/such/binary"]), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("/no/such/binary") && msg.contains("no such file or directory"),
        "{msg}"
    );

    a.create("dup", &spec(&a.rootfs(), &["sleep", "100"]), false)
        .await
        .unwrap();
    let (code, _) = status_of(
        &a.create("dup", &spec(&a.rootfs(), &["sleep", "100"]), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    a.start_c("dup").await.unwrap();
    let (code, msg) = status_of(
        &a.exec("dup", "x", &["/no/such/tool"], false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("/no/such/tool") && msg.contains("no such file or directory"),
        "{msg}"
    );
    let (code, _) = status_of(&a.start_c("dup").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);

    // Without cgroup v2, resources must be refused, never silently ignored.
    if !std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "))
    {
        let mut s = sh(&a, "true");
        s["linux"]["resources"] = json!({ "memory": { "limit": 67108864 } });
        let (code, msg) = status_of(&a.create("limits", &s, false).await.unwrap_err());
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(msg.contains("cgroup v2"), "{msg}");
        let (code, msg) = status_of(
            &a.client
                .pause_container(
                    ctx(),
                    &pb::ContainerRequest {
                        container_id: "dup".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err(),
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(msg.contains("cgroup v2"), "{msg}");
        assert!(a
            .client
            .stats_container(
                ctx(),
                &pb::ContainerRequest {
                    container_id: "dup".into(),
                    ..Default::default()
                }
            )
            .await
            .is_err());
    }

    // An oversized message (over ttrpc's 4 MiB) fails; the agent serves on.
    let big = pb::CreateContainerRequest {
        container_id: "big".into(),
        spec_json: vec![b' '; 5 << 20],
        ..Default::default()
    };
    assert!(a.client.create_container(ctx(), &big).await.is_err());
    a.new_client()
        .await
        .health(ctx(), &pb::HealthRequest::new())
        .await
        .expect("a fresh client is served after an oversized message");

    // A client that goes away in the middle of a blocking read.
    {
        let c = a.new_client().await;
        let req = pb::ReadOutputRequest {
            container_id: "dup".into(),
            max_bytes: 10,
            ..Default::default()
        };
        let read = tokio::spawn(async move { c.read_stdout(ctx(), &req).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        read.abort();
    }
    a.new_client()
        .await
        .health(ctx(), &pb::HealthRequest::new())
        .await
        .unwrap();
    a.remove("dup").await;
    let (code, _) = status_of(
        &a.client
            .remove_container(
                ctx(),
                &pb::RemoveContainerRequest {
                    container_id: "dup".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
}

fn cap_sys_resource(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

#[tokio::test]
async fn a_refused_oom_score_adj_is_an_error_naming_it() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "cat /proc/self/oom_score_adj");
    s["process"]["oomScoreAdj"] = json!(-999);
    if cap_sys_resource(a.pid()) {
        let (exit, out, _) = a.run_to_end("oom", &s).await;
        assert_eq!((exit.exit_status, out.trim()), (0, "-999"));
    } else {
        let (code, msg) = status_of(&a.create("oom", &s, false).await.unwrap_err());
        assert!(
            msg.contains("oomScoreAdj") && msg.contains("-999"),
            "{code:?} {msg}"
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        a.health().await;
    }
}

/// Every pid whose parent chain reaches `root`.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = after
            .1
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        parent_of.push((pid, ppid));
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

fn count_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Mounts of this host that involve `dir` (the test's rootfs lives there):
/// other work on the machine may mount and unmount elsewhere meanwhile.
fn count_mounts(dir: &Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .count()
}

#[tokio::test]
async fn hundred_cycles_leave_nothing_behind() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let s = spec(&a.rootfs(), &["true"]);
    // One warm-up cycle: the runtime's lazily created descriptors.
    a.run_to_end("warm", &s).await;
    let (procs, fds, mounts) = (
        descendants(a.pid()),
        count_fds(a.pid()),
        count_mounts(a.dir.path()),
    );
    for i in 0..100 {
        let id = format!("cycle-{i}");
        let (exit, _, _) = a.run_to_end(&id, &s).await;
        assert_eq!(exit.exit_status, 0, "cycle {i}");
    }
    assert_eq!(descendants(a.pid()), procs, "processes left behind");
    assert_eq!(count_fds(a.pid()), fds, "descriptors left behind");
    assert_eq!(count_mounts(a.dir.path()), mounts, "mounts left behind");
    assert_eq!(mounts, 0);
    a.health().await;
}

#[tokio::test]
async fn sandbox_containers_share_net_ipc_uts_but_not_mounts() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let req = pb::CreateSandboxRequest {
        sandbox_id: "pod".into(),
        hostname: "pod-host".into(),
        shared_dir: a.dir.path().display().to_string(),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.unwrap();
    let (code, _) = status_of(&a.client.create_sandbox(ctx(), &req).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    let script =
        "hostname; for n in net ipc uts mnt; do readlink /proc/self/ns/$n; done; sleep 100";
    let mut first = sh(&a, script);
    first["hostname"] = Value::Null;
    // Relative rootfs paths resolve in <shared_dir>/<container id>.
    std::fs::create_dir(a.dir.path().join("pause")).unwrap();
    first["root"]["path"] = json!("../rootfs");
    a.run("pause", &first).await;
    let mut second = sh(&a, script);
    second["hostname"] = Value::Null;
    a.run("app", &second).await;
    let lines = |s: String| s.lines().map(str::to_string).collect::<Vec<_>>();
    let p = lines(a.read_until("pause", "", "mnt:").await);
    let q = lines(a.read_until("app", "", "mnt:").await);
    assert_eq!((p[0].as_str(), q[0].as_str()), ("pod-host", "pod-host"));
    assert_eq!(p[1..4], q[1..4], "net, ipc and uts are shared");
    assert_ne!(p[4], q[4], "mount namespaces are not");
    a.client
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .await
        .unwrap();
    let (code, _) = status_of(&a.start_c("app").await.unwrap_err());
    assert_eq!(
        code,
        ttrpc::Code::NOT_FOUND,
        "DestroySandbox removed the containers"
    );
    assert!(
        descendants(a.pid()).is_empty(),
        "no process left: {:?}",
        descendants(a.pid())
    );
    let d = a
        .client
        .guest_details(ctx(), &pb::GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(!d.pid1 && d.cpus >= 1 && d.mem_total_bytes > 0 && !d.kernel_release.is_empty());
}

#[tokio::test]
async fn cgroup_v2_pause_resume_stats_and_removal() {
    if !require(
        nutshell_tests::which("unshare").is_some(),
        "needs unshare (util-linux)",
    ) {
        return;
    }
    let Some(a) = Agent::start_with(true).await else {
        return;
    };
    let cg = PathBuf::from(format!(
        "/proc/{}/root/sys/fs/cgroup/nutshell/ticker",
        a.pid()
    ));
    a.run(
        "ticker",
        &sh(&a, "while true; do echo tick; sleep 0.05; done"),
    )
    .await;
    let init_pid = a
        .client
        .list_processes(
            ctx(),
            &pb::ListProcessesRequest {
                container_id: "ticker".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .processes[0]
        .pid;
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == init_pid.to_string()),
        "init {init_pid} in {procs:?}"
    );
    assert!(a.read_until("ticker", "", "tick").await.contains("tick"));

    let req = pb::ContainerRequest {
        container_id: "ticker".into(),
        ..Default::default()
    };
    a.client.pause_container(ctx(), &req).await.unwrap();
    assert!(std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 1"));
    // Drain what was written before the freeze; then nothing more comes.
    while tokio::time::timeout(
        Duration::from_millis(300),
        a.read_chunk("ticker", "", false),
    )
    .await
    .is_ok()
    {}
    assert!(
        tokio::time::timeout(
            Duration::from_millis(700),
            a.read_chunk("ticker", "", false)
        )
        .await
        .is_err(),
        "output while paused"
    );
    a.client.resume_container(ctx(), &req).await.unwrap();
    assert!(std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 0"));
    let after = tokio::time::timeout(Duration::from_secs(5), a.read_until("ticker", "", "tick"))
        .await
        .expect("output after resume");
    assert!(after.contains("tick"));

    let stats = a.client.stats_container(ctx(), &req).await.unwrap();
    assert!(stats.cpu.usage_usec > 0, "cpu.stat read: {:?}", stats.cpu);

    // A limit whose controller this hierarchy lacks is a clear error.
    let controllers = std::fs::read_to_string(cg.join("cgroup.controllers")).unwrap();
    if !controllers.contains("memory") {
        let upd = pb::UpdateContainerRequest {
            container_id: "ticker".into(),
            resources_json: br#"{"memory":{"limit":67108864}}"#.to_vec(),
            ..Default::default()
        };
        let (_, msg) = status_of(&a.client.update_container(ctx(), &upd).await.unwrap_err());
        assert!(msg.contains("memory.max"), "{msg}");
    }
    a.remove("ticker").await;
    assert!(!cg.exists(), "the container's cgroup is removed");
    // The agent keeps its (now empty) parent cgroup; this host's hierarchy
    // is shared, so the test takes it away.
    if let Some(parent) = cg.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

#[tokio::test]
async fn large_output_arrives_intact() {
    let Some(a) = Agent::start().await else {
        return;
    };
    // 8 MiB of numbered lines: more than the agent buffers, so the
    // container blocks until the reads catch up.
    a.run("big", &sh(&a, "seq 1 2000000 | head -c 8388608"))
        .await;
    let out = a.read_all("big", "", false).await;
    assert_eq!(out.len(), 8 << 20);
    assert!(out.starts_with("1\n2\n3\n"));
    let expected: String = (1..=2_000_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out, expected[..8 << 20]);
    assert_eq!(a.wait("big", "").await.exit_status, 0);
    a.remove("big").await;
}

#[tokio::test]
async fn user_groups_cwd_env_umask_and_rlimits_apply() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(
        &a,
        "id -u; id -g; id -G; pwd; echo $FOO; umask; ulimit -n; grep CapEff /proc/self/status",
    );
    s["process"]["user"] =
        json!({ "uid": 65534, "gid": 65534, "additionalGids": [10, 20], "umask": 23 });
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": 512, "soft": 256 }]);
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        // A non-root process keeps capabilities across execve only as ambient.
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]
    });
    let (exit, out, err) = a.run_to_end("user", &s).await;
    assert_eq!(exit.exit_status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..7],
        [
            "65534",
            "65534",
            "65534 10 20",
            "/tmp",
            "bar",
            "0027",
            "256"
        ],
        "{out}"
    );
    // CAP_KILL is bit 5.
    assert_eq!(
        lines[7].split_whitespace().nth(1),
        Some("0000000000000020"),
        "{out}"
    );
}

#[tokio::test]
async fn a_refused_rlimit_raise_is_an_error_naming_it() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", a.pid())).unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap();
    let mut s = sh(&a, "ulimit -Hn");
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": hard + 1, "soft": 1024 }]);
    if cap_sys_resource(a.pid()) {
        let (exit, out, _) = a.run_to_end("rlimit", &s).await;
        assert_eq!(
            (exit.exit_status, out.trim().to_string()),
            (0, (hard + 1).to_string())
        );
    } else {
        let (code, msg) = status_of(&a.create("rlimit", &s, false).await.unwrap_err());
        assert!(
            msg.contains("RLIMIT_NOFILE") && msg.contains("CAP_SYS_RESOURCE"),
            "{code:?} {msg}"
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        a.health().await;
    }
}

#[tokio::test]
async fn masked_paths_readonly_paths_and_sysctls_apply() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want = if host_forward.trim() == "1" { "0" } else { "1" };
    let mut s = sh(
        &a,
        "wc -c < /proc/timer_list; cat /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/kernel/panic",
    );
    s["linux"]["sysctl"] = json!({ "net.ipv4.ip_forward": want });
    let (exit, out, err) = a.run_to_end("masked", &s).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["0", want], "stdout {out:?} stderr {err:?}");
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "the host's sysctl is untouched"
    );
}

#[tokio::test]
async fn signal_all_reaches_every_process() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("all", &sh(&a, "sleep 100 & sleep 100 & echo started; wait"))
        .await;
    assert!(a.read_until("all", "", "started").await.contains("started"));
    let procs = a
        .client
        .list_processes(
            ctx(),
            &pb::ListProcessesRequest {
                container_id: "all".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(procs.processes.len(), 3, "{:?}", procs.processes);
    let req = pb::SignalProcessRequest {
        container_id: "all".into(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    a.client.signal_process(ctx(), &req).await.unwrap();
    assert_eq!(a.wait("all", "").await.signal, 9);
    for p in procs.processes {
        assert!(
            !Path::new(&format!("/proc/{}", p.pid)).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "pid {} survived",
            p.pid
        );
    }
    a.remove("all").await;
}

/// A protobuf length-delimited field.
fn pb_field(field: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    let mut n = data.len();
    loop {
        if n < 0x80 {
            out.push(n as u8);
            break;
        }
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.extend_from_slice(data);
    out
}

/// One raw ttrpc request frame (the client library refuses to send an
/// oversized one, so the agent's side is driven by hand).
fn ttrpc_frame(stream: u32, method: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = pb_field(1, b"nutshell.agent.v1.Agent");
    body.extend(pb_field(2, method.as_bytes()));
    body.extend(pb_field(3, payload));
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(stream.to_be_bytes());
    frame.extend([1u8, 0u8]);
    frame.extend(body);
    frame
}

fn read_frame(s: &mut std::os::unix::net::UnixStream) -> (u32, Vec<u8>) {
    use std::io::Read;
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr).unwrap();
    let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let stream = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (stream, body)
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_connection_goes_on() {
    use std::io::Write;
    let Some(a) = Agent::start().await else {
        return;
    };
    let sock = a.sock.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        s.write_all(&ttrpc_frame(1, "CreateContainer", &vec![b'x'; 5 << 20]))
            .unwrap();
        let (stream, body) = read_frame(&mut s);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(stream, 1);
        assert!(text.contains("exceed maximum message size"), "{text}");
        s.write_all(&ttrpc_frame(3, "Health", &[])).unwrap();
        let (stream, body) = read_frame(&mut s);
        assert_eq!(stream, 3);
        assert!(String::from_utf8_lossy(&body).contains("SERVING"));
    })
    .await
    .unwrap();
    a.health().await;
}
