//! A claimed VM joins its claimer's cgroups. A VM the claimer boots itself
//! starts in them, as its child; a warm VM started in the pool's. Moved,
//! a claimed VM is accounted (memory, CPU, pids) and limited with its pod's
//! shim, as a cold-booted one is, and a pool's stop cannot take it along.

use std::fs;
use std::path::PathBuf;

/// The directory of each cgroup this process is in, on cgroup v1, v2 or
/// both: from `/proc/self/cgroup` ("id:controllers:path") and the cgroup
/// mounts of `/proc/self/mountinfo`. A hierarchy with no mount here is
/// left out.
fn cgroup_dirs(cgroups: &str, mountinfo: &str) -> Vec<PathBuf> {
    // (mount point, file system type, super options) of each cgroup mount.
    let mounts: Vec<(&str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            let mut after = after.split_whitespace();
            let fstype = after.next()?;
            let options = after.nth(1).unwrap_or("").split(',').collect();
            matches!(fstype, "cgroup" | "cgroup2").then_some((mount_point, fstype, options))
        })
        .collect();
    cgroups
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let mount = if controllers.is_empty() {
                mounts.iter().find(|(_, t, _)| *t == "cgroup2")
            } else {
                mounts.iter().find(|(_, t, opts)| {
                    *t == "cgroup" && controllers.split(',').all(|c| opts.contains(&c))
                })
            }?;
            Some(PathBuf::from(mount.0).join(path.trim_start_matches('/')))
        })
        .collect()
}

/// Moves every process in the groups led by `leaders` into this process's
/// cgroups. Best effort: a cgroup that refuses (cgroup v2's rule against
/// processes in inner cgroups, a delegation that does not allow it) is
/// logged, and the processes stay where they were in that hierarchy.
pub fn join_my_cgroups(leaders: &[u32]) {
    let dirs = my_cgroup_dirs();
    if dirs.is_empty() {
        return;
    }
    let pids = super::memory::processes_in_groups(leaders).unwrap_or_default();
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        for pid in &pids {
            if let Err(e) = fs::write(&procs, pid.to_string()) {
                // A process that ended meanwhile is not a failure.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    tracing::warn!(cgroup = %dir.display(), pid, error = %e, "a claimed VM's process cannot join its claimer's cgroup");
                }
            }
        }
    }
}

/// This process's cgroups: what [`join_my_cgroups`] joins (empty when
/// `/proc` cannot say).
pub fn my_cgroup_dirs() -> Vec<PathBuf> {
    match (
        fs::read_to_string("/proc/self/cgroup"),
        fs::read_to_string("/proc/self/mountinfo"),
    ) {
        (Ok(c), Ok(m)) => cgroup_dirs(&c, &m),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw
";

    #[test]
    fn each_hierarchy_maps_to_its_mount() {
        let cgroups = "\
9:name=systemd:/
4:memory:/process_api/abc
2:cpu,cpuacct:/kubepods/pod1
7:blkio:/
0::/
";
        assert_eq!(
            cgroup_dirs(cgroups, MOUNTINFO),
            vec![
                PathBuf::from("/sys/fs/cgroup/systemd"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1"),
                // blkio has no mount here: left out.
                PathBuf::from("/sys/fs/cgroup/unified"),
            ]
        );
    }

    #[test]
    fn a_pure_v2_host_has_one_directory() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup_dirs("0::/system.slice/containerd.service\n", mountinfo),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/containerd.service"
            )]
        );
        assert!(cgroup_dirs("garbage\n", mountinfo).is_empty());
    }
}
