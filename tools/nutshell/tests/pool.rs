//! The warm pool (`nutshell pool`) as its users meet it: claims over its
//! socket, a claimer that walks away, a pool killed with SIGKILL, and
//! containerd's pods with and without a warm VM.
//!
//! Each test runs its own pool on its own socket, with the QEMU backend
//! (TCG here). VM tests take turns with the other VM tests of this
//! binary's crate through `serial()`.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nutshell_runtime::agent::DialOptions;
use nutshell_runtime::config::Config;
use nutshell_runtime::hypervisor::cgroups::my_cgroup_dirs;
use nutshell_runtime::hypervisor::select::select_backend;
use nutshell_runtime::mounts::{remove_tree, unmount_below};
use nutshell_runtime::pool::claim::{claim, Claimed};
use nutshell_runtime::pool::wire::{self, NetworkClaim, Reply, Request};
use nutshell_runtime::pool::{PoolError, VmShape};
use nutshell_runtime::sandbox::Sandbox;
use nutshell_runtime::shim::state::PodKey;
use nutshell_tests::containerd::{prerequisites, serial, test_config, Containerd, Footprint};
use nutshell_tests::{processes_mentioning, require};

/// The longest a TCG boot of the pool's VMs may take on a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const DIAL: Duration = Duration::from_secs(60);

/// A `nutshell pool` of this test: its config, socket and log.
struct TestPool {
    child: Option<Child>,
    /// A cgroup of its own, beside the test's, so that a claimed VM's
    /// move into its claimer's cgroups shows.
    cgroup: PathBuf,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    socket: PathBuf,
    config: Config,
}

impl TestPool {
    /// Starts a pool keeping `warm` VMs of the test size.
    fn start(warm: u32) -> Self {
        let dir = tempfile::tempdir_in("/run").unwrap();
        let socket = dir.path().join("pool.sock");
        let text = test_config(
            "",
            DIAL,
            &format!(
                "enabled = true\nsocket = \"{}\"\nwarm = {warm}\n",
                socket.display()
            ),
        );
        let config_path = dir.path().join("config.toml");
        fs::write(&config_path, &text).unwrap();
        let config = Config::from_file(&config_path).unwrap();
        let cgroup = my_cgroup_dirs()
            .first()
            .expect("the test runs in a cgroup")
            .join(format!(
                "nutshell-pool-test-{}-{}",
                std::process::id(),
                dir.path().file_name().unwrap().to_string_lossy()
            ));
        fs::create_dir(&cgroup).unwrap();
        let mut me = Self {
            child: None,
            cgroup,
            dir,
            config_path,
            socket,
            config,
        };
        me.spawn();
        me
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        // Into its cgroup before it execs, so that every VM it boots is
        // there too.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" pool --config "$3""#)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(env!("CARGO_BIN_EXE_nutshell"))
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pool.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until the log says `n` VMs became warm since the pool started.
    fn wait_warm(&self, n: usize) {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            let log = self.log();
            if log.matches("warm VM ready").count() >= n {
                return;
            }
            if let Some(c) = &self.child {
                assert!(
                    std::fs::metadata(format!("/proc/{}", c.id())).is_ok(),
                    "the pool died:\n{log}"
                );
            }
            assert!(Instant::now() < deadline, "no {n} warm VMs in time:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGTERM, then waits for the pool to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "the pool ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn shape(&self, backend: &str) -> VmShape {
        let vm = self.config.vm_config(
            "x",
            Path::new("/"),
            Path::new("/"),
            self.config.vm.vcpus,
            self.config.vm.memory_mib,
        );
        VmShape::of(&vm, backend)
    }

    /// Claims a VM of `shape` for pod `id`, its directory moved to
    /// `target`, with a network when one is given.
    async fn claim(
        &self,
        shape: &VmShape,
        id: &str,
        target: &Path,
        network: Option<NetworkClaim>,
    ) -> Result<Claimed, PoolError> {
        let request = Request {
            shape: shape.clone(),
            target: target.to_path_buf(),
            id: id.to_string(),
            network,
        };
        claim(&self.socket, request).await
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
        // Empty once the pool and its warm VMs are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The CPU time (user and system, in clock ticks) process `pid` used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime, fields 14 and 15: the 12th and 13th after the name.
    after_name
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
}

/// `/proc/<pid>/cgroup`: every hierarchy's cgroup of the process.
fn cgroups_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// A pod directory for a claim in this test, removed on drop.
struct Target(PathBuf);

impl Target {
    fn new(pod: &str) -> Self {
        let dir = PodKey::new("nutshell-pool-test", "test", pod).dir();
        assert!(
            !dir.exists(),
            "{} is left from an earlier run",
            dir.display()
        );
        Self(dir)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = unmount_below(&self.0);
        let _ = remove_tree(&self.0);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ready() -> bool {
    let r = prerequisites();
    require(r.is_ok(), r.as_ref().err().map_or("", String::as_str))
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn wait_gone(pids: &[u32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "{what}: {pids:?} still run");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_claims_get_two_vms_and_a_claimer_that_walks_away_leaks_nothing() {
    if !ready() {
        return;
    }
    let _turn = serial();
    runtime().block_on(two_claims_get_two_vms_and_a_claimer_that_walks_away_leaks_nothing_body());
}

async fn two_claims_get_two_vms_and_a_claimer_that_walks_away_leaks_nothing_body() {
    let before = Footprint::now();
    let mut pool = TestPool::start(2);
    pool.wait_warm(2);
    let backend = select_backend(pool.config.vm.backend).await.unwrap();
    let shape = pool.shape(backend.name());
    // A pod with more interfaces than warm VMs have NICs, or whose
    // namespace is gone, is refused before a VM is taken.
    let refused = Target::new("refused");
    for (netns, nics, why) in [
        ("/proc/self/ns/net", 2, "pool.nics"),
        (
            "/run/netns/nutshell-pool-test-gone",
            1,
            "nutshell-pool-test-gone",
        ),
    ] {
        let net = NetworkClaim {
            netns: netns.into(),
            nics,
        };
        match pool.claim(&shape, "refused", &refused.0, Some(net)).await {
            Err(PoolError::Empty(e)) => assert!(e.contains(why), "{e}"),
            other => panic!("a claim for {nics} NICs in {netns} got {other:?}"),
        }
        assert!(!refused.0.exists());
    }
    let (ta, tb) = (Target::new("a"), Target::new("b"));
    let (a, b) = tokio::join!(
        pool.claim(&shape, "a", &ta.0, None),
        pool.claim(&shape, "b", &tb.0, None)
    );
    let (a, b) = (a.unwrap().vm, b.unwrap().vm);
    assert_ne!(a.vmm_pid(), b.vmm_pid(), "one VM was given twice");
    // Booted in the pool's cgroup, every process of a claimed VM is in
    // the claimer's now.
    let mine = cgroups_of(std::process::id());
    for vm in [&a, &b] {
        for (role, pid) in vm.processes() {
            assert_eq!(cgroups_of(*pid), mine, "{role} {pid}");
        }
    }
    assert_ne!(
        cgroups_of(pool.pid()),
        mine,
        "the pool is in a cgroup of its own"
    );
    // Both were booted before the claims; a third finds the pool empty
    // while it boots their replacements (seconds under TCG).
    let tc = Target::new("c");
    match pool.claim(&shape, "c", &tc.0, None).await {
        Err(PoolError::Empty(why)) => assert!(why.contains("no warm VM"), "{why}"),
        other => panic!("a third claim got {other:?}"),
    }
    assert!(!tc.0.exists());
    // Claimed without a network, its NIC's tap stays in the pool's
    // namespace: the VMM idles. (A tap deleted under it leaves its fd in
    // error, and QEMU's main loop then spins a whole core.)
    let vmm = a.vmm_pid().unwrap();
    let ticks_before = cpu_ticks(vmm);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(vmm) - ticks_before;
    assert!(
        used < 100,
        "an idle claimed VMM used {used} of 200 ticks in 2 s"
    );
    // The VMs are the claimers' now: their agents answer, each takes one
    // CreateSandbox and refuses a second.
    let dial = DialOptions {
        deadline: DIAL,
        ..DialOptions::default()
    };
    for (vm, id) in [(a, "a"), (b, "b")] {
        let pids: Vec<u32> = vm.processes().iter().map(|(_, p)| *p).collect();
        let sandbox = Sandbox::attach(vm, &dial).await.unwrap();
        sandbox.set_up(id, id, false).await.unwrap();
        let again = sandbox.set_up(id, id, false).await.unwrap_err();
        assert_eq!(
            again.rpc_code().map(|c| format!("{c:?}")).as_deref(),
            Some("ALREADY_EXISTS"),
            "{again}"
        );
        let exit = sandbox.shutdown(Duration::from_secs(5)).await;
        assert!(
            exit.requested || exit.role == nutshell_runtime::hypervisor::ProcessRole::Vmm,
            "{exit}"
        );
        wait_gone(&pids, "the claimed VM after its shutdown");
    }
    // A claimer that takes the offer and goes without confirming: the
    // pool kills the VM and removes the directory it moved.
    pool.wait_warm(3);
    let walker = Target::new("walker");
    let socket = pool.socket.clone();
    let request = Request {
        shape: shape.clone(),
        target: walker.0.clone(),
        id: "walker".into(),
        network: None,
    };
    let offered = tokio::task::spawn_blocking(move || {
        let s = UnixStream::connect(&socket).unwrap();
        wire::send(&s, &request, &[]).unwrap();
        let (reply, fds) = wire::receive::<Reply>(&s).unwrap();
        drop(fds);
        drop(s);
        reply
    })
    .await
    .unwrap();
    let Reply::Offer(offer) = offered else {
        panic!("no offer: {offered:?}");
    };
    let pids: Vec<u32> = offer.vm.processes.iter().map(|p| p.pid).collect();
    wait_gone(&pids, "the VM of a claimer that walked away");
    let deadline = Instant::now() + Duration::from_secs(10);
    while walker.0.exists() {
        assert!(Instant::now() < deadline, "{} is left", walker.0.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        pool.log().contains("the claimer did not take its VM"),
        "{}",
        pool.log()
    );
    let mine = format!("/run/nutshell/pool/{}.", pool.pid());
    pool.stop();
    assert_eq!(
        processes_mentioning(&mine),
        Vec::new(),
        "warm VMs outlived their pool"
    );
    drop((ta, tb, tc, walker, refused));
    let after = Footprint::settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the pool left something behind");
}

#[test]
fn a_pool_killed_with_sigkill_leaves_claimed_vms_to_their_owners() {
    if !ready() {
        return;
    }
    let _turn = serial();
    runtime().block_on(a_pool_killed_with_sigkill_leaves_claimed_vms_to_their_owners_body());
}

async fn a_pool_killed_with_sigkill_leaves_claimed_vms_to_their_owners_body() {
    let before = Footprint::now();
    let mut pool = TestPool::start(1);
    pool.wait_warm(1);
    let backend = select_backend(pool.config.vm.backend).await.unwrap();
    let shape = pool.shape(backend.name());
    let t = Target::new("survivor");
    let vm = pool.claim(&shape, "survivor", &t.0, None).await.unwrap().vm;
    let dead_pool = pool.pid();
    kill(Pid::from_raw(dead_pool as i32), Signal::SIGKILL).unwrap();
    if let Some(mut c) = pool.child.take() {
        c.wait().unwrap();
    }
    // The pool is gone, and so is its refill boot's parent: the claimed VM
    // runs on, and its owner still drives and ends it.
    let pids: Vec<u32> = vm.processes().iter().map(|(_, p)| *p).collect();
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the claimed VM died with its pool"
    );
    let dial = DialOptions {
        deadline: DIAL,
        ..DialOptions::default()
    };
    let sandbox = Sandbox::attach(vm, &dial).await.unwrap();
    sandbox.set_up("survivor", "survivor", false).await.unwrap();
    sandbox.shutdown(Duration::from_secs(5)).await;
    wait_gone(&pids, "the claimed VM after its shutdown");
    drop(t);
    // What the dead pool had booted for itself is found by the next pool.
    let leftovers = format!("/run/nutshell/pool/{dead_pool}.");
    pool.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_mentioning(&leftovers).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a dead pool's VMs survive the next pool: {:?}\n{}",
            processes_mentioning(&leftovers),
            pool.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pool.stop();
    let after = Footprint::settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "something is left behind");
}

#[test]
fn ctr_run_claims_a_warm_vm_and_boots_cold_without_one() {
    if !ready() {
        return;
    }
    let _turn = serial();
    let before = Footprint::now();
    let mut pool = TestPool::start(1);
    let config = fs::read_to_string(&pool.config_path).unwrap();
    let c = Containerd::start(&config).expect("private containerd starts");
    pool.wait_warm(1);
    let out = c
        .run_nutshell("warm", &[], &["echo", "from a warm VM"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(60)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from a warm VM"
    );
    let log = c.log_tail(400);
    assert!(log.contains("claimed a warm VM from the pool"), "{log}");
    // Without a pool, the same pod boots cold and says why at debug level.
    pool.stop();
    let out = c
        .run_nutshell("cold", &[], &["echo", "from a cold VM"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(60)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from a cold VM"
    );
    let log = c.log_tail(400);
    assert!(
        log.contains("booting cold") && log.contains("no pool listens"),
        "{log}"
    );
    c.assert_left_nothing(&before, Duration::from_secs(10));
}
