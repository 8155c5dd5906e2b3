//! A private containerd 1.6 for end-to-end tests of the nutshell shim.
//!
//! Each [`Containerd`] has its own root, state, socket and config under a
//! fresh directory in `/run` (never the machine's `/var/lib/containerd` or
//! `/run/containerd/containerd.sock`). Its config is
//! `tools/lib/containerd-config.toml`, which the scripts' private containerd
//! (`tools/lib/containerd.sh`) renders too: runc as the CRI default runtime
//! and a `nutshell` handler beside it. The shim binary reaches containerd
//! through `PATH`, the nutshell config through `NUTSHELL_CONFIG` (and the
//! CRI option `ConfigPath`).
//!
//! Images come from `tools/lib/test-images.sh` (built offline with `umoci`
//! from `busybox-static`, imported under fully-qualified names
//! [`BUSYBOX_IMAGE`] and [`PAUSE_IMAGE`]).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::netns::{bridge_conflist, TestNetns};
use crate::{
    guest_dir, is_root, require, run_ok, start_daemon, terminate, test_images_script, which,
    workspace_root, BUSYBOX,
};
use containerd_shim_protos::api::ConnectRequest;
use containerd_shim_protos::shim_sync::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context;
use nutshell_runtime::mounts::mounts_below;
use nutshell_runtime::shim::state::PodKey;

/// The busybox image every test runs (`NS_BUSYBOX_IMAGE` of
/// `tools/lib/test-images.sh`).
pub const BUSYBOX_IMAGE: &str = "docker.io/nutshell/busybox:latest";
/// The CRI sandbox ("pause") image (`NS_PAUSE_IMAGE` there).
pub const PAUSE_IMAGE: &str = "docker.io/nutshell/pause:latest";
/// The runtime name containerd maps to `containerd-shim-nutshell-v2`.
pub const NUTSHELL_RUNTIME: &str = "io.containerd.nutshell.v2";
/// The CRI runtime handler.
pub const NUTSHELL_HANDLER: &str = "nutshell";
/// Where the shim keeps per-pod state.
pub const NUTSHELL_RUN_DIR: &str = "/run/nutshell";
/// containerd namespace the tests use.
pub const NAMESPACE: &str = "nutshell-test";
/// The namespace of containerd's CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Serialises the tests that drive VMs: the machine has 2 cores, and a
/// leak check must not see another test's VM.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The built shim: `$NUTSHELL_SHIM_BIN`, else the workspace's debug or
/// release build.
pub fn shim_binary() -> Option<PathBuf> {
    built_binary("NUTSHELL_SHIM_BIN", "containerd-shim-nutshell-v2")
}

/// The built `nutshell` CLI (`nutshell pool` under [`TEST_POOL_ENV`]):
/// `$NUTSHELL_CLI_BIN`, else the workspace's debug or release build.
pub fn nutshell_cli_binary() -> Option<PathBuf> {
    built_binary("NUTSHELL_CLI_BIN", "nutshell")
}

/// The built runc-compatible CLI that Docker and Podman run
/// (`cargo build -p nutshell-runc`): `$NUTSHELL_RUNC_BIN`, else the
/// workspace's debug or release build.
pub fn runc_cli_binary() -> Option<PathBuf> {
    built_binary("NUTSHELL_RUNC_BIN", "nutshell-runc")
}

/// `$env` when set, else `name` from the workspace's debug or release
/// build (under `$CARGO_TARGET_DIR` when set).
fn built_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join(name))
        .find(|p| p.is_file())
}

/// Everything an end-to-end test needs, or the first thing missing.
pub fn prerequisites() -> Result<(), String> {
    if !is_root() {
        return Err("needs root".into());
    }
    for prog in ["containerd", "ctr", "umoci", "qemu-system-x86_64"] {
        if which(prog).is_none() {
            return Err(format!("needs {prog} on PATH"));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        return Err("needs /bin/busybox (busybox-static)".into());
    }
    for asset in ["vmlinux", "initramfs.cpio.gz"] {
        let p = guest_dir().join(asset);
        if !p.is_file() {
            return Err(format!("needs the guest image: {} is missing", p.display()));
        }
    }
    if shim_binary().is_none() {
        return Err(
            "needs the built containerd-shim-nutshell-v2 (cargo build -p nutshell-runtime)".into(),
        );
    }
    Ok(())
}

/// A nutshell config for tests: the guest image from [`guest_dir`], the
/// backend [`test_backend`] names, plus `extra` TOML lines for the `[vm]`
/// section; 60 s to reach the agent.
pub fn test_nutshell_config(extra_vm: &str) -> String {
    test_nutshell_config_dialing(extra_vm, Duration::from_secs(60))
}

/// [`test_nutshell_config`] with `dial_timeout` to reach the agent
/// (`agent.dial_timeout_ms`). Its pods boot cold, whatever pool the
/// machine runs; under [`TEST_POOL_ENV`] the private containerd gives
/// them a pool of its own.
pub fn test_nutshell_config_dialing(extra_vm: &str, dial_timeout: Duration) -> String {
    test_config(extra_vm, dial_timeout, "enabled = false\n")
}

/// Set to 1, every private containerd runs a warm pool (`nutshell pool`)
/// for the pods of a config that has none (`tools/test.sh` runs the
/// containerd suites once more so).
pub const TEST_POOL_ENV: &str = "NUTSHELL_TEST_POOL";

/// A test config whose `[pool]` section holds `pool` (TOML lines).
pub fn test_config(extra_vm: &str, dial_timeout: Duration, pool: &str) -> String {
    let g = guest_dir();
    format!(
        "[vm]\nbackend = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n{extra_vm}\n\
         [pool]\n{pool}\n[agent]\ndial_timeout_ms = {}\n[log]\nlevel = \"debug\"\n",
        test_backend(),
        g.join("vmlinux").display(),
        g.join("initramfs.cpio.gz").display(),
        dial_timeout.as_millis()
    )
}

/// The backend the containerd tests run pods on: `$NUTSHELL_TEST_BACKEND`
/// (`vmm` inside the nested-KVM environment, tools/nested-kvm.sh), else
/// `qemu`, which runs everywhere.
pub fn test_backend() -> String {
    std::env::var("NUTSHELL_TEST_BACKEND").unwrap_or_else(|_| "qemu".into())
}

/// The kernel release of the installed guest `vmlinux` (from its
/// `Linux version <release>` banner), what `uname -r` prints in a pod.
pub fn guest_kernel_release() -> Option<String> {
    let bytes = fs::read(guest_dir().join("vmlinux")).ok()?;
    let needle = b"Linux version ";
    let at = bytes.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let rest = &bytes[at..bytes.len().min(at + 128)];
    let end = rest
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// A running private containerd.
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    /// The warm pool its pods claim from, under [`TEST_POOL_ENV`].
    pool: Option<Child>,
    /// containerd's gRPC socket (also the CRI endpoint).
    pub socket: PathBuf,
    /// The nutshell config the shim reads (via `NUTSHELL_CONFIG`).
    pub nutshell_config: PathBuf,
    /// The network namespace containerd runs in, when not the machine's.
    netns: Option<PathBuf>,
}

impl Containerd {
    /// Writes the config, starts containerd, waits until it answers and
    /// imports the busybox and pause images.
    pub fn start(nutshell_config: &str) -> io::Result<Self> {
        Self::start_with(nutshell_config, None)
    }

    /// Like [`Self::start`], but the CRI runtime option `ConfigPath` names a
    /// second config, `cri_config`, instead of the one in `NUTSHELL_CONFIG`.
    pub fn start_with(nutshell_config: &str, cri_config: Option<&str>) -> io::Result<Self> {
        Self::start_full(nutshell_config, cri_config, None)
    }

    /// Like [`Self::start`], but containerd runs in `netns`, with the CNI
    /// network [`bridge_conflist`] there: its pods get addresses on a bridge
    /// in `netns`, never on the machine's network.
    pub fn start_in_netns(nutshell_config: &str, netns: &TestNetns) -> io::Result<Self> {
        Self::start_full(nutshell_config, None, Some(netns))
    }

    fn start_full(
        nutshell_config: &str,
        cri_config: Option<&str>,
        netns: Option<&TestNetns>,
    ) -> io::Result<Self> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Short: containerd's socket path must fit in sun_path.
        let dir = PathBuf::from(format!("/run/nutshell-test-{}-{n}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(dir.join("bin"))?;
        fs::create_dir_all(dir.join("cni"))?;
        if netns.is_some() {
            fs::write(
                dir.join("cni/10-nutshell-test.conflist"),
                bridge_conflist(&dir.join("cni-ipam")),
            )?;
        }
        let shim = shim_binary().ok_or_else(|| io::Error::other("shim binary not built"))?;
        symlink(&shim, dir.join("bin/containerd-shim-nutshell-v2"))?;
        let pool_socket = dir.join("pool.sock");
        let with_pool = |text: &str| with_test_pool(text, &pool_socket);
        let nutshell_config_path = dir.join("nutshell.toml");
        fs::write(&nutshell_config_path, with_pool(nutshell_config)?)?;
        let cri_config_path = match cri_config {
            Some(text) => {
                let p = dir.join("nutshell-cri.toml");
                fs::write(&p, with_pool(text)?)?;
                p
            }
            None => nutshell_config_path.clone(),
        };
        let pool = start_test_pool(&nutshell_config_path, &pool_socket, &dir.join("pool.log"))?;
        fs::write(
            dir.join("config.toml"),
            containerd_config(&dir, &cri_config_path),
        )?;
        let socket = dir.join("containerd.sock");
        let mut c = Self {
            dir,
            child: None,
            pool,
            socket,
            nutshell_config: nutshell_config_path,
            netns: netns.map(TestNetns::path),
        };
        c.spawn()?;
        // Once for ctr, once for the CRI plugin, which only sees k8s.io.
        for ns in [NAMESPACE, CRI_NAMESPACE] {
            c.import_images(ns)?;
        }
        Ok(c)
    }

    /// Imports the busybox and pause images into namespace `ns`.
    pub fn import_images(&self, ns: &str) -> io::Result<()> {
        run_ok(
            Command::new(test_images_script())
                .arg("import")
                .arg(&self.socket)
                .arg(ns),
        )
        .map(drop)
    }

    /// The state directory of pod `pod` of namespace `ns` of this
    /// containerd (the shim's own function computes it).
    pub fn pod_dir(&self, ns: &str, pod: &str) -> PathBuf {
        PodKey::new(&self.socket.display().to_string(), ns, pod).dir()
    }

    /// The pid task `id`'s shim reports as the task's in Connect (what
    /// containerd takes for the task's host process).
    pub fn shim_task_pid(&self, ns: &str, id: &str) -> io::Result<u32> {
        let bundle = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(ns)
            .join(id);
        let address = fs::read_to_string(bundle.join("address"))?;
        let client = Client::connect(address.trim()).map_err(io::Error::other)?;
        let req = ConnectRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp = TaskClient::new(client)
            .connect(context::with_timeout(10_000_000_000), &req)
            .map_err(io::Error::other)?;
        Ok(resp.task_pid)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        // nsenter execs containerd (no fork for a network namespace), so the
        // child is containerd itself.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", path)
            .env("NUTSHELL_CONFIG", &self.nutshell_config);
        let child = start_daemon(
            &mut cmd,
            "containerd",
            &self.dir.join("containerd.log"),
            Duration::from_secs(30),
            || Ok(self.socket.exists() && self.ctr(&["version"]).output()?.status.success()),
            || self.log_tail(40),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s); running shims
    /// and their pods keep running, as with a real containerd restart.
    pub fn stop(&mut self) -> io::Result<()> {
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Stops and starts containerd again on the same root and state.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// containerd's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The private directory (config, log, root, state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many VMs its pods claimed from its pool so far, when it runs
    /// one ([`TEST_POOL_ENV`]); the pool logs each claim.
    pub fn pool_claims(&self) -> Option<usize> {
        self.pool.as_ref()?;
        Some(claims_logged(&self.dir.join("pool.log")))
    }

    /// Waits until its pool, when it runs one, has a warm VM that no pod
    /// claimed yet, so that the next pod claims rather than boots cold
    /// whatever the machine's speed.
    pub fn wait_pool_warm(&self) -> Result<(), String> {
        match self.pool_claims() {
            Some(claims) => wait_warm(&self.dir.join("pool.log"), claims),
            None => Ok(()),
        }
    }

    /// A `ctr` command bound to this containerd and [`NAMESPACE`].
    pub fn ctr(&self, args: &[&str]) -> Command {
        self.ctr_in(NAMESPACE, args)
    }

    /// A `ctr` command bound to this containerd and namespace `ns`.
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", ns])
            .args(args);
        cmd
    }

    /// Runs `ctr args…`, returns its stdout, fails with stderr on error.
    pub fn ctr_ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.ctr(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ctr {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr run --rm --runtime io.containerd.nutshell.v2 BUSYBOX id cmd…`,
    /// with a timeout.
    pub fn run_nutshell(&self, id: &str, extra: &[&str], cmd: &[&str]) -> io::Result<Output> {
        let mut args = vec!["run", "--rm", "--runtime", NUTSHELL_RUNTIME];
        args.extend_from_slice(extra);
        args.push(BUSYBOX_IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        output_with_timeout(
            self.ctr(&args).stdin(Stdio::null()),
            Duration::from_secs(180),
        )
    }

    /// `ctr task delete id`: the task's exit status (ctr warns "exit with
    /// non-zero exit code N" and exits 0; silence means 0), `None` when the
    /// delete failed.
    pub fn delete_task(&self, id: &str) -> Option<i32> {
        let out = self.ctr(&["task", "delete", id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        match err.split("exit code ").nth(1) {
            Some(rest) => rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok(),
            None => Some(0),
        }
    }

    /// The status column of task `id` in `ctr task ls`; `None` when it is not
    /// listed.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let ls = self.ctr_ok(&["task", "ls"]).ok()?;
        ls.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        })
    }

    /// The last `n` lines of containerd's log (shim logs included).
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Kills and deletes every task and container left, in every namespace.
    pub fn remove_everything(&self) {
        let listed = self
            .ctr(&["namespaces", "list", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut namespaces: Vec<&str> = listed.lines().map(str::trim).collect();
        namespaces.extend([NAMESPACE, CRI_NAMESPACE]);
        namespaces.retain(|n| !n.is_empty());
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            let list = |what: &str| {
                self.ctr_in(ns, &[what, "list", "-q"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            for id in list("tasks")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                let _ = self
                    .ctr_in(ns, &["tasks", "kill", "-a", "-s", "SIGKILL", id])
                    .output();
                let _ = self.ctr_in(ns, &["tasks", "delete", "-f", id]).output();
            }
            for id in list("containers")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                let _ = self.ctr_in(ns, &["containers", "delete", id]).output();
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_everything();
        }
        let _ = self.stop();
        if let Some(pool) = self.pool.take() {
            let _ = terminate(pool, Duration::from_secs(30));
        }
        // containerd's snapshots are unmounted once no task uses them; what
        // is still mounted under the private root is unmounted here so the
        // directory can go.
        for m in mounts_below(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if std::env::var_os("NUTSHELL_KEEP_CONTAINERD").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `text` with a warm pool on `socket` when [`TEST_POOL_ENV`] asks for one
/// and the config has its pool off; else `text` as it is.
pub(crate) fn with_test_pool(text: &str, socket: &Path) -> io::Result<String> {
    if std::env::var(TEST_POOL_ENV).as_deref() != Ok("1") {
        return Ok(text.to_string());
    }
    let mut t: toml::Table = text.parse().map_err(io::Error::other)?;
    let pool = t
        .entry("pool")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(pool) = pool.as_table_mut() else {
        return Err(io::Error::other("[pool] is not a table"));
    };
    if pool.get("enabled").and_then(toml::Value::as_bool) != Some(false) {
        return Ok(text.to_string());
    }
    pool.insert("enabled".into(), true.into());
    pool.insert("socket".into(), socket.display().to_string().into());
    pool.insert("warm".into(), 1.into());
    Ok(t.to_string())
}

/// How many claims the pool log at `log` records.
pub(crate) fn claims_logged(log: &Path) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches("VM claimed")
        .count()
}

/// How long a pool may take to boot its next VM: minutes inside L1, where
/// everything is emulated.
const POOL_WARM_TIMEOUT: Duration = Duration::from_secs(180);

/// Waits until the pool logging to `log` has readied more VMs than the
/// `claims` made so far.
pub(crate) fn wait_warm(log: &Path, claims: usize) -> Result<(), String> {
    let deadline = Instant::now() + POOL_WARM_TIMEOUT;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.matches("warm VM ready").count() > claims {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the pool readied no VM within {POOL_WARM_TIMEOUT:?}:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test's own pool (`nutshell pool`, logging to `log`) when the config
/// at `config` has its pool on `socket`, as [`with_test_pool`] writes it.
pub(crate) fn start_test_pool(
    config: &Path,
    socket: &Path,
    log: &Path,
) -> io::Result<Option<Child>> {
    if pool_socket_in(config)?.as_deref() != Some(socket) {
        return Ok(None);
    }
    start_pool(config, log).map(Some)
}

/// The pool socket of the config at `path`, when its pool is on.
fn pool_socket_in(path: &Path) -> io::Result<Option<PathBuf>> {
    let t: toml::Table = fs::read_to_string(path)?
        .parse()
        .map_err(io::Error::other)?;
    let pool = t.get("pool").and_then(toml::Value::as_table);
    let on = pool
        .and_then(|p| p.get("enabled"))
        .and_then(toml::Value::as_bool)
        == Some(true);
    Ok(pool
        .filter(|_| on)
        .and_then(|p| p.get("socket"))
        .and_then(toml::Value::as_str)
        .map(PathBuf::from))
}

/// `nutshell pool --config config`, logging to `log`.
fn start_pool(config: &Path, log: &Path) -> io::Result<Child> {
    let cli = nutshell_cli_binary().ok_or_else(|| {
        io::Error::other("needs the built nutshell CLI (cargo build -p nutshell)")
    })?;
    Command::new(cli)
        .args(["pool", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?)
        .spawn()
}

/// `tools/lib/containerd-config.toml` for a containerd in `dir` whose CRI
/// pods read `nutshell_config`; at debug level, so the shims log at debug
/// level too.
fn containerd_config(dir: &Path, nutshell_config: &Path) -> String {
    include_str!("../../tools/lib/containerd-config.toml")
        .replace("@DIR@", &dir.display().to_string())
        .replace("@PAUSE_IMAGE@", PAUSE_IMAGE)
        .replace("@NUTSHELL_CONFIG@", &nutshell_config.display().to_string())
        .replace("@LOG_LEVEL@", "debug")
}

/// The directory holding the busybox and pause OCI archives
/// (`busybox.tar`, `pause.tar`), built by `tools/lib/test-images.sh` or
/// found in its cache.
pub fn test_images() -> io::Result<PathBuf> {
    let dir = run_ok(Command::new(test_images_script()).arg("build"))?;
    Ok(PathBuf::from(dir.trim()))
}

/// Runs `cmd`, killing it after `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait()?;
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{cmd:?} timed out after {timeout:?} ({s}); stdout: {}; stderr: {}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Starts one end-to-end test: takes the test lock, checks the prerequisites
/// (skipping, or failing under `NUTSHELL_REQUIRE_ALL=1`, when one is
/// missing), records the host's nutshell footprint, then starts a private
/// containerd whose nutshell runtime uses `nutshell_config`.
pub fn start_test(
    nutshell_config: &str,
) -> Option<(MutexGuard<'static, ()>, Containerd, Footprint)> {
    let (guard, before) = begin_test(prerequisites())?;
    let c = Containerd::start(nutshell_config).expect("private containerd starts");
    Some((guard, c, before))
}

/// Takes the test lock and checks `ready` (skipping, or failing under
/// `NUTSHELL_REQUIRE_ALL=1`); the host's nutshell footprint before the test.
pub(crate) fn begin_test(
    ready: Result<(), String>,
) -> Option<(MutexGuard<'static, ()>, Footprint)> {
    let guard = serial();
    if !require(
        ready.is_ok(),
        ready.as_ref().err().map_or("", String::as_str),
    ) {
        return None;
    }
    Some((guard, Footprint::now()))
}

impl Containerd {
    /// `ctr run -d` of `cmd` in the busybox image under the nutshell
    /// runtime, as task `id`; panics (quoting ctr and containerd) when it
    /// fails.
    pub fn run_detached(&self, id: &str, cmd: &[&str]) {
        let mut args = vec![
            "run",
            "-d",
            "--runtime",
            NUTSHELL_RUNTIME,
            BUSYBOX_IMAGE,
            id,
        ];
        args.extend_from_slice(cmd);
        let out = output_with_timeout(
            self.ctr(&args).stdin(Stdio::null()),
            Duration::from_secs(180),
        )
        .expect("ctr run -d finishes");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(60)
        );
    }

    /// Asserts that nutshell left nothing behind (no process, mount or state
    /// directory beyond `before`), giving clean-up up to `settle`.
    pub fn assert_left_nothing(&self, before: &Footprint, settle: Duration) {
        let after = Footprint::settle_to(before, settle);
        assert_eq!(
            &after,
            before,
            "nutshell left something behind; containerd log tail:\n{}",
            self.log_tail(80)
        );
    }
}

/// What nutshell leaves on the host: counted before and after a test.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Footprint {
    /// PIDs of nutshell shims, and of QEMU, virtiofsd and
    /// vhost-device-vsock serving pods under `/run/nutshell`.
    pub processes: Vec<(u32, String)>,
    /// Mount points under `/run/nutshell`.
    pub mounts: Vec<PathBuf>,
    /// Entries of `/run/nutshell` (pod state directories).
    pub state_dirs: Vec<PathBuf>,
}

impl Footprint {
    /// Reads the current footprint.
    pub fn now() -> Self {
        let mut processes = Vec::new();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                    continue;
                };
                let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
                let name = Path::new(std::str::from_utf8(argv0).unwrap_or_default())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Only nutshell's own: VM processes name the pod's state
                // directory; other tests' VMs run elsewhere.
                let text = String::from_utf8_lossy(&cmdline);
                let mine = name == "containerd-shim-nutshell-v2"
                    || ([
                        "qemu-system-x86_64",
                        "nutshell-vmm",
                        "virtiofsd",
                        "vhost-device-vsock",
                    ]
                    .contains(&name.as_str())
                        && text.contains(&format!("{NUTSHELL_RUN_DIR}/"))
                        && !is_warm(&text));
                if mine {
                    processes.push((pid, name));
                }
            }
        }
        processes.sort();
        // The pools' own directory, and what warm VMs hold in it, belong
        // to no pod.
        let pool_dir = Path::new(NUTSHELL_RUN_DIR).join("pool");
        let mut state_dirs: Vec<PathBuf> = fs::read_dir(NUTSHELL_RUN_DIR)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| *p != pool_dir)
                    .collect()
            })
            .unwrap_or_default();
        state_dirs.sort();
        Self {
            processes,
            mounts: mounts_below(Path::new(NUTSHELL_RUN_DIR))
                .into_iter()
                .filter(|m| !m.starts_with(&pool_dir))
                .collect(),
            state_dirs,
        }
    }
}

/// Whether a VM process's command line names a warm VM of a pool: one
/// whose directory is still in the pool's. A claimed VM's processes keep
/// naming the pool's directory they were started in, which has moved to
/// the pod's by then, so they count as the pod's.
fn is_warm(cmdline: &str) -> bool {
    let pool = format!("{NUTSHELL_RUN_DIR}/pool/");
    cmdline.split(&pool).skip(1).any(|rest| {
        let name: String = rest
            .chars()
            .take_while(|c| *c != '/' && *c != ',' && *c != ' ')
            .collect();
        !name.is_empty() && Path::new(&pool).join(name).is_dir()
    })
}

impl Footprint {
    /// Waits up to `timeout` for the footprint to equal `baseline`, returns
    /// the last one seen.
    pub fn settle_to(baseline: &Self, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Self::now();
            if now == *baseline || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_declares_runc_default_and_nutshell_handler() {
        let c = containerd_config(Path::new("/run/x"), Path::new("/run/x/n.toml"));
        assert!(!c.contains('@'), "a placeholder is left: {c}");
        let t: toml::Table = c.parse().expect("valid TOML");
        let cri = &t["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        let runtimes = &cri["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            runtimes["nutshell"]["runtime_type"].as_str(),
            Some(NUTSHELL_RUNTIME)
        );
        assert_eq!(
            runtimes["nutshell"]["options"]["ConfigPath"].as_str(),
            Some("/run/x/n.toml")
        );
        assert_eq!(t["root"].as_str(), Some("/run/x/root"));
        assert_eq!(
            t["grpc"]["address"].as_str(),
            Some("/run/x/containerd.sock")
        );
        assert_eq!(cri["sandbox_image"].as_str(), Some(PAUSE_IMAGE));
        assert_eq!(
            cri["cni"]["bin_dir"].as_str(),
            Some(crate::netns::CNI_BIN_DIR)
        );
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/run/x/cni"));
        assert!(runtimes.get(NUTSHELL_HANDLER).is_some());
    }

    #[test]
    fn the_scripts_name_the_same_images() {
        crate::assert_test_images_script_says(&[
            format!("NS_BUSYBOX_IMAGE={BUSYBOX_IMAGE}"),
            format!("NS_PAUSE_IMAGE={PAUSE_IMAGE}"),
        ]);
    }

    #[test]
    fn images_build_offline() {
        if !crate::require(
            which("umoci").is_some() && Path::new(BUSYBOX).is_file() && is_root(),
            "needs root, umoci and busybox-static",
        ) {
            return;
        }
        let imgs = test_images().expect("images");
        assert!(imgs.join("pause.tar").is_file(), "{}", imgs.display());
        let list = Command::new("tar")
            .arg("-tf")
            .arg(imgs.join("busybox.tar"))
            .output()
            .expect("tar");
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.contains("index.json") && list.contains("oci-layout"),
            "{list}"
        );
    }
}
