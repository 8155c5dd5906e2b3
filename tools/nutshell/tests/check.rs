//! Runs `nutshell check` on this host and holds its lines and exit status
//! against facts read independently of it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"))
}

fn status(l: &str) -> &str {
    l.split_whitespace().next().unwrap()
}

fn run(guest_dir: &Path) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_nutshell"))
        .args(["check", "--guest-dir"])
        .arg(guest_dir)
        .output()
        .unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        out.status.code().unwrap(),
    )
}

#[test]
fn check_matches_the_facts_of_this_host() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
    let (out, code) = run(dir.path());
    eprintln!("{out}");

    let kvm_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert_eq!(status(line(&out, "kvm")) == "ok", kvm_ok);
    let kvm_linux = line(&out, "kvm-linux");
    // The pagetable-based nested KVM emulates CPL0 and cannot run Linux.
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(status(kvm_linux), "no", "{kvm_linux}");
        assert!(kvm_linux.contains("KVM_EXIT_INTERNAL_ERROR"), "{kvm_linux}");
    }
    for tool in [
        "nutshell-vmm",
        "qemu-system-x86_64",
        "vhost-device-vsock",
        "virtiofsd",
        "containerd",
    ] {
        let want = if which(tool).is_some() {
            "ok"
        } else {
            "missing"
        };
        assert_eq!(status(line(&out, tool)), want, "{tool}");
    }
    assert_eq!(status(line(&out, "guest-kernel")), "ok");
    let initramfs = line(&out, "guest-initramfs");
    assert_eq!(status(initramfs), "missing");
    assert!(initramfs.contains("initramfs.cpio.gz is missing"));

    // With an asset missing the host is not ready, whatever the backend.
    assert_eq!(code, 4, "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("backend "), "{last}");
    // Other things may be missing too (nutshell-vmm where it is not
    // installed): the initramfs must be among them.
    let missing = last.split("missing: ").nth(1).unwrap_or("");
    assert!(
        missing.split(", ").any(|m| m == "guest-initramfs"),
        "{last}"
    );
    let backend = if status(kvm_linux) == "ok" {
        "vmm"
    } else if which("qemu-system-x86_64").is_some() && which("vhost-device-vsock").is_some() {
        "qemu"
    } else {
        "none"
    };
    assert!(last.starts_with(&format!("backend {backend} ")), "{last}");
}

#[test]
fn complete_assets_give_the_backend_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
    std::fs::write(dir.path().join("initramfs.cpio.gz"), b"x").unwrap();
    let (out, code) = run(dir.path());
    let last = out.lines().last().unwrap();
    let common = ["virtiofsd", "containerd"]
        .iter()
        .all(|t| which(t).is_some());
    let want = match (last.split_whitespace().nth(1).unwrap(), common) {
        ("vmm", true) => 0,
        ("qemu", true) => 3,
        _ => 4,
    };
    assert_eq!(code, want, "{out}");

    let b = Command::new(env!("CARGO_BIN_EXE_nutshell"))
        .args(["check", "--backend-only", "--guest-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(b.status.code(), Some(code));
    let name = String::from_utf8(b.stdout).unwrap();
    assert_eq!(name.trim(), last.split_whitespace().nth(1).unwrap());
}
