//! Docker 20.10 and Podman 4.3 running containers through an OCI runtime
//! CLI, the runc command line: Debian's `runc` is the control, and
//! `nutshell-runc` runs each container in a microVM.
//!
//! Every [`Engine`] is private and runs in a network namespace of the
//! test's own ([`TestNetns`]), so its bridge, addresses and iptables rules
//! never reach the machine's network:
//! - Podman: rootful, with its own storage root, run root, tmp dir, CNI
//!   config and IPAM directories, a `containers.conf` of its own
//!   (`CONTAINERS_CONF`), events in a file, cgroupfs, and `--runtime PATH`.
//!   Every `podman` command runs under `nsenter --net=`.
//! - Docker: a `dockerd` of its own (data root, exec root, socket, pid
//!   file, `--config-file` naming the runtime), started whole inside the
//!   namespace; it starts its own containerd in its exec root. The `docker`
//!   CLI talks to its socket, with a private `DOCKER_CONFIG`.
//!
//! [`Engine::finish`] removes the test's containers, stops the engine and
//! asserts that nothing is left: no process naming the private directory,
//! no container process in the engine's cgroup parent, no mount below the
//! private directory, no container in the runtime's state. Dropping an
//! [`Engine`] tears down whatever is left, on panic too.
//!
//! The tests themselves ([`checks`]) are written once, run by both engines
//! ([`engine_tests!`](crate::engine_tests)) under both runtimes.

mod cgroups;
pub mod checks;
mod docker;
mod podman;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use nutshell_runtime::mounts::mounts_below;

use self::cgroups::{cgroup_processes, remove_cgroup};
use crate::containerd::{
    claims_logged, output_with_timeout, runc_cli_binary, serial, start_test_pool, test_images,
    test_nutshell_config, with_test_pool,
};
use crate::netns::TestNetns;
use crate::{guest_dir, is_root, processes_mentioning, require, terminate, which, BUSYBOX};

/// The test image (`NS_ENGINE_IMAGE` of `tools/lib/test-images.sh`),
/// loaded from its docker-archive into every engine.
pub const IMAGE: &str = "localhost/nutshell-test/busybox:latest";
/// What `httpd -f -p 80 -h /www` serves in the test image (`NS_WWW_PAGE`).
pub const WWW_PAGE: &str = "served-by-the-nutshell-test-image";
/// Debian's runc, the control runtime.
pub const RUNC: &str = "/usr/sbin/runc";
/// The longest an engine command may take (a microVM boots under TCG here).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// How long clean-up may take after the engine stopped.
const SETTLE: Duration = Duration::from_secs(15);

/// The OCI runtime an engine runs containers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Debian's runc: containers share the host kernel.
    Runc,
    /// nutshell-runc: each container in a microVM.
    Nutshell,
}

impl Runtime {
    /// Whether containers get a kernel of their own.
    pub fn runs_vms(self) -> bool {
        self == Runtime::Nutshell
    }

    /// The runtime's binary, or what is missing.
    fn binary(self) -> Result<PathBuf, String> {
        match self {
            Runtime::Runc => Path::new(RUNC)
                .is_file()
                .then(|| PathBuf::from(RUNC))
                .ok_or_else(|| format!("needs {RUNC} (runc)")),
            Runtime::Nutshell => {
                for asset in ["vmlinux", "initramfs.cpio.gz"] {
                    let p = guest_dir().join(asset);
                    if !p.is_file() {
                        return Err(format!("needs the guest image: {} is missing", p.display()));
                    }
                }
                runc_cli_binary().ok_or_else(|| {
                    "needs the built nutshell-runc (cargo build -p nutshell-runc)".into()
                })
            }
        }
    }

    /// The name Docker knows the runtime by: its built-in `runc`, or the
    /// entry the harness adds to `runtimes`.
    fn docker_name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Nutshell => "nutshell",
        }
    }
}

/// A container engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Podman 4.3, daemonless: conmon supervises each container.
    Podman,
    /// Docker 20.10: dockerd, its containerd, and containerd's runc shim.
    Docker,
}

impl Kind {
    /// The programs the engine needs beyond those every engine test needs.
    fn programs(self) -> &'static [&'static str] {
        match self {
            Kind::Podman => &["podman", "conmon"],
            Kind::Docker => &["dockerd", "docker", "containerd", "containerd-shim-runc-v2"],
        }
    }

    /// Paths outside its private directories that the engine makes on first
    /// use, deepest first: those a test made go again (files, and
    /// directories once empty).
    fn machine_paths(self) -> &'static [&'static str] {
        match self {
            Kind::Podman => &[
                // Podman's lock table in shared memory: every rootful podman
                // on the machine uses the same one.
                "/dev/shm/libpod_lock",
                // containers/image's cache of blob facts, a fixed path for
                // root (skopeo, which builds the test image, uses it too).
                "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
                "/var/lib/containers/cache",
                "/var/lib/containers",
                // runc's default state root, which Podman 4.3 leaves it
                // (its clean-up drops `--runtime-flag`, so a private root
                // would strand containers there).
                "/run/runc",
            ],
            // dockerd's plugin socket directory, a fixed path.
            Kind::Docker => &["/run/docker/plugins", "/run/docker"],
        }
    }
}

/// What every engine test needs, or the first thing missing.
fn prerequisites(kind: Kind, runtime: Runtime) -> Result<PathBuf, String> {
    if !is_root() {
        return Err("needs root".into());
    }
    let common = ["ip", "nsenter", "script", "umoci", "skopeo"];
    for prog in common.iter().chain(kind.programs()) {
        if which(prog).is_none() {
            return Err(format!("needs {prog} on PATH (tools/setup.sh --deps)"));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        return Err("needs /bin/busybox (busybox-static)".into());
    }
    runtime.binary()
}

/// A private Podman or Docker, running containers with one [`Runtime`].
/// Fields drop in order: the namespace after the engine stopped, then the
/// test lock.
pub struct Engine {
    /// Which engine.
    pub kind: Kind,
    /// Which OCI runtime it runs containers with.
    pub runtime: Runtime,
    runtime_bin: PathBuf,
    dir: PathBuf,
    /// The cgroup (relative to each hierarchy's root) that holds every
    /// container of this engine.
    cgroup_parent: String,
    dockerd: Option<Child>,
    /// The warm pool its containers claim from, under
    /// [`crate::containerd::TEST_POOL_ENV`].
    pool: Option<Child>,
    /// Podman runs the runtime with its default state root: the containers
    /// it listed before the test.
    runtime_state_before: Vec<String>,
    /// Of [`Kind::machine_paths`], those absent before the test.
    absent_machine_paths: Vec<PathBuf>,
    /// Set by [`Self::finish`]: nothing is left to tear down but files.
    finished: bool,
    /// The namespace the engine and its containers' network live in.
    pub netns: TestNetns,
    _guard: MutexGuard<'static, ()>,
}

impl Engine {
    /// Takes the test lock, checks the prerequisites (skipping, or failing
    /// under `NUTSHELL_REQUIRE_ALL=1`), starts the engine and loads
    /// [`IMAGE`].
    pub fn start(kind: Kind, runtime: Runtime) -> Option<Self> {
        let guard = serial();
        let ready = prerequisites(kind, runtime);
        let runtime_bin = match ready {
            Ok(bin) => bin,
            Err(reason) => {
                require(false, &reason);
                return None;
            }
        };
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nutshell-engine-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Short: dockerd's socket path must fit in sun_path.
        let dir = Path::new("/run").join(&name);
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("a stale engine directory can be removed");
        }
        fs::create_dir_all(&dir).expect("the engine directory can be made");
        let absent_machine_paths = kind
            .machine_paths()
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        let mut e = Engine {
            kind,
            runtime,
            runtime_bin,
            dir,
            cgroup_parent: name,
            dockerd: None,
            pool: None,
            runtime_state_before: Vec::new(),
            absent_machine_paths,
            finished: false,
            netns: TestNetns::create().expect("ip netns add"),
            _guard: guard,
        };
        if runtime.runs_vms() {
            let socket = e.dir.join("pool.sock");
            let config = with_test_pool(&test_nutshell_config(""), &socket)
                .expect("the nutshell config can be made");
            fs::write(e.nutshell_config(), config).expect("the nutshell config can be written");
            e.pool = start_test_pool(&e.nutshell_config(), &socket, &e.dir.join("pool.log"))
                .expect("the test's pool starts");
        }
        match kind {
            Kind::Podman => {
                e.write_podman_config()
                    .expect("podman's config can be written");
                e.runtime_state_before = e.runtime_state(None);
            }
            Kind::Docker => e.start_dockerd().expect("the private dockerd starts"),
        }
        let images = test_images().expect("the test images build");
        let archive = images.join("engine.tar");
        e.ok(&["load", "-i", &archive.display().to_string()]);
        Some(e)
    }

    /// The private directory (configs, roots, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The nutshell config nutshell-runc reads (`NUTSHELL_CONFIG`).
    fn nutshell_config(&self) -> PathBuf {
        self.dir.join("nutshell.toml")
    }

    /// The environment the runtime gets: the test's nutshell config.
    fn runtime_env(&self) -> Vec<(String, String)> {
        if self.runtime.runs_vms() {
            vec![(
                "NUTSHELL_CONFIG".into(),
                self.nutshell_config().display().to_string(),
            )]
        } else {
            Vec::new()
        }
    }

    /// The command line of `engine args…` (podman inside the namespace,
    /// docker on the private socket).
    pub fn argv<S: AsRef<OsStr>>(&self, args: &[S]) -> Vec<OsString> {
        let mut v = match self.kind {
            Kind::Podman => self.podman_argv(),
            Kind::Docker => self.docker_argv(),
        };
        v.extend(args.iter().map(|a| a.as_ref().to_os_string()));
        v
    }

    /// The environment every engine command gets.
    fn cmd_env(&self) -> Vec<(&'static str, PathBuf)> {
        match self.kind {
            Kind::Podman => vec![("CONTAINERS_CONF", self.dir.join("containers.conf"))],
            Kind::Docker => vec![("DOCKER_CONFIG", self.dir.join("cli"))],
        }
    }

    /// `engine args…`, stdin from /dev/null unless the caller sets it.
    pub fn cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let argv = self.argv(args);
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).envs(self.cmd_env()).stdin(Stdio::null());
        c
    }

    /// `engine args…` under `script`, so that the engine's stdin and stdout
    /// are a terminal (`-t`); `script -e` exits with the engine's status.
    pub fn cmd_in_pty<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let line = self
            .argv(args)
            .iter()
            .map(|a| shell_quote(a.as_bytes()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"])
            .envs(self.cmd_env())
            .stdin(Stdio::null());
        c
    }

    /// Runs `cmd` to its end within [`CMD_TIMEOUT`].
    pub fn output_of(&self, cmd: &mut Command) -> Output {
        output_with_timeout(cmd, CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail(60)))
    }

    /// Runs `engine args…` to its end.
    pub fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.output_of(&mut self.cmd(args))
    }

    /// Runs `engine args…`, returns its stdout; panics quoting its stderr
    /// and the engine's log when it fails.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{:?} failed ({}): {}{}\n{}",
            self.argv(args),
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.log_tail(60)
        );
        text(&out.stdout)
    }

    /// The arguments of `run`: `opts`, what the harness needs ([`IMAGE`]
    /// never pulled; Podman's containers in the engine's cgroup parent, as
    /// Docker's are by its config), the image, then `cmd`.
    pub fn run_args(&self, opts: &[&str], cmd: &[&str]) -> Vec<String> {
        let mut v = vec!["run".to_string(), "--pull".into(), "never".into()];
        if self.kind == Kind::Podman {
            v.push("--cgroup-parent".into());
            v.push(format!("/{}", self.cgroup_parent));
        }
        v.extend(
            opts.iter()
                .chain(&[IMAGE])
                .chain(cmd)
                .map(|s| s.to_string()),
        );
        v
    }

    /// Runs `engine run opts… IMAGE cmd…` ([`Self::run_args`]) to its end.
    pub fn run(&self, opts: &[&str], cmd: &[&str]) -> Output {
        self.output(&self.run_args(opts, cmd))
    }

    /// The engine's name, for messages.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Podman => "podman",
            Kind::Docker => "docker",
        }
    }

    /// The last `n` lines of dockerd's log (Podman has no daemon: empty).
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The containers the runtime lists (`RUNTIME [--root ROOT] list -q`);
    /// panics when it cannot list them.
    fn runtime_state(&self, root: Option<&Path>) -> Vec<String> {
        let mut cmd = Command::new(&self.runtime_bin);
        if let Some(root) = root {
            cmd.arg("--root").arg(root);
        }
        let out = self.output_of(cmd.args(["list", "-q"]).stdin(Stdio::null()));
        assert!(
            out.status.success(),
            "{} list -q failed: {}",
            self.runtime_bin.display(),
            text(&out.stderr)
        );
        let mut ids: Vec<String> = text(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        ids.sort();
        ids
    }
}

impl Engine {
    /// Removes every container of the engine (`rm -f`, so running ones are
    /// killed); what failed, if anything.
    fn remove_containers(&self) -> Result<(), String> {
        let out = match self.kind {
            Kind::Podman => {
                output_with_timeout(&mut self.cmd(&["rm", "-a", "-f", "-t", "0"]), CMD_TIMEOUT)
            }
            Kind::Docker => {
                let ids = output_with_timeout(&mut self.cmd(&["ps", "-a", "-q"]), CMD_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                let ids = text(&ids.stdout);
                if ids.trim().is_empty() {
                    return Ok(());
                }
                let mut args = vec!["rm", "-f"];
                args.extend(ids.split_whitespace());
                output_with_timeout(&mut self.cmd(&args), CMD_TIMEOUT)
            }
        }
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {}", out.status, text(&out.stderr)))
        }
    }

    /// What of the test is still on the host: processes naming the private
    /// directory (conmon, dockerd's containerd and shims, a VM), processes
    /// in the engine's cgroup parent (the containers'), and mounts below
    /// the private directory but the store's own.
    fn leftovers(&self) -> Vec<String> {
        let needle = format!("{}/", self.dir.display());
        let mut left: Vec<String> = processes_mentioning(&needle)
            .into_iter()
            .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
            .collect();
        left.extend(
            cgroup_processes(&self.cgroup_parent)
                .into_iter()
                .map(|(pid, cmd)| format!("container process {pid}: {cmd}")),
        );
        // Podman's overlay storage may bind-mount its home onto itself
        // (to make it private) and keep that for the store's lifetime: the
        // store's, not a container's.
        let store = self.dir.join("root/overlay");
        left.extend(
            mounts_below(&self.dir)
                .into_iter()
                .filter(|m| self.kind != Kind::Podman || *m != store)
                .map(|m| format!("mount {}", m.display())),
        );
        left
    }

    /// Stops the test's pool, if it runs one: its warm VMs go with it.
    fn stop_pool(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = terminate(pool, Duration::from_secs(30));
        }
    }

    /// Waits until its pool, when it runs one, has a VM warm that no
    /// container claimed yet: a benchmark's next run then claims rather
    /// than boots cold.
    pub fn wait_pool_warm(&self) -> Result<(), String> {
        match self.pool_claims() {
            Some(claims) => crate::containerd::wait_warm(&self.dir.join("pool.log"), claims),
            None => Ok(()),
        }
    }

    /// How many VMs its containers claimed from its pool so far, when it
    /// runs one; the pool logs each claim.
    pub fn pool_claims(&self) -> Option<usize> {
        self.pool.as_ref()?;
        Some(claims_logged(&self.dir.join("pool.log")))
    }

    /// Removes every container, stops the engine, and asserts that nothing
    /// of the test is left: no container in the engine or in the runtime's
    /// state, no process, container process or mount (waiting up to
    /// [`SETTLE`] for them to go), and no cgroup. Dropping the engine then
    /// removes its files and namespace.
    pub fn finish(mut self) {
        if let Err(e) = self.remove_containers() {
            panic!("{} rm failed: {e}\n{}", self.name(), self.log_tail(60));
        }
        assert_eq!(self.ok(&["ps", "-a", "-q"]).trim(), "", "containers left");
        if self.kind == Kind::Docker {
            let status = self.stop_dockerd();
            assert!(
                status.is_some_and(|s| s.success()),
                "dockerd did not stop cleanly on SIGTERM ({status:?}); log:\n{}",
                self.log_tail(40)
            );
        }
        self.stop_pool();
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: {left:#?}\n{}",
                self.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        match self.kind {
            Kind::Podman => {
                let after = self.runtime_state(None);
                let new: Vec<&String> = after
                    .iter()
                    .filter(|id| !self.runtime_state_before.contains(id))
                    .collect();
                assert!(new.is_empty(), "the runtime still lists {new:?}");
            }
            Kind::Docker => {
                for root in self.docker_runtime_roots() {
                    assert_eq!(
                        self.runtime_state(Some(&root)),
                        Vec::<String>::new(),
                        "the runtime still lists containers in {}",
                        root.display()
                    );
                }
            }
        }
        let cgroups = remove_cgroup(&self.cgroup_parent);
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        self.finished = true;
    }
}

impl Drop for Engine {
    /// Tears down what a failed test left: containers, dockerd, the
    /// processes that name the private directory or sit in the cgroup
    /// parent, its mounts, the cgroup parent, the directory (kept with `NUTSHELL_KEEP_ENGINE=1`), and the
    /// machine paths the engine made.
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.remove_containers();
            let _ = self.stop_dockerd();
            self.stop_pool();
            let needle = format!("{}/", self.dir.display());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut left = processes_mentioning(&needle);
                left.extend(cgroup_processes(&self.cgroup_parent));
                if left.is_empty() || Instant::now() > deadline {
                    break;
                }
                for (pid, _) in left {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut mounts = mounts_below(&self.dir);
        mounts.reverse();
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        remove_cgroup(&self.cgroup_parent);
        if std::env::var_os("NUTSHELL_KEEP_ENGINE").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        for p in &self.absent_machine_paths {
            let _ = if p.is_dir() {
                fs::remove_dir(p)
            } else {
                fs::remove_file(p)
            };
        }
    }
}

/// Runs `check` on a fresh engine, then [`Engine::finish`]; skips (or
/// fails) as [`Engine::start`] does.
pub fn run_check(kind: Kind, runtime: Runtime, check: fn(&Engine)) {
    if let Some(e) = Engine::start(kind, runtime) {
        check(&e);
        e.finish();
    }
}

/// For each named check of [`checks`], a module of two tests running it on
/// a fresh engine `Kind::$kind`: `runc` (the control) and `nutshell`.
/// Without names, the checks every engine runs.
///
/// ```ignore
/// nutshell_tests::engine_tests!(Docker);
/// nutshell_tests::engine_tests!(Docker => stats);
/// // cargo test --test engine_docker -- tty::runc
/// ```
#[macro_export]
macro_rules! engine_tests {
    ($kind:ident) => {
        $crate::engine_tests!($kind =>
            run_rm_exit_code,
            stdin_piped,
            tty,
            exec,
            stop_kills_after_the_timeout,
            volume_read_write,
            read_only_root,
            kernel_and_runtime,
            bridge_network,
            killed_container_leaves_nothing,
        );
    };
    ($kind:ident => $($check:ident),+ $(,)?) => {$(
        mod $check {
            use $crate::engines::{checks, run_check, Kind, Runtime};

            #[test]
            fn runc() {
                run_check(Kind::$kind, Runtime::Runc, checks::$check);
            }

            #[test]
            fn nutshell() {
                run_check(Kind::$kind, Runtime::Nutshell, checks::$check);
            }
        }
    )+};
}

/// `arg` quoted for `sh`.
fn shell_quote(arg: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(arg).replace('\'', r"'\''"))
}

/// Lossy UTF-8 of a command's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_name_the_same_image_and_page() {
        crate::assert_test_images_script_says(&[
            format!("NS_ENGINE_IMAGE={IMAGE}"),
            format!("NS_WWW_PAGE={WWW_PAGE}"),
        ]);
    }

    #[test]
    fn the_engine_archive_is_a_docker_archive_of_the_image() {
        if !require(
            is_root()
                && which("umoci").is_some()
                && which("skopeo").is_some()
                && Path::new(BUSYBOX).is_file(),
            "needs root, umoci, skopeo and busybox-static",
        ) {
            return;
        }
        let archive = test_images().expect("images").join("engine.tar");
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg("manifest.json")
            .output()
            .expect("tar");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let manifest: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("manifest.json is JSON");
        assert_eq!(manifest[0]["RepoTags"], serde_json::json!([IMAGE]));
    }

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        let line = [b"sh".as_slice(), b"-c", b"trap '' TERM; echo a b"]
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("sh")
            .args(["-c", &format!("printf '%s|' {line}")])
            .output()
            .expect("sh");
        assert_eq!(text(&out.stdout), "sh|-c|trap '' TERM; echo a b|");
    }
}
