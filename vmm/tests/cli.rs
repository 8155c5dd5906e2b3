//! The `nutshell-vmm` binary's exit statuses, as the runtime sees them.

use std::path::Path;
use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("NUTSHELL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("prerequisite missing and NUTSHELL_REQUIRE_ALL=1: {reason}");
    }
    eprintln!("SKIP: {reason}");
    false
}

#[test]
fn a_missing_kernel_is_a_setup_error_that_names_it() {
    let out = vmm()
        .args(["--kernel", "/nonexistent/vmlinux", "--serial", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Failed to open the kernel image /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn bad_usage_is_status_2() {
    let out = vmm().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn probe_and_time_limit_statuses() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let out = vmm().arg("--probe").output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(out.status.code(), Some(10), "{line}");
        assert!(line.starts_with("KVM cannot run a Linux guest: "), "{line}");
    } else {
        assert!(matches!(out.status.code(), Some(0 | 10)), "{line}");
    }

    let dir = tempfile::tempdir().unwrap();
    let spin = dir.path().join("spin.bin");
    std::fs::write(&spin, [0xeb, 0xfe]).unwrap();
    let out = vmm()
        .arg("--payload")
        .arg(&spin)
        .args(["--serial", "none", "--timeout-ms", "300"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("time limit"));
}
