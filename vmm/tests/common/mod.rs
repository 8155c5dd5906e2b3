//! What the VMM's integration tests share: prerequisite checks, the
//! `nutshell-vmm` binary, and the pieces of the tiny CPL3 payloads that
//! drive devices on real KVM. The guest-side virtio-mmio driver and rings
//! are the library's (`devices::virtio::test_utils`, `test-utils` feature).
//!
//! `require` follows the same rule as `nutshell_tests::require`, kept here so
//! this crate needs no dependency on the test-harness crate (which depends on
//! the runtime, which depends on this crate).

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

pub mod payload;

use std::process::{Command, Output};

/// Returns `true` when `ok`. Otherwise prints `SKIP: <reason>` and returns
/// `false`, or, under `NUTSHELL_REQUIRE_ALL=1` (CI), panics.
pub fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("NUTSHELL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("prerequisite missing and NUTSHELL_REQUIRE_ALL=1: {reason}");
    }
    eprintln!("SKIP: {reason}");
    false
}

/// Whether `/dev/kvm` opens read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The `nutshell-vmm` binary cargo built for these tests.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
}

/// Runs the binary, seccomp filter and all, on `code` as a CPL3 payload in
/// 32 MiB with a 20 s limit and `devices` (e.g. `--fs <tag>,<socket>`) on its
/// command line. Returns how it ended and what the guest wrote to its serial
/// port.
pub fn run_payload(code: &[u8], devices: &[&str]) -> (Output, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payload.bin");
    std::fs::write(&path, code).unwrap();
    let serial = dir.path().join("serial.log");
    let out = vmm()
        .arg("--payload")
        .arg(&path)
        .args(["--memory-mib", "32", "--timeout-ms", "20000"])
        .args(devices)
        .arg("--serial")
        .arg(&serial)
        .output()
        .unwrap();
    // Missing when the VMM failed before its devices: the caller's check of
    // the exit status then says why.
    let got = std::fs::read(&serial).unwrap_or_default();
    (out, got)
}

/// Runs the binary with `json` as its `--config` file: (exit status, stderr).
pub fn run_config(json: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, json).unwrap();
    let out = vmm().arg("--config").arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}
