//! Prerequisite checks shared by the VMM's integration tests.
//!
//! The same rule as `nutshell_tests::require`, kept here so this crate needs
//! no dependency on the test-harness crate (which depends on the runtime,
//! which depends on this crate).

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

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
