//! The nutshell-vmm backend: our own KVM microVM monitor (`vmm/`), with the
//! hybrid vsock device inside it and the shared directory served by
//! virtiofsd through its vhost-user-fs frontend.
//!
//! One process fewer than QEMU (no vsock backend), and the VMM connects to
//! virtiofsd at start-up, so virtiofsd starts first and the VMM only once its
//! socket exists.

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

/// Where the programs this backend runs live.
#[derive(Debug, Clone)]
pub struct VmmBinaries {
    /// `nutshell-vmm`.
    pub vmm: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
}

impl VmmBinaries {
    /// Finds each program on `PATH`, then in `/usr/local/bin`,
    /// `/usr/libexec` and `/usr/bin`.
    pub fn discover() -> Result<Self, HypervisorError> {
        Ok(Self {
            vmm: find_program("nutshell-vmm")?,
            virtiofsd: find_program("virtiofsd")?,
        })
    }
}

/// Runs VMs with `nutshell-vmm`. KVM only: it has no emulator to fall back
/// on, so [`Accel::Tcg`] is refused.
#[derive(Debug, Clone)]
pub struct VmmHypervisor {
    binaries: VmmBinaries,
    socket_timeout: Duration,
}

impl VmmHypervisor {
    /// A backend with these programs.
    pub fn new(binaries: VmmBinaries) -> Self {
        Self {
            binaries,
            socket_timeout: Duration::from_secs(5),
        }
    }

    /// A backend with the programs [`VmmBinaries::discover`] finds.
    pub fn discover() -> Result<Self, HypervisorError> {
        VmmBinaries::discover().map(Self::new)
    }

    /// The programs this backend runs.
    pub fn binaries(&self) -> &VmmBinaries {
        &self.binaries
    }
}

/// nutshell-vmm's arguments for `config`. The VMM appends its virtio-mmio
/// devices to the command line itself.
fn vmm_args(config: &VmConfig, files: &VmFiles) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--kernel".into(),
        config.kernel.clone().into(),
        "--initrd".into(),
        config.initrd.clone().into(),
        "--cmdline".into(),
        kernel_cmdline(config).into(),
        "--memory-mib".into(),
        config.memory_mib.to_string().into(),
        "--vcpus".into(),
        config.vcpus.to_string().into(),
        "--serial".into(),
        files.console.clone().into(),
    ];
    let mut vsock = OsString::from(format!("{GUEST_CID},"));
    vsock.push(&files.agent);
    a.extend(["--vsock".into(), vsock]);
    if let Some(fs) = &files.fs {
        let mut v = OsString::from(format!("{SHARED_DIR_TAG},"));
        v.push(fs);
        a.extend(["--fs".into(), v]);
    }
    for nic in &config.nics {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*nic.tap);
        a.extend(["--net".into(), format!("fd={fd},mac={}", nic.mac).into()]);
    }
    a
}

#[async_trait]
impl Hypervisor for VmmHypervisor {
    fn name(&self) -> &'static str {
        "vmm"
    }

    async fn launch(&self, config: &VmConfig) -> Result<RunningVm, HypervisorError> {
        if config.accel == Accel::Tcg {
            return Err(HypervisorError::InvalidConfig(
                "nutshell-vmm runs on KVM only; software emulation (tcg) needs the qemu backend"
                    .into(),
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err(HypervisorError::InvalidConfig(
                "nutshell-vmm needs /dev/kvm, which does not exist on this host".into(),
            ));
        }
        // The VMM connects to virtiofsd as it starts, so virtiofsd first.
        let launch = Launch::prepare(config, &[])?
            .start_virtiofsd(&self.binaries.virtiofsd, config)
            .await?;
        let files = launch.files.clone();
        let waits: Vec<(&str, &Path)> = files
            .fs
            .iter()
            .map(|fs| ("virtiofsd", fs.as_path()))
            .collect();
        let launch = launch.wait_for_sockets(&waits, self.socket_timeout).await?;

        let mut vmm = Command::new(&self.binaries.vmm);
        vmm.args(vmm_args(config, &files));
        inherit_taps(&mut vmm, config);
        let launch = launch.spawn(ProcessRole::Vmm, "nutshell-vmm", vmm).await?;
        tracing::info!(vm = %config.id, "nutshell-vmm VM started");
        Ok(launch.into_running())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::hypervisor::arg_tests::{strings, value_after};

    fn args_of(c: &VmConfig) -> Vec<String> {
        strings(vmm_args(c, &VmFiles::new(c)))
    }

    fn config() -> VmConfig {
        let mut c = VmConfig::new("pod-a", "/run/nutshell/pod-a");
        c.kernel = "/k/vmlinux".into();
        c.initrd = "/k/initrd".into();
        c.memory_mib = 128;
        c.vcpus = 2;
        c
    }

    #[test]
    fn command_line_without_a_shared_directory() {
        let args = args_of(&config());
        assert_eq!(value_after(&args, "--kernel"), ["/k/vmlinux"]);
        assert_eq!(value_after(&args, "--initrd"), ["/k/initrd"]);
        assert_eq!(value_after(&args, "--memory-mib"), ["128"]);
        assert_eq!(value_after(&args, "--vcpus"), ["2"]);
        assert_eq!(
            value_after(&args, "--serial"),
            ["/run/nutshell/pod-a/console.log"]
        );
        assert_eq!(
            value_after(&args, "--vsock"),
            ["3,/run/nutshell/pod-a/vsock.sock"]
        );
        assert!(value_after(&args, "--fs").is_empty());
        let cmdline = value_after(&args, "--cmdline");
        assert_eq!(cmdline.len(), 1);
        assert!(cmdline[0].starts_with("console=ttyS0 reboot=t panic=-1 "));
    }

    #[test]
    fn shared_directory_and_extra_params() {
        let mut c = config();
        c.shared_dir = Some("/run/nutshell/pod-a/shared".into());
        c.kernel_params = vec!["nutshell.debug=1".into()];
        let args = args_of(&c);
        assert_eq!(
            value_after(&args, "--fs"),
            ["nutshell,/run/nutshell/pod-a/fs.sock"]
        );
        assert!(value_after(&args, "--cmdline")[0].ends_with(" quiet nutshell.debug=1"));
    }

    #[tokio::test]
    async fn tcg_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new("pod-t", dir.path().join("state"));
        c.kernel = dir.path().join("vmlinux");
        c.initrd = dir.path().join("initrd");
        std::fs::write(&c.kernel, b"k").unwrap();
        std::fs::write(&c.initrd, b"i").unwrap();
        c.accel = Accel::Tcg;
        let hv = VmmHypervisor::new(VmmBinaries {
            vmm: "/nonexistent/nutshell-vmm".into(),
            virtiofsd: "/nonexistent/virtiofsd".into(),
        });
        let e = hv.launch(&c).await.unwrap_err().to_string();
        assert!(e.contains("qemu backend"), "{e}");
        assert!(!c.state_dir.exists(), "nothing may be created");
    }
}
