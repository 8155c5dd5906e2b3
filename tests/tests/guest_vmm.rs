//! The real guest image on the nutshell-vmm backend, driven through
//! `nutshell-runtime` exactly as the shim drives it: virtiofsd for the
//! shared directory, the VMM with its hybrid vsock, supervision, the agent
//! client.
//!
//! Which half runs depends on the host, and each half asserts:
//! - where KVM can run Linux, the guest boots, the agent answers, mounts
//!   the shared directory over virtio-fs and powers the VM off;
//!   a guest that misbehaves (its kernel panics, its agent never answers,
//!   it floods the serial console) ends with our clear error, quoting the
//!   console, and leaves nothing behind;
//! - where it cannot (the project's nested `kvm_pvm`), every launch, the
//!   misbehaving ones too, fails with the VMM's own reason (the emulation
//!   failure) and the guest's console, within seconds of the VMM's exit,
//!   and nothing is left behind. (`tools/nested-kvm.sh` runs this file on a
//!   KVM that can: `tools/nested-suite.sh`.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_runtime::agent::DialOptions;
use nutshell_runtime::hypervisor::nutshell_vmm::{VmmBinaries, VmmHypervisor};
use nutshell_runtime::hypervisor::select::{kvm_verdict, KvmVerdict};
use nutshell_runtime::hypervisor::{ProcessRole, VmConfig};
use nutshell_runtime::sandbox::Sandbox;
use nutshell_tests::{
    assert_no_vm_left, busybox_rootfs, guest_dir, is_root, require, run_ok, vmm_binary, which,
};

fn prerequisites() -> Option<VmmHypervisor> {
    if !require(is_root(), "needs root (virtiofsd, /dev/kvm)") {
        return None;
    }
    if !require(Path::new("/dev/kvm").exists(), "needs /dev/kvm") {
        return None;
    }
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        let p = guest_dir().join(f);
        if !require(
            p.is_file(),
            &format!("needs {} (guest-image/build.sh --install)", p.display()),
        ) {
            return None;
        }
    }
    let vmm = vmm_binary();
    if !require(
        vmm.is_some(),
        "needs nutshell-vmm (cargo build -p nutshell-vmm)",
    ) {
        return None;
    }
    let virtiofsd = which("virtiofsd").or_else(|| {
        let p = PathBuf::from("/usr/local/bin/virtiofsd");
        p.is_file().then_some(p)
    });
    if !require(
        virtiofsd.is_some(),
        "needs virtiofsd (tools/setup.sh --deps)",
    ) {
        return None;
    }
    Some(VmmHypervisor::new(VmmBinaries {
        vmm: vmm?,
        virtiofsd: virtiofsd?,
    }))
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The installed guest, with the early console at full verbosity: on a KVM
/// that cannot run Linux the guest dies before the serial driver
/// registers. (Not `debug_console`, which keeps the console log after the
/// VM.) `extra` kernel parameters follow.
fn vm_config(name: &str, dir: &Path, extra: &[&str]) -> VmConfig {
    let mut config = VmConfig::new(name, dir.join("state"));
    config.kernel = guest_dir().join("vmlinux");
    config.initrd = guest_dir().join("initramfs.cpio.gz");
    config.kernel_params = ["earlyprintk=serial,ttyS0,115200", "loglevel=7"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    config
}

/// An error with its sources, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = format!("{e:#}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Where KVM cannot run Linux (the probe said why in `detail`), a launch
/// fails with the VMM's own words (exit status 4, the emulation failure)
/// and the guest's console, well before the agent's deadline.
fn assert_cannot_run_linux(detail: &str, chain: &str, took: Duration, deadline: Duration) {
    assert!(detail.contains("emulation failure"), "probe said: {detail}");
    assert!(chain.contains("nutshell-vmm"), "{chain}");
    assert!(chain.contains("exited with status 4"), "{chain}");
    assert!(chain.contains("emulation failure"), "{chain}");
    assert!(
        chain.contains("last console lines:\n  | ["),
        "the guest's console is not quoted: {chain}"
    );
    assert!(took < deadline, "waited for the dial deadline");
}

/// How long a guest may take to fail where KVM cannot run Linux: it boots
/// slowly there (kernel mode emulated), more so with tests side by side.
const CANNOT_DEADLINE: Duration = Duration::from_secs(120);

/// Starts a guest that must not come up, dialing its agent for `deadline`.
/// On a KVM that runs Linux, returns the error (with its sources) and how
/// long the start took; where KVM cannot, asserts that half
/// ([`assert_cannot_run_linux`], against [`CANNOT_DEADLINE`]) and returns
/// None.
async fn start_must_fail(
    hv: &VmmHypervisor,
    config: &VmConfig,
    deadline: Duration,
) -> Option<(String, Duration)> {
    let verdict = kvm_verdict().await;
    let deadline = match verdict {
        KvmVerdict::CanRunLinux => deadline,
        KvmVerdict::Cannot(_) => CANNOT_DEADLINE,
    };
    let dial = DialOptions {
        deadline,
        ..DialOptions::default()
    };
    let t = Instant::now();
    let started = Sandbox::start(hv, config, &dial).await;
    let took = t.elapsed();
    let e = match started {
        Ok(sandbox) => {
            sandbox.shutdown(Duration::from_secs(5)).await;
            panic!("the guest came up ({verdict:?})");
        }
        Err(e) => chain(&e),
    };
    eprintln!("KVM verdict {verdict:?}; failed after {took:?}: {e}");
    match verdict {
        KvmVerdict::CanRunLinux => Some((e, took)),
        KvmVerdict::Cannot(detail) => {
            assert_cannot_run_linux(&detail, &e, took, deadline);
            None
        }
    }
}

#[test]
fn the_vmm_backend_boots_the_guest_or_says_why_not() {
    let Some(hv) = prerequisites() else { return };
    tokio_runtime().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello"), b"from the host").unwrap();
        let mut config = vm_config("vmm-boot", tmp.path(), &[]);
        config.shared_dir = Some(shared.clone());
        let state = config.state_dir.clone();
        let dial = DialOptions {
            deadline: Duration::from_secs(120),
            ..DialOptions::default()
        };
        let verdict = kvm_verdict().await;
        let t = Instant::now();
        let started = Sandbox::start(&hv, &config, &dial).await;
        eprintln!(
            "KVM verdict {verdict:?}; Sandbox::start returned after {:?}",
            t.elapsed()
        );
        match verdict {
            KvmVerdict::CanRunLinux => {
                let sandbox = started.unwrap_or_else(|e| panic!("{e:#?}"));
                let roles: Vec<ProcessRole> =
                    sandbox.vm().processes().iter().map(|(r, _)| *r).collect();
                assert_eq!(roles, [ProcessRole::FsBackend, ProcessRole::Vmm]);
                let health = sandbox.agent().health().await.unwrap();
                assert_eq!(health.status, "SERVING");
                sandbox
                    .set_up("vmm-boot", "vmm-boot", false)
                    .await
                    .expect("the agent mounts the shared directory over virtio-fs");
                let exit = sandbox.shutdown(Duration::from_secs(5)).await;
                assert!(exit.is_clean_poweroff(), "{exit}");
            }
            KvmVerdict::Cannot(detail) => {
                let e = started.expect_err("a KVM that cannot run Linux booted it");
                let e = chain(&e);
                eprintln!("{e}");
                assert_cannot_run_linux(&detail, &e, t.elapsed(), dial.deadline);
            }
        }
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// A kernel that panics (no init to run) reboots at once (`panic=-1`), the
/// VMM ends on the reset, and the dial fails then, not at its deadline,
/// naming the ending and quoting the panic.
#[test]
fn a_kernel_that_panics_ends_the_start_with_its_console() {
    let Some(hv) = prerequisites() else { return };
    tokio_runtime().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let params = ["rdinit=/no-such-init", "init=/no-such-init"];
        let config = vm_config("vmm-panic", tmp.path(), &params);
        let state = config.state_dir.clone();
        let deadline = Duration::from_secs(120);
        if let Some((e, took)) = start_must_fail(&hv, &config, deadline).await {
            assert!(took < deadline, "waited for the dial deadline");
            assert!(
                e.contains("the VM ended while waiting for the agent to answer"),
                "{e}"
            );
            assert!(e.contains("nutshell-vmm"), "{e}");
            assert!(
                e.contains("the guest reset"),
                "the ending is not named: {e}"
            );
            assert!(e.contains("Kernel panic"), "the panic is not quoted: {e}");
        }
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// The dial gave up at its deadline (not long after: the VM is stopped
/// promptly whatever the guest does), killed the VM and quoted its console.
fn assert_killed_at_deadline(e: &str, took: Duration, deadline: Duration) {
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(10),
        "the stop took too long: {took:?}"
    );
    assert!(
        e.contains(&format!("did not answer within {deadline:?}")),
        "{e}"
    );
    assert!(
        e.contains("the VM was killed") && e.contains("last console lines"),
        "{e}"
    );
}

/// An agent that never answers (it listens on another port) fails the dial
/// at its deadline; the VM is killed and the error quotes the console.
#[test]
fn an_agent_that_never_answers_fails_at_the_deadline() {
    let Some(hv) = prerequisites() else { return };
    tokio_runtime().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let config = vm_config("vmm-silent", tmp.path(), &["nutshell.agent_port=2000"]);
        let state = config.state_dir.clone();
        // Long enough for the guest to print under emulation (L1).
        let deadline = Duration::from_secs(20);
        if let Some((e, took)) = start_must_fail(&hv, &config, deadline).await {
            assert_killed_at_deadline(&e, took, deadline);
        }
        assert_no_vm_left(tmp.path(), &state);
    });
}

/// What the flooding guest prints, line after line, forever.
const FLOOD_LINE: &str = "flood: this guest writes to its console without end";

/// An initramfs whose `/init` is a busybox shell that writes to the
/// console forever and never starts an agent.
fn flooding_initramfs(dir: &Path) -> std::io::Result<PathBuf> {
    let root = dir.join("flood-root");
    busybox_rootfs(&root)?;
    let script = format!("#!/bin/sh\nwhile :; do echo \"$((i=i+1)) {FLOOD_LINE}\"; done\n");
    std::fs::write(root.join("init"), script)?;
    let cpio = dir.join("flood.cpio");
    // /dev/console is the init's stdout; the kernel opens it from the archive.
    run_ok(Command::new("sh").arg("-ec").arg(format!(
        "cd {root} && chmod 755 init && mkdir -p dev && mknod -m 600 dev/console c 5 1 \
         && find . | cpio -o -H newc -R 0:0 --quiet > {cpio}",
        root = root.display(),
        cpio = cpio.display()
    )))?;
    Ok(cpio)
}

/// A guest that floods its serial console never stops the host: the dial
/// still fails at its deadline, the VM is killed, the error quotes a
/// bounded tail of the flood, and nothing is left behind. (The console
/// file's own cap is the VMM's `serial::Capped`, unit-tested there.)
#[test]
fn a_guest_that_floods_its_console_is_stopped_at_the_deadline() {
    let Some(hv) = prerequisites() else { return };
    if !require(which("cpio").is_some(), "needs cpio") {
        return;
    }
    tokio_runtime().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = vm_config("vmm-flood", tmp.path(), &[]);
        config.initrd = flooding_initramfs(tmp.path()).expect("the flooding initramfs");
        let state = config.state_dir.clone();
        let deadline = Duration::from_secs(20);
        if let Some((e, took)) = start_must_fail(&hv, &config, deadline).await {
            assert_killed_at_deadline(&e, took, deadline);
            assert!(e.contains(FLOOD_LINE), "the flood is not quoted: {e}");
            assert!(
                e.len() < 16 * 1024,
                "the error grew with the flood: {} bytes",
                e.len()
            );
        }
        assert_no_vm_left(tmp.path(), &state);
    });
}
