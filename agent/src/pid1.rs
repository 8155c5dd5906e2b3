//! What the agent does as PID 1 of a guest: the early mounts, loopback, the
//! console, the vsock port from the kernel command line, and power-off.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, mkdir};

/// An error while setting the guest up.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    /// Mounting failed.
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        /// File-system type.
        fstype: String,
        /// Mount point.
        target: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A system call failed.
    #[error("{what} failed")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what} failed")]
    Io {
        /// What was attempted.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Pid1Error {
    move |source| Pid1Error::Sys { what, source }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Pid1Error> {
    let _ = fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        // Already mounted (devtmpfs by console_logging, or by the kernel).
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(Pid1Error::Mount {
            fstype: fstype.to_string(),
            target: target.to_string(),
            source,
        }),
    }
}

/// Logs go to the console. The kernel hands PID 1 /dev/console as its stdio
/// when the initramfs has one; devtmpfs is mounted first so it exists.
/// `NUTSHELL_AGENT_CONSOLE=<path>` (the kernel passes unknown `key=value`
/// command-line words to init as environment) names another file, which
/// also lets a test run the PID 1 path in a pid namespace and read the log.
pub fn console_logging() {
    let _ = fs::create_dir_all("/dev");
    let _ = mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID,
        None::<&str>,
    );
    let path =
        std::env::var("NUTSHELL_AGENT_CONSOLE").unwrap_or_else(|_| "/dev/console".to_string());
    if let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(path != "/dev/console")
        .open(&path)
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this
            // still single-threaded process; `console` stays open.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .init();
}

/// Mounts the guest's file systems, moves off the initramfs root, enables the
/// cgroup v2 controllers and brings up `lo`.
pub fn setup() -> Result<(), Pid1Error> {
    leave_rootfs()?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // /dev/ptmx must be the ptmx of this devpts instance.
    let _ = fs::remove_file("/dev/ptmx");
    let _ = symlink("pts/ptmx", "/dev/ptmx");
    mount_fs("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = symlink(target, link);
    }
    match mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nodev,
        Some("nsdelegate"),
    ) {
        Ok(()) => {
            enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
            if let Err(e) = crate::cgroup::prepare_parent() {
                tracing::warn!("{e}");
            }
        }
        Err(e) => tracing::warn!("cgroup v2 unavailable, containers run without cgroups: {e}"),
    }
    if let Err(e) = loopback_up() {
        tracing::warn!("bringing lo up failed: {e}");
    }
    Ok(())
}

/// The initramfs root (rootfs) can never be pivot_root'ed away from, so
/// containers could not pivot_root. Mounting a tmpfs over `/` (what
/// switch_root does) gives every later mount namespace a root that has a
/// parent. The agent keeps running from the initramfs file; `/proc/self/exe`
/// still reaches it for re-execution.
fn leave_rootfs() -> Result<(), Pid1Error> {
    // The initramfs root is a ramfs or tmpfs (rootfs); /proc is not mounted
    // yet, so ask statfs rather than mountinfo. Moving a tmpfs over another
    // tmpfs root is harmless.
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // RAMFS_MAGIC (linux/magic.h); neither libc nor nix name it.
    let ramfs = FsType(0x8584_58f6);
    let is_rootfs = statfs("/")
        .is_ok_and(|s| s.filesystem_type() == ramfs || s.filesystem_type() == TMPFS_MAGIC);
    if !is_rootfs {
        return Ok(());
    }
    let new = "/.nutshell-root";
    mkdir(new, nix::sys::stat::Mode::from_bits_truncate(0o755))
        .or_else(|e| {
            if e == nix::Error::EEXIST {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(sys("creating the new root directory"))?;
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| Pid1Error::Mount {
        fstype: "tmpfs".into(),
        target: new.into(),
        source,
    })?;
    chdir(new).map_err(sys("chdir to the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the new root onto /"))?;
    chroot(".").map_err(sys("chroot into the new root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}

/// Enables every available controller for child cgroups.
pub fn enable_cgroup_controllers(root: &Path) {
    let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) else {
        return;
    };
    for c in controllers.split_whitespace() {
        if let Err(e) = fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!("enabling cgroup controller {c} failed: {e}");
        }
    }
}

/// Brings the loopback interface up with SIOCSIFFLAGS.
fn loopback_up() -> Result<(), Pid1Error> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("socket"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Pid1Error::Sys {
            what: "SIOCGIFFLAGS lo",
            source: nix::Error::last(),
        });
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Pid1Error::Sys {
            what: "SIOCSIFFLAGS lo",
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// The vsock port: `nutshell.agent_port=N` on the kernel command line, else
/// the protocol's default.
pub fn agent_port_from_cmdline() -> u32 {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    port_from_cmdline(&cmdline)
}

fn port_from_cmdline(cmdline: &str) -> u32 {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("nutshell.agent_port="))
        .filter_map(|p| p.parse().ok())
        .next_back()
        .unwrap_or(nutshell_protocol::DEFAULT_AGENT_VSOCK_PORT)
}

/// Makes orphaned descendants (what containers leave behind) our children,
/// so the reaper collects them on a host as PID 1 does in a guest.
pub fn become_subreaper() -> Result<(), Pid1Error> {
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("PR_SET_CHILD_SUBREAPER"))
}

/// Syncs and stops the machine. Only returns if the kernel refuses.
///
/// It reboots rather than powers off: the VMs (QEMU microvm without ACPI,
/// nutshell-vmm) have no power-off device, so the kernel would turn a
/// power-off into a halt that never ends; every VMM runs the guest with
/// "reboot = exit" (`-no-reboot`), so a reboot ends the VM at once.
pub fn power_off() {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    tracing::error!("power off failed: {e}");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_comes_from_the_command_line() {
        assert_eq!(port_from_cmdline("console=ttyS0 panic=-1"), 1024);
        assert_eq!(
            port_from_cmdline("console=ttyS0 nutshell.agent_port=2000 quiet"),
            2000
        );
        assert_eq!(port_from_cmdline("nutshell.agent_port=x"), 1024);
    }
}
