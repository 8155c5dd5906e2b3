//! The real guest (installed kernel + initramfs with the agent as PID 1)
//! under QEMU/TCG, driven through `nutshell-runtime`: the QEMU backend, its
//! supervision, and the agent client over hybrid vsock.
//!
//! TCG boots cost seconds of CPU, so one VM serves most checks
//! (`guest_runs_containers`), and the VM tests run one at a time.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nutshell_protocol::agent::{
    CreateContainerRequest, ExecProcessRequest, Interface, UpdateNetworkRequest,
};
use nutshell_protocol::DEFAULT_AGENT_VSOCK_PORT;
use nutshell_runtime::agent::{AgentAddress, AgentClient, AgentError, DialOptions};
use nutshell_runtime::hypervisor::qemu::QemuHypervisor;
use nutshell_runtime::hypervisor::{
    Accel, Hypervisor, ProcessRole, ProcessStatus, VmConfig, GUEST_CID,
};
use nutshell_runtime::sandbox::{Sandbox, GUEST_SHARED_DIR};
use nutshell_tests::{
    assert_no_vm_left, build_vsock_probe, busybox_rootfs, guest_dir, is_root, require, BUSYBOX,
};
use serde_json::{json, Value};

/// VM tests run one at a time: each TCG guest wants a whole CPU here.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// Where the agent must answer by, from QEMU's start (TCG on a loaded
/// 2-core machine; a boot takes 1–2 s when idle).
const AGENT_DEADLINE: Duration = Duration::from_secs(60);

/// The prerequisites of every test here; `None` means skip.
fn prerequisites() -> Option<QemuHypervisor> {
    if !require(is_root(), "needs root (vhost-user sockets, virtiofsd)") {
        return None;
    }
    let guest = guest_dir();
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        let p = guest.join(f);
        if !require(
            p.is_file(),
            &format!("needs {} (guest-image/build.sh --install)", p.display()),
        ) {
            return None;
        }
    }
    if !require(
        Path::new(BUSYBOX).is_file(),
        "needs /bin/busybox (busybox-static)",
    ) {
        return None;
    }
    match QemuHypervisor::discover() {
        Ok(hv) => Some(hv),
        Err(e) => {
            require(
                false,
                &format!("needs QEMU and the vhost-user backends ({e}); run tools/setup.sh"),
            );
            None
        }
    }
}

/// Runs `body` on a fresh multi-threaded runtime, under [`VM_LOCK`], with
/// an overall limit so a hang fails the test instead of the run.
fn vm_test<F: Future<Output = ()>>(limit: Duration, body: impl FnOnce() -> F) {
    let _serial = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, body())
            .await
            .expect("the test took too long");
    });
}

fn vm_config(id: &str, state: &Path, shared: Option<&Path>) -> VmConfig {
    let mut c = VmConfig::new(id, state.join(id));
    c.kernel = guest_dir().join("vmlinux");
    c.initrd = guest_dir().join("initramfs.cpio.gz");
    c.accel = Accel::Tcg;
    c.memory_mib = 256;
    c.shared_dir = shared.map(Path::to_path_buf);
    c
}

fn dial_options() -> DialOptions {
    DialOptions {
        deadline: AGENT_DEADLINE,
        call_timeout: Duration::from_secs(30),
        ..DialOptions::default()
    }
}

/// A minimal OCI runtime spec for busybox: its own pid, mount, uts, ipc and
/// network namespaces unless `join` names a namespace path for a kind.
fn spec(args: &[&str], join: &BTreeMap<&str, String>, resources: Value) -> Vec<u8> {
    let namespaces: Vec<Value> = ["pid", "mount", "uts", "ipc", "network"]
        .iter()
        .map(|kind| match join.get(kind) {
            Some(path) => json!({"type": kind, "path": path}),
            None => json!({"type": kind}),
        })
        .collect();
    serde_json::to_vec(&json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "guest-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {"namespaces": namespaces, "resources": resources}
    }))
    .unwrap()
}

/// The guest path of the rootfs every container here uses.
fn guest_rootfs() -> String {
    format!("{GUEST_SHARED_DIR}/rootfs")
}

async fn create(agent: &AgentClient, id: &str, spec_json: Vec<u8>, stdin: bool) -> u32 {
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json,
        rootfs: guest_rootfs(),
        stdin,
        ..Default::default()
    };
    agent
        .create_container(&req)
        .await
        .unwrap_or_else(|e| panic!("creating {id}: {e:#}"))
        .pid
}

/// Reads a process's stdout (or stderr) to EOF.
async fn drain(agent: &AgentClient, cid: &str, exec: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let r = if stderr {
            agent.read_stderr(cid, exec, 65536).await
        } else {
            agent.read_stdout(cid, exec, 65536).await
        }
        .unwrap_or_else(|e| panic!("reading the output of {cid}/{exec}: {e:#}"));
        out.extend_from_slice(&r.data);
        if r.eof {
            return String::from_utf8_lossy(&out).into_owned();
        }
    }
}

struct Outcome {
    status: i32,
    signal: i32,
    stdout: String,
    stderr: String,
}

/// Creates, starts and waits for a container, feeding `stdin` (then closing
/// it) and collecting its output; removes it afterwards.
async fn run(agent: &AgentClient, id: &str, spec_json: Vec<u8>, stdin: Option<&[u8]>) -> Outcome {
    let out = run_kept(agent, id, spec_json, stdin).await;
    agent.remove_container(id).await.unwrap();
    out
}

/// [`run`], leaving the exited container in place.
async fn run_kept(
    agent: &AgentClient,
    id: &str,
    spec_json: Vec<u8>,
    stdin: Option<&[u8]>,
) -> Outcome {
    create(agent, id, spec_json, stdin.is_some()).await;
    agent.start_container(id).await.unwrap();
    if let Some(data) = stdin {
        let mut sent = 0;
        while sent < data.len() {
            sent += agent.write_stdin(id, "", &data[sent..]).await.unwrap() as usize;
        }
        agent.close_stdin(id, "").await.unwrap();
    }
    let (stdout, stderr, wait) = tokio::join!(
        drain(agent, id, "", false),
        drain(agent, id, "", true),
        agent.wait_process(id, "")
    );
    let wait = wait.unwrap();
    Outcome {
        status: wait.exit_status,
        signal: wait.signal,
        stdout,
        stderr,
    }
}

/// Runs `args` in a running container and returns its stdout.
async fn exec(agent: &AgentClient, cid: &str, exec_id: &str, args: &[&str]) -> String {
    let process = json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/"
    });
    let req = ExecProcessRequest {
        container_id: cid.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        stdin: false,
        ..Default::default()
    };
    agent.exec_process(&req).await.unwrap();
    let (out, wait) = tokio::join!(
        drain(agent, cid, exec_id, false),
        agent.wait_process(cid, exec_id)
    );
    assert_eq!(
        wait.unwrap().exit_status,
        0,
        "exec {args:?} in {cid} failed"
    );
    out
}

/// Every process whose command line mentions `needle`.
fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// One VM, many checks: health, uname, exit codes and stdio, cgroup v2
/// limits, shared namespaces, pause/resume and stats; then a clean shutdown.
#[test]
fn guest_runs_containers() {
    let Some(hv) = prerequisites() else { return };
    vm_test(Duration::from_secs(600), || async move {
        let guest = boot(&hv, "guest-runs-containers", |_| {}).await;
        let rootfs_src = guest.rootfs_src.clone();
        let agent = guest.sandbox.agent();
        let vm = guest.sandbox.vm();

        // The guest: its own kernel, cgroup v2, the agent as PID 1.
        let details = agent.guest_details().await.unwrap();
        assert!(details.pid1 && details.cgroup_v2, "{details:?}");
        assert_ne!(details.kernel_release, host_kernel_release());
        let mem = vm.host_memory().unwrap();
        eprintln!(
            "guest memory in use {} MiB; host RSS {} MiB, PSS {} MiB over {} processes",
            (details.mem_total_bytes - details.mem_available_bytes) >> 20,
            mem.rss_kib >> 10,
            mem.pss_kib >> 10,
            mem.processes
        );

        // UpdateNetwork reads the guest kernel's links, routes and
        // neighbours over rtnetlink: no NIC asked for, nothing to change; a
        // NIC the guest lacks (it has none here) is NOT_FOUND naming it.
        agent
            .update_network(&UpdateNetworkRequest::default())
            .await
            .unwrap();
        let missing = UpdateNetworkRequest {
            interfaces: vec![Interface {
                mac: "02:00:00:5e:aa:01".into(),
                name: "eth0".into(),
                up: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = agent.update_network(&missing).await.unwrap_err();
        assert_eq!(e.rpc_code(), Some(ttrpc::Code::NOT_FOUND), "{e:#}");
        let msg = e.rpc_message().unwrap_or_default();
        assert!(
            msg.contains("02:00:00:5e:aa:01") && msg.contains("lo 00:00:00:00:00:00"),
            "{msg}"
        );

        let none = BTreeMap::new();

        // uname -r in a container prints the guest kernel's release.
        let out = run(
            agent,
            "uname",
            spec(&["uname", "-r"], &none, json!({})),
            None,
        )
        .await;
        assert_eq!(
            (out.status, out.stdout.trim()),
            (0, details.kernel_release.as_str())
        );

        // Exit codes, stdin and stdout come through.
        let out = run(
            agent,
            "exit3",
            spec(&["sh", "-c", "echo to-err >&2; exit 3"], &none, json!({})),
            None,
        )
        .await;
        assert_eq!((out.status, out.stderr.as_str()), (3, "to-err\n"));
        let text = b"line one\nline two\n";
        let out = run(agent, "cat", spec(&["cat"], &none, json!({})), Some(text)).await;
        assert_eq!((out.status, out.stdout.as_bytes()), (0, &text[..]));

        // pids.max stops a fork loop.
        let bomb = "for i in $(seq 40); do sleep 30 & done; echo all-forked";
        let out = run(
            agent,
            "forks",
            spec(&["sh", "-c", bomb], &none, json!({"pids": {"limit": 8}})),
            None,
        )
        .await;
        assert_ne!(
            out.status, 0,
            "the fork loop was not stopped: {}",
            out.stdout
        );
        assert!(!out.stdout.contains("all-forked"));
        assert!(out.stderr.contains("fork"), "stderr: {}", out.stderr);

        // memory.max makes the kernel OOM-kill, and the agent reports it,
        // even to a client that asks only after WaitProcess returned and
        // the container was removed (so the 200 ms poll stopped): the exit
        // itself checks memory.events before it is reported.
        let hog = spec(
            &["tail", "/dev/zero"],
            &none,
            json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}}),
        );
        let out = run_kept(agent, "hog", hog, None).await;
        assert_eq!(
            (out.status, out.signal),
            (137, 9),
            "the hog was not OOM-killed"
        );
        agent.remove_container("hog").await.unwrap();
        // Queued before the exit was reported: no waiting for a poll.
        let oom = tokio::time::timeout(Duration::from_secs(5), agent.get_oom_event())
            .await
            .expect("no OOM event queued by the time WaitProcess returned")
            .unwrap();
        assert_eq!(oom.container_id, "hog");

        // Two containers in one pod share net and ipc but not mount.
        let pause_pid = create(
            agent,
            "pod-pause",
            spec(&["sleep", "1000"], &none, json!({})),
            false,
        )
        .await;
        agent.start_container("pod-pause").await.unwrap();
        let join: BTreeMap<&str, String> = [
            ("network", format!("/proc/{pause_pid}/ns/net")),
            ("ipc", format!("/proc/{pause_pid}/ns/ipc")),
        ]
        .into_iter()
        .collect();
        let ns = [
            "sh",
            "-c",
            "for n in net ipc mnt; do readlink /proc/self/ns/$n; done",
        ];
        let theirs = exec(agent, "pod-pause", "ns", &ns).await;
        let ours = run(agent, "pod-app", spec(&ns, &join, json!({})), None)
            .await
            .stdout;
        let (theirs, ours): (Vec<&str>, Vec<&str>) =
            (theirs.lines().collect(), ours.lines().collect());
        assert_eq!(theirs.len(), 3, "{theirs:?}");
        assert_eq!(ours.len(), 3, "{ours:?}");
        assert_eq!(theirs[..2], ours[..2], "net/ipc not shared");
        assert_ne!(theirs[2], ours[2], "mount namespace shared");

        // Pause freezes a container, resume thaws it: its counter, written
        // into the shared directory, stops and goes on. Stats come back.
        let counter = rootfs_src.join("tmp/count");
        let tick = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done";
        create(
            agent,
            "ticker",
            spec(&["sh", "-c", tick], &none, json!({"pids": {"limit": 50}})),
            false,
        )
        .await;
        agent.start_container("ticker").await.unwrap();
        let read_count = || {
            std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        wait_until("the ticker to start", || read_count() > 2).await;
        agent.pause_container("ticker").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frozen = read_count();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(read_count(), frozen, "a paused container kept running");
        agent.resume_container("ticker").await.unwrap();
        wait_until("the ticker to resume", || read_count() > frozen + 2).await;
        let stats = agent.stats_container("ticker").await.unwrap();
        let (cpu, memory, pids) = (
            stats.cpu.unwrap(),
            stats.memory.unwrap(),
            stats.pids.unwrap(),
        );
        assert!(cpu.usage_usec > 0, "{cpu:?}");
        assert!(memory.usage > 0, "{memory:?}");
        assert!(pids.current >= 1 && pids.limit == 50, "{pids:?}");
        agent.signal_process("ticker", "", 9, true).await.unwrap();
        let w = agent.wait_process("ticker", "").await.unwrap();
        assert_eq!((w.exit_status, w.signal), (137, 9));
        agent.remove_container("ticker").await.unwrap();

        // Memory-cgroup-accounted per-CPU data lives in a second per-CPU
        // chunk, made at the first container's cgroup. Its zeroed
        // bookkeeping array is sized by the chunk's unit, which the
        // default allocator rounds up to 2 MiB: 4 MiB of vmalloc per guest.
        // `percpu_alloc=page` (the runtime's command line) keeps it small.
        let meminfo = run(
            agent,
            "meminfo",
            spec(&["cat", "/proc/meminfo"], &none, json!({})),
            None,
        )
        .await
        .stdout;
        let vmalloc_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("VmallocUsed:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmallocUsed in the guest's meminfo: {meminfo}"));
        assert!(
            vmalloc_kib < 2048,
            "the guest uses {vmalloc_kib} KiB of vmalloc after its containers ran"
        );

        guest.shut_down().await;
    });
}

/// A booted guest with a sandbox created and the busybox rootfs in its
/// shared directory at [`guest_rootfs`].
struct Guest {
    tmp: tempfile::TempDir,
    state: PathBuf,
    /// The host directory the rootfs is a bind mount of.
    rootfs_src: PathBuf,
    rootfs: PathBuf,
    sandbox: Sandbox,
}

/// Boots a guest named `id`; `prepare` adds to the rootfs before the guest
/// sees it.
async fn boot(hv: &QemuHypervisor, id: &str, prepare: impl FnOnce(&Path)) -> Guest {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let config = vm_config(id, tmp.path(), Some(&shared));
    let state = config.state_dir.clone();

    let started = Instant::now();
    let sandbox = Sandbox::start(hv, &config, &dial_options())
        .await
        .unwrap_or_else(|e| panic!("{:#}", ErrChain(&e)));
    let ready = started.elapsed();
    eprintln!("agent answered {ready:?} after QEMU started");
    let agent = sandbox.agent();
    // The rootfs arrives as the shim's do: bind-mounted into the shared
    // directory after the VM started.
    let rootfs_src = tmp.path().join("rootfs-src");
    busybox_rootfs(&rootfs_src).unwrap();
    prepare(&rootfs_src);
    let rootfs = shared.join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    nix::mount::mount(
        Some(&rootfs_src),
        &rootfs,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    assert!(agent.health().await.unwrap().status == "SERVING");
    sandbox.set_up(id, "pod", false).await.unwrap();
    Guest {
        tmp,
        state,
        rootfs_src,
        rootfs,
        sandbox,
    }
}

impl Guest {
    /// A clean shutdown: the guest powers off, everything is reaped.
    async fn shut_down(self) {
        // Lazily, as a shim must: virtiofsd holds the files the guest has
        // looked up until the guest forgets them.
        nix::mount::umount2(&self.rootfs, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let pids: Vec<u32> = self
            .sandbox
            .vm()
            .processes()
            .iter()
            .map(|(_, p)| *p)
            .collect();
        let exit = self.sandbox.shutdown(Duration::from_secs(20)).await;
        assert!(exit.is_clean_poweroff(), "{exit}");
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} left"
            );
        }
        assert_no_vm_left(self.tmp.path(), &self.state);
    }
}

/// A container cannot talk to the agent: a vsock client in one, as root
/// (with every capability, no seccomp) or as nobody, gets no service from
/// the agent's port at the local CID or at the guest's own CID (the guest
/// kernel has no vsock loopback; the agent serves only the host's CID).
/// The probe creates its AF_VSOCK socket first, so a guest without vsock
/// cannot pass for one that refuses, and it tells "served" apart from
/// "refused" and "closed" (agent_host's reach.rs shows it served by an
/// agent). The container sees neither the agent nor the guest's /run.
#[test]
fn containers_cannot_reach_the_agent() {
    let Some(hv) = prerequisites() else { return };
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = probe_dir.path().join("vsock_probe");
    let built = build_vsock_probe(&probe);
    if !require(built.is_ok(), &format!("{:?}", built.err())) {
        return;
    }
    vm_test(Duration::from_secs(300), || async move {
        let guest = boot(&hv, "no-agent-access", |rootfs| {
            std::fs::copy(&probe, rootfs.join("bin/vsock_probe")).unwrap();
        })
        .await;
        let agent = guest.sandbox.agent();
        let none = BTreeMap::new();
        let port = DEFAULT_AGENT_VSOCK_PORT.to_string();
        for cid in [nix::libc::VMADDR_CID_LOCAL, GUEST_CID] {
            for uid in [0, 65534] {
                let cid = cid.to_string();
                let mut s: Value = serde_json::from_slice(&spec(
                    &["/bin/vsock_probe", "vsock", &cid, &port],
                    &none,
                    json!({}),
                ))
                .unwrap();
                s["process"]["user"] = json!({"uid": uid, "gid": uid});
                let id = format!("probe-{cid}-{uid}");
                let out = run(agent, &id, serde_json::to_vec(&s).unwrap(), None).await;
                eprintln!("{id}: {:?}", out.stdout);
                let lines: Vec<&str> = out.stdout.lines().collect();
                assert_eq!(lines.first(), Some(&"socket ok"), "{id}: {}", out.stderr);
                let verdict = lines.get(1).copied().unwrap_or_default();
                assert!(
                    verdict.starts_with("refused ") || verdict.starts_with("closed"),
                    "{id}: a container got {verdict:?} from the agent's port"
                );
                assert_eq!(out.status, 1, "{id}");
            }
        }

        // Its own pid namespace hides the agent (pid 1 is the container's
        // shell) and the guest's /run (the shared directory, every rootfs)
        // is not in its mount namespace.
        let script = "echo $$; readlink /proc/1/exe; ls -A /run";
        let out = run(
            agent,
            "look",
            spec(&["sh", "-c", script], &none, json!({})),
            None,
        )
        .await;
        assert_eq!(
            (out.status, out.stdout.as_str()),
            (0, "1\n/bin/busybox\n"),
            "{}",
            out.stderr
        );
        guest.shut_down().await;
    });
}

/// Polls `cond` every 50 ms for up to 20 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `kill -9`'d QEMU is reported as such within seconds; calls in flight
/// fail at once; nothing is left behind.
#[test]
fn killed_qemu_is_reported() {
    let Some(hv) = prerequisites() else { return };
    vm_test(Duration::from_secs(300), || async move {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let config = vm_config("killed-qemu", tmp.path(), Some(&shared));
        let state = config.state_dir.clone();
        let vm = hv.launch(&config).await.unwrap();
        let agent = AgentClient::connect(
            &AgentAddress::hybrid_vsock(vm.agent_socket()),
            &dial_options(),
            Some(vm.end_watch()),
        )
        .await
        .unwrap_or_else(|e| panic!("{:#}", ErrChain(&e)));
        let blocked = {
            let agent = agent.clone();
            tokio::spawn(async move { agent.get_oom_event().await })
        };
        let qemu = vm
            .processes()
            .iter()
            .find(|(r, _)| *r == ProcessRole::Vmm)
            .map(|(_, p)| *p)
            .unwrap();
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), vm.ended())
            .await
            .expect("the killed QEMU was not noticed within 5 s");
        eprintln!("noticed in {:?}: {exit}", killed.elapsed());
        assert_eq!((exit.role, exit.pid), (ProcessRole::Vmm, qemu));
        assert_eq!(exit.status, ProcessStatus::Signaled(9));
        assert!(!exit.requested);
        assert!(exit.to_string().contains("SIGKILL"), "{exit}");
        let e = tokio::time::timeout(Duration::from_secs(2), blocked)
            .await
            .expect("a blocked call outlived the VM")
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, AgentError::VmEnded { .. }), "{e}");
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// A guest that dies before its agent answers fails the dial at once, and
/// the error quotes the console.
#[test]
fn a_guest_that_dies_early_is_reported_with_its_console() {
    let Some(hv) = prerequisites() else { return };
    vm_test(Duration::from_secs(300), || async move {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = vm_config("dies-early", tmp.path(), None);
        // No such init: the kernel panics, and panic=-1 ends QEMU.
        config.kernel_params = vec!["rdinit=/no-such-init".into(), "init=/no-such-init".into()];
        let state = config.state_dir.clone();
        let t = Instant::now();
        let e = Sandbox::start(&hv, &config, &dial_options())
            .await
            .unwrap_err();
        let text = format!("{:#}", ErrChain(&e));
        eprintln!("failed after {:?}: {text}", t.elapsed());
        assert!(t.elapsed() < AGENT_DEADLINE, "waited for the deadline");
        assert!(
            text.contains("the VM ended while waiting for the agent to answer"),
            "{text}"
        );
        assert!(text.contains("Kernel panic"), "no console quoted: {text}");
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// An agent that never answers (it listens on another port) fails the dial
/// at its deadline, the VM is killed, and the error quotes the console.
#[test]
fn an_agent_that_never_answers_fails_at_the_deadline() {
    let Some(hv) = prerequisites() else { return };
    vm_test(Duration::from_secs(300), || async move {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = vm_config("never-answers", tmp.path(), None);
        config.kernel_params = vec!["nutshell.agent_port=2000".into()];
        let state = config.state_dir.clone();
        let deadline = Duration::from_secs(8);
        let dial = DialOptions {
            deadline,
            ..dial_options()
        };
        let t = Instant::now();
        let e = Sandbox::start(&hv, &config, &dial).await.unwrap_err();
        let took = t.elapsed();
        let text = format!("{:#}", ErrChain(&e));
        eprintln!("failed after {took:?}: {text}");
        assert!(
            took >= deadline && took < deadline + Duration::from_secs(8),
            "{took:?}"
        );
        assert!(text.contains("did not answer within 8s"), "{text}");
        assert!(
            text.contains("the VM was killed") && text.contains("last console lines"),
            "{text}"
        );
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// The client speaks to the real agent on a host Unix socket too (how it is
/// tried out without a guest): Health with the protocol check, then
/// GuestDetails reporting the host's own kernel.
#[test]
fn the_client_speaks_to_the_agent_on_a_unix_socket() {
    let Some(agent_bin) = nutshell_tests::agent_binary() else {
        require(
            false,
            "needs the nutshell-agent binary (tools/build-agent.sh)",
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    let mut agent = std::process::Command::new(agent_bin)
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let opts = DialOptions {
            deadline: Duration::from_secs(20),
            ..DialOptions::default()
        };
        let client = AgentClient::connect(&AgentAddress::Unix(socket.clone()), &opts, None).await?;
        client.guest_details().await
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let details = result.unwrap_or_else(|e| panic!("{:#}", ErrChain(&e)));
    assert_eq!(details.kernel_release, host_kernel_release());
    assert!(!details.pid1);
}

/// Formats an error with its sources.
struct ErrChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
