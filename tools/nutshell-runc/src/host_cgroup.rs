//! The container's `cgroupsPath` on the host, holding the stand-in and so
//! the VM's processes (its children).
//!
//! The container's own cgroup, with its limits, is in the guest. On the
//! host, engines read the cgroup of the pid `create` reported: Docker's
//! runc shim loads it for `docker stats`, Podman for `podman stats`. Were
//! the stand-in left in the caller's cgroup, they would report that
//! cgroup (the engine's own, or the whole machine). In the container's
//! path, they report what the container costs the host: the VMM, its
//! backends, the guest's memory. No limit is set there: the spec's limits
//! are the guest's, and the VM needs more than its container (Kata's
//! "sandbox cgroup" does the same).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// cgroup v1 controllers the stand-in joins: the ones engines read stats
/// from. (cpuset needs its cpus and mems set before it takes a task.)
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];

/// The directories `cgroups_path` names, one per hierarchy: the unified
/// one (v2), or the v1 controllers above. `None` for a systemd-style path
/// (`slice:prefix:name`): there is no systemd in this picture to ask.
pub fn dirs(cgroups_path: &Path) -> Option<Vec<PathBuf>> {
    let rel = cgroups_path.to_str()?;
    if rel.contains(':') || rel.is_empty() {
        return None;
    }
    let rel = rel.trim_start_matches('/');
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return Some(vec![root.join(rel)]);
    }
    Some(
        V1_CONTROLLERS
            .iter()
            .map(|c| root.join(c))
            .filter(|d| {
                // Skip co-mounts seen through a symlink (cpu -> cpu,cpuacct).
                fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()) && d.join("cgroup.procs").exists()
            })
            .map(|d| d.join(rel))
            .collect(),
    )
}

/// Moves `pid` into each of `dirs`, making them as needed.
pub fn join(dirs: &[PathBuf], pid: u32) -> io::Result<()> {
    for d in dirs {
        fs::create_dir_all(d)?;
        fs::write(d.join("cgroup.procs"), pid.to_string()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot move {pid} into {}: {e}", d.display()),
            )
        })?;
    }
    Ok(())
}

/// Removes `dirs` (once their processes are gone); missing ones are fine.
pub fn remove(dirs: &[PathBuf]) {
    for d in dirs {
        match fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove the host cgroup")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_paths_are_left_alone_and_others_sit_under_each_hierarchy() {
        assert_eq!(dirs(Path::new("system.slice:docker:abc")), None);
        assert_eq!(dirs(Path::new("")), None);
        let d = dirs(Path::new("/docker/abc")).unwrap();
        assert!(
            d.iter()
                .all(|p| p.ends_with("docker/abc") && p.starts_with(CGROUP_ROOT)),
            "{d:?}"
        );
    }
}
