//! The container's /dev (init side): the default nodes every OCI container
//! gets, the spec's `linux.devices`, and the standard links.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{Linux, LinuxDeviceType};

use super::init::{Context, InitError, InitResult};
use super::mounts::secure_join;

/// (name, major, minor) of the nodes the OCI spec says a container has.
const DEFAULT_NODES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEFAULT_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

fn make_node(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
) -> InitResult<()> {
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    match mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        Ok(()) => {}
        Err(nix::Error::EPERM) => {
            // Without CAP_MKNOD, bind the agent's node instead.
            let host = format!(
                "/dev/{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
            nix::mount::mount(
                Some(host.as_str()),
                path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| format!("binding {host} to {}", path.display()))?;
            return Ok(());
        }
        Err(e) => {
            return Err(InitError::internal(format!(
                "creating device node {}: {e}",
                path.display()
            )))
        }
    }
    // mknod applies the umask; set the mode exactly.
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .ctx(|| format!("chmod {}", path.display()))?;
    nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))
        .ctx(|| format!("chown {}", path.display()))?;
    Ok(())
}

/// Creates the default nodes, the spec's devices and the /dev links under
/// `rootfs`. Nodes that exist already are left alone.
pub fn create_default_nodes(rootfs: &Path, linux: Option<&Linux>) -> InitResult<()> {
    let dev = secure_join(rootfs, Path::new("/dev"))?;
    in_dir(&dev, || {
        for (name, major, minor) in DEFAULT_NODES {
            make_node(Path::new(name), SFlag::S_IFCHR, major, minor, 0o666, 0, 0)?;
        }
        Ok(())
    })?;
    for d in linux
        .and_then(|l| l.devices().as_deref())
        .unwrap_or_default()
    {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(InitError::invalid(format!(
                    "device {} has type \"a\", which is only valid in cgroup rules",
                    d.path().display()
                )))
            }
        };
        let path = secure_join(rootfs, d.path())?;
        let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
        make_node(
            &path,
            kind,
            d.major() as u64,
            d.minor() as u64,
            mode,
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        )?;
    }
    in_dir(&dev, || {
        for (name, target) in DEFAULT_LINKS {
            let link = Path::new(name);
            if link.symlink_metadata().is_ok() {
                // A bind-mounted /dev or a devtmpfs ptmx node: keep what is
                // there, except a ptmx node, which must be this devpts
                // instance's.
                if name != "ptmx" || !Path::new("pts/ptmx").exists() || fs::read_link(link).is_ok()
                {
                    continue;
                }
                fs::remove_file(link).ctx(|| format!("replacing /dev/{name}"))?;
            }
            symlink(target, link).ctx(|| format!("linking /dev/{name} to {target}"))?;
        }
        Ok(())
    })
}

/// Runs `f` with `dir` as the working directory, then returns to the one
/// before. /dev is a tmpfs under a virtio-fs rootfs, whose lookups each
/// cost a round trip to virtiofsd (mounts.rs says why): names relative to
/// /dev itself skip the rootfs's components.
fn in_dir(dir: &Path, f: impl FnOnce() -> InitResult<()>) -> InitResult<()> {
    let back = fs::File::open(".").ctx(|| "opening the working directory".into())?;
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    nix::unistd::chdir(dir).ctx(|| format!("chdir to {}", dir.display()))?;
    let r = f();
    nix::unistd::fchdir(&back).ctx(|| "returning to the rootfs".into())?;
    r
}
