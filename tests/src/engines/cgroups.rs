//! The cgroup parent an engine puts its containers in, in every hierarchy
//! (v1 controllers here, or v2): who is in it, and removing it.

use std::fs;
use std::path::{Path, PathBuf};

use super::text;

/// The cgroup hierarchies' roots: each v1 controller's mount, the v2
/// mount, or `/sys/fs/cgroup` itself where it is the v2 root.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    if let Ok(rd) = fs::read_dir(base) {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    roots.retain(|r| r.join("cgroup.procs").is_file());
    roots
}

/// The cgroup `name` and those below it, in every hierarchy, deepest first.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut dirs = Vec::new();
    for root in cgroup_roots() {
        let top = root.join(name);
        if top.is_dir() {
            walk(&top, &mut dirs);
        }
    }
    dirs
}

/// The processes in the cgroup `name` or below it, as (pid, command line).
pub(super) fn cgroup_processes(name: &str) -> Vec<(u32, String)> {
    let mut pids: Vec<u32> = cgroup_dirs(name)
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, text(&cmd).replace('\0', " "))
        })
        .collect()
}

/// Removes the cgroup `name` and those below it (only empty cgroups can
/// go); returns those left.
pub(super) fn remove_cgroup(name: &str) -> Vec<PathBuf> {
    cgroup_dirs(name)
        .into_iter()
        .filter(|d| fs::remove_dir(d).is_err() && d.exists())
        .collect()
}
