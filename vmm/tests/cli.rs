//! The `nutshell-vmm` binary's exit statuses, as the runtime sees them.

use std::path::Path;

mod common;
use common::{kvm_usable, require, vmm};

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

/// `--stdin-console`: the guest polls the UART's line status until a byte
/// arrives from the VMM's stdin, then echoes it (under the seccomp filter).
#[test]
fn stdin_reaches_the_guest_serial_port() {
    use std::io::Write;
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("echo.bin");
    std::fs::write(
        &code,
        [
            0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
            0xec, 0xa8, 0x01, 0x74, 0xfb, // in al, dx; test al, 1; jz back
            0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, // mov dx, 0x3f8; in al, dx; out dx, al
            0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe, // reset
        ],
    )
    .unwrap();
    let serial = dir.path().join("serial.log");
    let mut child = vmm()
        .arg("--payload")
        .arg(&code)
        .arg("--serial")
        .arg(&serial)
        .args(["--stdin-console", "--timeout-ms", "20000"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Z").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(std::fs::read(&serial).unwrap(), b"Z");
}

#[test]
fn json_config_builds_the_same_vm() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("hello.bin");
    // out 'J' to COM1, then reset.
    std::fs::write(
        &code,
        [
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'J', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe,
        ],
    )
    .unwrap();
    let serial = dir.path().join("serial.log");
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"payload": "{}", "memory_mib": 32, "serial": "{}", "rng": true, "timeout_ms": 20000}}"#,
            code.display(),
            serial.display()
        ),
    )
    .unwrap();
    let out = vmm().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&serial).unwrap(), b"J");

    std::fs::write(&cfg, r#"{"payload": "/x", "memroy_mib": 1}"#).unwrap();
    let out = vmm().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("memroy_mib"));
}

#[test]
fn bad_net_arguments_are_setup_errors_that_say_what_is_wrong() {
    // Checked before any VM or tap exists: no KVM, no root needed.
    for (arg, want) in [
        ("bad/name", "1 to 15 bytes"),
        ("a-name-far-too-long", "1 to 15 bytes"),
        ("tap0,mac=01:00:5e:00:00:01", "unicast"),
        ("tap0,mac=02:00:00:00:00", "six hex pairs"),
        ("tap0,speed=10", "<tap>[,mac=<mac>]"),
    ] {
        let out = vmm()
            .args(["--payload", "/dev/null", "--net", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{arg}: {err}");
        assert!(err.contains(want), "{arg}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"payload": "/dev/null", "net": [{"tap": "tap0", "mac": "zz:00:00:00:00:01"}]}"#,
    )
    .unwrap();
    let out = vmm().arg("--config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("zz:00:00:00:00:01"), "{err}");
}
