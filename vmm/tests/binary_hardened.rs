//! The `nutshell-vmm` binary with its default hardening (no capabilities,
//! seccomp allowlist on every thread): a payload talks to a virtio-mmio
//! device, the host connects over hybrid vsock and drives the API, and the
//! process ends with the API's shutdown status, not SIGSYS.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::payload::Asm;
use common::{kvm_usable, require};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPL3 code: print the MMIO magic, device id and status of the first
/// virtio-mmio window, then spin.
fn payload() -> Vec<u8> {
    let mut c = Asm::new();
    c.print_virtio_identity().spin_forever();
    c.code()
}

#[test]
fn hardened_vmm_serves_devices_vsock_and_api() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("code.bin"), payload()).unwrap();
    std::fs::write(p("disk.img"), vec![0u8; 4096]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nutshell-vmm"))
        .arg("--payload")
        .arg(p("code.bin"))
        .args(["--memory-mib", "32", "--rng", "--timeout-ms", "30000"])
        .arg("--block")
        .arg(format!("{},ro", p("disk.img").display()))
        .arg("--vsock")
        .arg(format!("3,{}", p("v.sock").display()))
        .arg("--api-socket")
        .arg(p("api.sock"))
        .arg("--serial")
        .arg(p("serial.log"))
        .spawn()
        .unwrap();

    let serial = p("serial.log");
    wait_for("the payload's serial output", || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.ends_with('\n'))
    });
    // Window 0 is the block device (type 2); status reads back ACK|DRIVER.
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), "virt23\n");

    // A host vsock client: accepted and its CONNECT line read under seccomp.
    let mut host = UnixStream::connect(p("v.sock")).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();

    let api = p("api.sock");
    wait_for("the API socket", || Path::new(&api).exists());
    let s = UnixStream::connect(&api).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    writeln!(&s, r#"{{"op":"state"}}"#).unwrap();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("running"), "{line}");
    writeln!(&s, r#"{{"op":"shutdown"}}"#).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("stopping"), "{line}");

    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{status:?} (159 would be SIGSYS)");
}
