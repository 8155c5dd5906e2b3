//! What the host's /proc says about the agent: its processes, descriptors,
//! mounts and capabilities.

use std::path::Path;

pub fn cap_sys_resource(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

/// Every pid whose parent chain reaches `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = after
            .1
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        parent_of.push((pid, ppid));
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

pub fn count_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// [`count_fds`] once the count holds still: the agent closes a finished
/// call's descriptors (a reaped child's pipes, a ttrpc stream) a moment
/// after the reply, so one reading can count a descriptor that is on its
/// way out. Two equal readings 50 ms apart, within 2 s.
pub async fn settled_fds(pid: i32) -> usize {
    let mut last = count_fds(pid);
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = count_fds(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Mounts of this host that involve `dir` (the test's rootfs lives there):
/// other work on the machine may mount and unmount elsewhere meanwhile.
pub fn count_mounts(dir: &Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .count()
}
