//! The QEMU backend: `qemu-system-x86_64 -M microvm`, with vsock and the
//! shared directory served by vhost-user backends (`vhost-device-vsock`,
//! `virtiofsd`), since hosts without vhost kernel modules are a case this
//! backend exists for.
//!
//! Start order: the backends first; QEMU only once their sockets exist, since
//! it connects to them at start-up and fails when they are missing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::cmdline::kernel_cmdline;
use super::launch::{inherit_taps, Launch, VmFiles};
use super::programs::find_program;
use super::vm::{ProcessRole, RunningVm};
use super::{Accel, Hypervisor, HypervisorError, VmConfig, GUEST_CID, SHARED_DIR_TAG};

/// Where the programs QEMU needs live.
#[derive(Debug, Clone)]
pub struct QemuBinaries {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock` (rust-vmm).
    pub vsock_backend: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
}

impl QemuBinaries {
    /// Finds each program on `PATH`, then in `/usr/local/bin` and
    /// `/usr/libexec` (where distributions put virtiofsd).
    pub fn discover() -> Result<Self, HypervisorError> {
        Ok(Self {
            qemu: find_program("qemu-system-x86_64")?,
            vsock_backend: find_program("vhost-device-vsock")?,
            virtiofsd: find_program("virtiofsd")?,
        })
    }
}

/// Runs VMs with QEMU's microvm machine.
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    binaries: QemuBinaries,
    kvm_usable: bool,
    socket_timeout: Duration,
}

impl QemuHypervisor {
    /// A backend with these programs. [`Accel::Auto`] means TCG until
    /// [`Self::with_kvm_usable`] says otherwise.
    pub fn new(binaries: QemuBinaries) -> Self {
        Self {
            binaries,
            kvm_usable: false,
            socket_timeout: Duration::from_secs(5),
        }
    }

    /// A backend with the programs [`QemuBinaries::discover`] finds.
    pub fn discover() -> Result<Self, HypervisorError> {
        QemuBinaries::discover().map(Self::new)
    }

    /// Whether this host's KVM can run a Linux guest, which makes
    /// [`Accel::Auto`] pick KVM. This is the hook for the probe
    /// (`nutshell check`): a nested KVM that cannot emulate a guest kernel
    /// must stay on TCG.
    pub fn with_kvm_usable(mut self, usable: bool) -> Self {
        self.kvm_usable = usable;
        self
    }

    /// How long a vhost-user backend gets to create its socket.
    pub fn with_socket_timeout(mut self, limit: Duration) -> Self {
        self.socket_timeout = limit;
        self
    }

    /// The programs this backend runs.
    pub fn binaries(&self) -> &QemuBinaries {
        &self.binaries
    }

    /// The accelerator a config ends up with on this backend.
    pub fn resolve_accel(&self, accel: Accel) -> Accel {
        match accel {
            Accel::Auto if self.kvm_usable => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }
}

/// QEMU's arguments for `config`, with `accel` already resolved.
pub(crate) fn qemu_args(config: &VmConfig, accel: Accel, files: &VmFiles) -> Vec<OsString> {
    fn push(a: &mut Vec<OsString>, parts: &[&str]) {
        a.extend(parts.iter().map(OsString::from));
    }
    let mem = config.memory_mib;
    let mut a: Vec<OsString> = Vec::new();
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        // TCG's translation cache defaults to 1 GiB and grows into it. A
        // boot fits in 16 MiB, but a container's start does not: the cache
        // flushes and retranslates, and a warm pod's `ctr run` took 678 ms
        // against 370–409 with 64 MiB. 128 MiB was no faster, and an idle
        // pod's PSS is the same with either. With the pool's warm-up, 32
        // MiB saves 11 MiB per pod but still costs 80 ms (README, "Idle
        // pod memory").
        Accel::Tcg | Accel::Auto => ("tcg,tb-size=64", "max"),
    };
    let name = format!("nutshell-{}", config.id);
    let smp = config.vcpus.to_string();
    let memory = format!("{mem}M");
    let backend = format!("memory-backend-memfd,id=mem,size={mem}M,share=on");
    push(&mut a, &["-name", &name]);
    // microvm without ACPI: QEMU then lists the virtio-mmio devices on the
    // kernel command line, which a kernel without ACPI can read. Guest memory
    // is a shared memfd so the vhost-user backends can map it.
    push(
        &mut a,
        &[
            "-M",
            "microvm,x-option-roms=off,acpi=off,memory-backend=mem",
        ],
    );
    push(
        &mut a,
        &["-accel", accel, "-cpu", cpu, "-smp", &smp, "-m", &memory],
    );
    push(&mut a, &["-object", &backend]);
    push(
        &mut a,
        &[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ],
    );
    // QEMU's own seccomp filter: no exec, no privilege changes.
    push(
        &mut a,
        &[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ],
    );
    a.push("-chardev".into());
    a.push(chardev("file", "con", &files.console));
    push(&mut a, &["-serial", "chardev:con"]);
    a.push("-kernel".into());
    a.push(config.kernel.clone().into_os_string());
    a.push("-initrd".into());
    a.push(config.initrd.clone().into_os_string());
    a.push("-append".into());
    a.push(kernel_cmdline(config).into());
    a.push("-chardev".into());
    a.push(chardev("socket", "vsock", &files.vhost_vsock));
    push(
        &mut a,
        &["-device", "vhost-user-vsock-device,chardev=vsock"],
    );
    if let Some(fs) = &files.fs {
        a.push("-chardev".into());
        a.push(chardev("socket", "fs", fs));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs,tag={SHARED_DIR_TAG}").into());
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*nic.tap);
        let netdev = format!("tap,id=net{i},fd={fd}");
        let device = format!("virtio-net-device,netdev=net{i},mac={}", nic.mac);
        push(&mut a, &["-netdev", &netdev, "-device", &device]);
    }
    a
}

/// `<kind>,id=<id>,path=<path>`. QEMU splits options at commas; a comma in
/// the path is written as two, as QEMU's option syntax requires.
fn chardev(kind: &str, id: &str, path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut v = format!("{kind},id={id},path=").into_bytes();
    for &b in path.as_os_str().as_bytes() {
        v.push(b);
        if b == b',' {
            v.push(b',');
        }
    }
    OsString::from_vec(v)
}

fn vsock_backend_args(files: &VmFiles) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--socket".into(),
        files.vhost_vsock.clone().into(),
        "--uds-path".into(),
        files.agent.clone().into(),
    ]
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, config: &VmConfig) -> Result<RunningVm, HypervisorError> {
        let accel = self.resolve_accel(config.accel);
        if accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(HypervisorError::InvalidConfig(
                "KVM was asked for but /dev/kvm does not exist".into(),
            ));
        }
        let vhost_vsock = VmFiles::new(config).vhost_vsock;
        let launch = Launch::prepare(config, &[&vhost_vsock])?;
        let mut vsock = Command::new(&self.binaries.vsock_backend);
        vsock.args(vsock_backend_args(&launch.files));
        let launch = launch
            .spawn(ProcessRole::VsockBackend, "vhost-device-vsock", vsock)
            .await?
            .start_virtiofsd(&self.binaries.virtiofsd, config)
            .await?;
        let files = launch.files.clone();
        let mut waits = vec![("vhost-device-vsock", files.vhost_vsock.as_path())];
        if let Some(fs) = &files.fs {
            waits.push(("virtiofsd", fs));
        }
        let launch = launch.wait_for_sockets(&waits, self.socket_timeout).await?;

        let mut qemu = Command::new(&self.binaries.qemu);
        qemu.args(qemu_args(config, accel, &files));
        inherit_taps(&mut qemu, config);
        let launch = launch
            .spawn(ProcessRole::Vmm, "qemu-system-x86_64", qemu)
            .await?;
        tracing::info!(vm = %config.id, accel = ?accel, "QEMU VM started");
        Ok(launch.into_running())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let mut c = VmConfig::new("pod-a", "/run/nutshell/pod-a");
        c.kernel = "/k/vmlinux".into();
        c.initrd = "/k/initrd".into();
        c.memory_mib = 128;
        c.vcpus = 2;
        c
    }

    use crate::hypervisor::arg_tests::{strings, value_after};

    fn args_of(c: &VmConfig, accel: Accel) -> Vec<String> {
        strings(qemu_args(c, accel, &VmFiles::new(c)))
    }

    #[test]
    fn tcg_command_line() {
        let args = args_of(&config(), Accel::Tcg);
        assert_eq!(value_after(&args, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(value_after(&args, "-cpu"), ["max"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["128M"]);
        assert_eq!(
            value_after(&args, "-M"),
            ["microvm,x-option-roms=off,acpi=off,memory-backend=mem"]
        );
        assert_eq!(
            value_after(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=128M,share=on"]
        );
        assert_eq!(value_after(&args, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(value_after(&args, "-initrd"), ["/k/initrd"]);
        assert!(args.contains(&"-no-reboot".to_string()));
        assert_eq!(
            value_after(&args, "-chardev"),
            [
                "file,id=con,path=/run/nutshell/pod-a/console.log",
                "socket,id=vsock,path=/run/nutshell/pod-a/vhu.sock",
            ]
        );
        assert_eq!(
            value_after(&args, "-device"),
            ["vhost-user-vsock-device,chardev=vsock"]
        );
        let append = value_after(&args, "-append");
        assert_eq!(append.len(), 1);
        assert!(append[0].starts_with("console=ttyS0 "));
        assert!(append[0].contains(" quiet"));
    }

    #[test]
    fn kvm_shared_dir_and_extra_params() {
        let mut c = config();
        c.shared_dir = Some("/run/nutshell/pod-a/shared".into());
        c.kernel_params = vec!["nutshell.agent_port=2000".into()];
        c.debug_console = true;
        let args = args_of(&c, Accel::Kvm);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        assert!(value_after(&args, "-chardev")
            .contains(&"socket,id=fs,path=/run/nutshell/pod-a/fs.sock"));
        assert!(
            value_after(&args, "-device").contains(&"vhost-user-fs-device,chardev=fs,tag=nutshell")
        );
        let append = value_after(&args, "-append")[0];
        assert!(
            append.ends_with(" loglevel=7 nutshell.agent_port=2000"),
            "{append}"
        );
        assert!(!append.contains("quiet"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let c = chardev("socket", "x", Path::new("/run/a,b/s.sock"));
        assert_eq!(c, "socket,id=x,path=/run/a,,b/s.sock");
    }

    #[test]
    fn backend_arguments() {
        let c = config();
        let files = VmFiles::new(&c);
        let v = strings(vsock_backend_args(&files));
        assert_eq!(
            v,
            [
                "--guest-cid",
                "3",
                "--socket",
                "/run/nutshell/pod-a/vhu.sock",
                "--uds-path",
                "/run/nutshell/pod-a/vsock.sock"
            ]
        );
    }

    #[test]
    fn auto_accel_follows_the_kvm_hook() {
        let b = QemuBinaries {
            qemu: "q".into(),
            vsock_backend: "v".into(),
            virtiofsd: "f".into(),
        };
        let hv = QemuHypervisor::new(b);
        assert_eq!(hv.resolve_accel(Accel::Auto), Accel::Tcg);
        assert_eq!(hv.resolve_accel(Accel::Kvm), Accel::Kvm);
        let hv = hv.with_kvm_usable(true);
        assert_eq!(hv.resolve_accel(Accel::Auto), Accel::Kvm);
        assert_eq!(hv.resolve_accel(Accel::Tcg), Accel::Tcg);
    }
}
