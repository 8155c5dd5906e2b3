//! The real guest image on the nutshell-vmm backend, driven through
//! `nutshell-runtime` exactly as the shim drives it: virtiofsd for the
//! shared directory, the VMM with its hybrid vsock, supervision, the agent
//! client.
//!
//! Which half runs depends on the host, and each half asserts:
//! - where KVM can run Linux, the guest boots, the agent answers, mounts
//!   the shared directory over virtio-fs and powers the VM off;
//! - where it cannot (the project's nested `kvm_pvm`), the launch fails
//!   with the VMM's own reason (the emulation failure) and the guest's
//!   console, within seconds of the VMM's exit, and nothing is left behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nutshell_runtime::agent::DialOptions;
use nutshell_runtime::hypervisor::nutshell_vmm::{VmmBinaries, VmmHypervisor};
use nutshell_runtime::hypervisor::select::{kvm_verdict, KvmVerdict};
use nutshell_runtime::hypervisor::{ProcessRole, VmConfig};
use nutshell_runtime::sandbox::Sandbox;
use nutshell_tests::{assert_no_vm_left, guest_dir, is_root, require, vmm_binary, which};

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

#[test]
fn the_vmm_backend_boots_the_guest_or_says_why_not() {
    let Some(hv) = prerequisites() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello"), b"from the host").unwrap();
        let mut config = VmConfig::new("vmm-boot", tmp.path().join("state"));
        config.kernel = guest_dir().join("vmlinux");
        config.initrd = guest_dir().join("initramfs.cpio.gz");
        config.shared_dir = Some(shared.clone());
        // Early console at full verbosity: on a KVM that cannot run Linux
        // the guest dies before the serial driver registers. (Not
        // `debug_console`, which keeps the console log after the VM.)
        config.kernel_params = vec![
            "earlyprintk=serial,ttyS0,115200".into(),
            "loglevel=7".into(),
        ];
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
                let text = format!("{e:#}");
                let mut source = std::error::Error::source(&e);
                let mut chain = text.clone();
                while let Some(s) = source {
                    chain.push_str(&format!(": {s}"));
                    source = s.source();
                }
                eprintln!("{chain}");
                assert!(detail.contains("emulation failure"), "probe said: {detail}");
                // The VMM's own words (exit status 4) and the guest's console.
                assert!(chain.contains("nutshell-vmm"), "{chain}");
                assert!(chain.contains("exited with status 4"), "{chain}");
                assert!(chain.contains("emulation failure"), "{chain}");
                assert!(
                    chain.contains("last console lines:\n  | ["),
                    "the guest's console is not quoted: {chain}"
                );
                assert!(t.elapsed() < dial.deadline, "waited for the dial deadline");
            }
        }
        assert_no_vm_left(tmp.path(), &state);
    });
}
