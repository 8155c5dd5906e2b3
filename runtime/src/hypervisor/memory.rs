//! Host memory used by a VM's process tree, for benchmarks and `nutshell`
//! diagnostics.

use std::fs;
use std::io;

/// Host memory of a set of processes, summed over their
/// `/proc/<pid>/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// Resident set size, KiB (pages shared between the processes, such as
    /// the guest memory memfd mapped by QEMU and its vhost-user backends,
    /// count once per process).
    pub rss_kib: u64,
    /// Proportional set size, KiB (shared pages split between their users:
    /// the honest total).
    pub pss_kib: u64,
    /// Number of processes counted.
    pub processes: usize,
}

/// Sums the memory of every process whose process group is one of `pgids`
/// (each VM process is the leader of its own group, so this also counts any
/// helper it forked, such as virtiofsd's sandbox child).
pub fn host_memory(pgids: &[u32]) -> io::Result<HostMemory> {
    let mut total = HostMemory::default();
    for pid in processes_in_groups(pgids)? {
        // The process may have exited since; skip it then.
        let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        let (rss, pss) = parse_rollup(&rollup);
        total.rss_kib += rss;
        total.pss_kib += pss;
        total.processes += 1;
    }
    Ok(total)
}

/// Every process whose process group is one of `pgids`.
pub(crate) fn processes_in_groups(pgids: &[u32]) -> io::Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if pgrp_of(&stat).is_some_and(|g| pgids.contains(&g)) {
            found.push(pid);
        }
    }
    Ok(found)
}

/// The process group from `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn pgrp_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state, ppid, pgrp.
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// `(Rss, Pss)` in KiB from a `smaps_rollup` text.
fn parse_rollup(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgrp_survives_odd_command_names() {
        let stat = "1234 (qemu) (x) y) S 1 4321 4321 0 -1 4194560";
        assert_eq!(pgrp_of(stat), Some(4321));
        assert_eq!(pgrp_of("garbage"), None);
    }

    #[test]
    fn rollup_fields_parse() {
        let text = "00400000-7fff [rollup]\nRss:               10240 kB\nPss:                5120 kB\nPss_Anon:  1 kB\n";
        assert_eq!(parse_rollup(text), (10240, 5120));
    }

    #[test]
    fn own_process_group_is_measured() {
        let stat = fs::read_to_string("/proc/self/stat").unwrap();
        let pgrp = pgrp_of(&stat).unwrap();
        let m = host_memory(&[pgrp]).unwrap();
        assert!(m.processes >= 1);
        assert!(m.rss_kib > 0 && m.pss_kib > 0 && m.pss_kib <= m.rss_kib);
    }
}
