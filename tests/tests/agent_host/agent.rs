//! The harness: a nutshell-agent started on a Unix socket in a temp dir of
//! its own, a client with a deadline on every call, and OCI specs for the
//! busybox rootfs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nutshell_protocol::agent as pb;
use nutshell_protocol::agent_ttrpc::AgentClient;
use nutshell_tests::{agent_binary, busybox_rootfs, is_root, require, BUSYBOX};
use serde_json::{json, Value};

/// Every call gets a deadline so a bug fails the test instead of hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// A running agent on a socket in its own temp dir, killed on drop.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub client: AgentClient,
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
    pub async fn start() -> Option<Self> {
        Self::start_with(false).await
    }

    /// `private_cgroup2`: run the agent in its own mount namespace with a
    /// cgroup2 hierarchy mounted on /sys/fs/cgroup, so the cgroup v2 code
    /// runs even on a cgroup v1 host (with whatever controllers v2 has).
    pub async fn start_with(private_cgroup2: bool) -> Option<Self> {
        Self::launch(private_cgroup2, None).await
    }

    /// The agent in the network namespace at `netns` (e.g. /run/netns/x),
    /// so UpdateNetwork changes that namespace's links only.
    pub async fn start_in_netns(netns: &Path) -> Option<Self> {
        Self::launch(false, Some(netns)).await
    }

    async fn launch(private_cgroup2: bool, netns: Option<&Path>) -> Option<Self> {
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
        if let Some(netns) = netns {
            // nsenter execs the command: the child is still the agent.
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", netns.display()))
                .arg("--")
                .arg(cmd.get_program())
                .args(cmd.get_args());
            cmd = c;
        }
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

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub async fn new_client(&self) -> AgentClient {
        AgentClient::new(
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.sock.display()))
                .await
                .unwrap(),
        )
    }

    pub async fn health(&self) {
        let h = self
            .client
            .health(ctx(), &pb::HealthRequest::new())
            .await
            .expect("the agent answers Health");
        assert_eq!(h.status, "SERVING");
    }

    pub async fn create(
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

    pub async fn start_c(&self, id: &str) -> ttrpc::Result<pb::Empty> {
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

    pub async fn run(&self, id: &str, spec: &Value) {
        self.create(id, spec, false).await.unwrap();
        self.start_c(id).await.unwrap();
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
        let req = pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).await.unwrap()
    }

    pub async fn read_chunk(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> pb::ReadOutputResponse {
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
    pub async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
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
    pub async fn read_until(&self, id: &str, exec_id: &str, needle: &str) -> String {
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

    pub async fn signal(&self, id: &str, exec_id: &str, sig: u32) {
        let req = pb::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).await.unwrap();
    }

    pub async fn remove(&self, id: &str) {
        self.try_remove(id).await.unwrap();
    }

    pub async fn try_remove(&self, id: &str) -> ttrpc::Result<pb::Empty> {
        let req = pb::RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.remove_container(ctx(), &req).await
    }

    pub async fn list_processes(&self, id: &str) -> pb::ListProcessesResponse {
        let req = pb::ListProcessesRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.list_processes(ctx(), &req).await.unwrap()
    }

    /// Writes `data` to the container's stdin; returns how much was taken.
    pub async fn write_stdin(&self, id: &str, data: &[u8]) -> u32 {
        let req = pb::WriteStdinRequest {
            container_id: id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.client.write_stdin(ctx(), &req).await.unwrap().written
    }

    pub async fn exec(
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
    pub async fn run_to_end(
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

pub const ALL_CAPS: [&str; 14] = [
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
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
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

pub fn sh(agent: &Agent, script: &str) -> Value {
    spec(&agent.rootfs(), &["sh", "-c", script])
}

/// The request of the calls that name only a container (pause, resume,
/// stats).
pub fn container(id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

pub fn status_of(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an rpc status, got {other:?}"),
    }
}
