//! `nutshell check`: one verdict per prerequisite, then the backend.

use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nutshell_vmm::probe::{probe_kvm, ProbeVerdict};

/// What `nutshell check` looks at.
pub struct Options {
    /// Guest asset directory.
    pub guest_dir: PathBuf,
}

/// One verdict's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Present and working.
    Ok,
    /// Present but cannot do what nutshell needs (e.g. KVM that cannot run Linux).
    No,
    /// Not there.
    Missing,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Short name, stable for scripts (`kvm`, `kvm-linux`, ...).
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found, in words.
    pub detail: String,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Ok => "ok",
            Status::No => "no",
            Status::Missing => "missing",
        };
        write!(f, "{tag:<8}{:<20}{}", self.name, self.detail)
    }
}

/// The backend nutshell would use here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// nutshell-vmm on KVM.
    Vmm,
    /// QEMU: on KVM where it can run Linux, TCG (software CPU) otherwise.
    Qemu,
    /// Neither can work.
    None,
}

impl Backend {
    /// The name printed by `--backend-only`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vmm => "vmm",
            Backend::Qemu => "qemu",
            Backend::None => "none",
        }
    }
}

/// Exit statuses of `nutshell check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Ready, with the own VMM on KVM.
    ReadyVmm = 0,
    /// Ready, but only with QEMU/TCG (slower).
    ReadyQemu = 3,
    /// Not ready: something required is missing.
    NotReady = 4,
}

/// The full report.
pub struct Report {
    /// Every verdict, in print order.
    pub verdicts: Vec<Verdict>,
    /// The backend nutshell would use.
    pub backend: Backend,
    /// Why that backend.
    pub backend_reason: String,
}

impl Report {
    fn ok(&self, name: &str) -> bool {
        self.verdicts
            .iter()
            .any(|v| v.name == name && v.status == Status::Ok)
    }

    /// Whether everything both backends need is there.
    pub fn common_ready(&self) -> bool {
        ["guest-kernel", "guest-initramfs", "virtiofsd", "containerd"]
            .iter()
            .all(|n| self.ok(n))
    }

    /// The exit status for scripts.
    pub fn exit_status(&self) -> i32 {
        let s = match (self.backend, self.common_ready()) {
            (Backend::Vmm, true) => ExitStatus::ReadyVmm,
            (Backend::Qemu, true) => ExitStatus::ReadyQemu,
            _ => ExitStatus::NotReady,
        };
        s as i32
    }

    /// The closing line.
    pub fn backend_line(&self) -> String {
        let missing: Vec<&str> = self
            .verdicts
            .iter()
            .filter(|v| v.status == Status::Missing)
            .map(|v| v.name)
            .collect();
        let mut line = format!("backend {} ({})", self.backend.name(), self.backend_reason);
        if !self.common_ready() {
            line.push_str(&format!("; not ready, missing: {}", missing.join(", ")));
        }
        line
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// First line of `prog args`' output, if it runs.
fn version_of(prog: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(prog).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn tool(name: &'static str, version_args: &[&str]) -> Verdict {
    match which(name) {
        Some(p) => {
            let v = version_of(&p, version_args).unwrap_or_default();
            Verdict {
                name,
                status: Status::Ok,
                detail: format!("{} {v}", p.display()).trim_end().to_string(),
            }
        }
        None => Verdict {
            name,
            status: Status::Missing,
            detail: "not found on PATH".into(),
        },
    }
}

fn asset(name: &'static str, path: PathBuf) -> Verdict {
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() > 0 => Verdict {
            name,
            status: Status::Ok,
            detail: format!("{} ({} bytes)", path.display(), m.len()),
        },
        _ => Verdict {
            name,
            status: Status::Missing,
            detail: format!("{} is missing", path.display()),
        },
    }
}

fn kvm_verdicts() -> (Verdict, Verdict) {
    let usable = OpenOptions::new().read(true).write(true).open("/dev/kvm");
    let kvm = match &usable {
        Ok(_) => Verdict {
            name: "kvm",
            status: Status::Ok,
            detail: "/dev/kvm is present and usable".into(),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Verdict {
            name: "kvm",
            status: Status::Missing,
            detail: "/dev/kvm does not exist".into(),
        },
        Err(e) => Verdict {
            name: "kvm",
            status: Status::No,
            detail: format!("/dev/kvm cannot be opened: {e}"),
        },
    };
    let linux = if usable.is_err() {
        Verdict {
            name: "kvm-linux",
            status: Status::No,
            detail: "not probed: /dev/kvm is not usable".into(),
        }
    } else {
        match probe_kvm(Duration::from_secs(5)) {
            Ok(ProbeVerdict::CanRunLinux) => Verdict {
                name: "kvm-linux",
                status: Status::Ok,
                detail: "KVM can run a Linux guest (the CPL0 int3 probe reached its handler)"
                    .into(),
            },
            Ok(ProbeVerdict::CannotRunLinux { detail }) => Verdict {
                name: "kvm-linux",
                status: Status::No,
                detail: format!("KVM cannot run a Linux guest: {detail}"),
            },
            Err(e) => Verdict {
                name: "kvm-linux",
                status: Status::No,
                detail: format!("the KVM probe failed: {e}"),
            },
        }
    };
    (kvm, linux)
}

/// Runs every check.
pub fn run(opts: &Options) -> Report {
    let (kvm, kvm_linux) = kvm_verdicts();
    let kvm_runs_linux = kvm_linux.status == Status::Ok;
    let verdicts = vec![
        kvm,
        kvm_linux,
        tool("nutshell-vmm", &["--version"]),
        tool("qemu-system-x86_64", &["--version"]),
        tool("vhost-device-vsock", &["--version"]),
        tool("virtiofsd", &["--version"]),
        asset("guest-kernel", opts.guest_dir.join("vmlinux")),
        asset("guest-initramfs", opts.guest_dir.join("initramfs.cpio.gz")),
        tool("containerd", &["--version"]),
    ];
    let mut report = Report {
        verdicts,
        backend: Backend::None,
        backend_reason: String::new(),
    };
    (report.backend, report.backend_reason) = choose_backend(
        kvm_runs_linux,
        report.ok("nutshell-vmm"),
        report.ok("qemu-system-x86_64") && report.ok("vhost-device-vsock"),
    );
    report
}

/// The backend the runtime's `auto` picks (`runtime/src/hypervisor/select.rs`),
/// and why.
fn choose_backend(kvm_runs_linux: bool, has_vmm: bool, has_qemu: bool) -> (Backend, String) {
    match (kvm_runs_linux, has_vmm, has_qemu) {
        (true, true, _) => (Backend::Vmm, "nutshell-vmm on KVM".into()),
        (true, false, true) => (
            Backend::Qemu,
            "QEMU on KVM: nutshell-vmm is not installed".into(),
        ),
        (false, _, true) => (
            Backend::Qemu,
            "QEMU with TCG: KVM here cannot run a Linux guest".into(),
        ),
        (true, false, false) => (
            Backend::None,
            "KVM runs Linux but neither nutshell-vmm nor QEMU with vhost-device-vsock is installed"
                .into(),
        ),
        (false, _, false) => (
            Backend::None,
            "KVM cannot run Linux and QEMU or vhost-device-vsock is missing".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &'static str, status: Status) -> Verdict {
        Verdict {
            name,
            status,
            detail: String::new(),
        }
    }

    fn report(backend: Backend, missing: &[&'static str]) -> Report {
        let names = ["guest-kernel", "guest-initramfs", "virtiofsd", "containerd"];
        Report {
            verdicts: names
                .iter()
                .map(|n| {
                    let s = if missing.contains(n) {
                        Status::Missing
                    } else {
                        Status::Ok
                    };
                    v(n, s)
                })
                .collect(),
            backend,
            backend_reason: "r".into(),
        }
    }

    #[test]
    fn exit_status_follows_backend_and_prerequisites() {
        assert_eq!(report(Backend::Vmm, &[]).exit_status(), 0);
        assert_eq!(report(Backend::Qemu, &[]).exit_status(), 3);
        assert_eq!(report(Backend::None, &[]).exit_status(), 4);
        let r = report(Backend::Vmm, &["guest-initramfs"]);
        assert_eq!(r.exit_status(), 4);
        assert!(r.backend_line().contains("missing: guest-initramfs"));
    }

    #[test]
    fn the_backend_follows_kvm_and_what_is_installed() {
        assert_eq!(choose_backend(true, true, true).0, Backend::Vmm);
        assert_eq!(choose_backend(true, true, false).0, Backend::Vmm);
        let (b, why) = choose_backend(true, false, true);
        assert_eq!(b, Backend::Qemu);
        assert!(why.contains("on KVM"), "{why}");
        let (b, why) = choose_backend(false, true, true);
        assert_eq!(b, Backend::Qemu);
        assert!(why.contains("TCG"), "{why}");
        assert_eq!(choose_backend(false, true, false).0, Backend::None);
        assert_eq!(choose_backend(true, false, false).0, Backend::None);
    }

    #[test]
    fn a_missing_asset_is_reported_with_its_path() {
        let d = asset("guest-kernel", PathBuf::from("/nonexistent/vmlinux"));
        assert_eq!(d.status, Status::Missing);
        assert!(d.to_string().contains("/nonexistent/vmlinux is missing"));
    }
}
