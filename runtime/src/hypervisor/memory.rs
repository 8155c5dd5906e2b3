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

/// What a VM process's resident memory is for, by mapping
/// (`/proc/<pid>/smaps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The guest's RAM: the one mapping at least as large as the guest
    /// memory (anonymous or a memfd), touched pages only.
    GuestMemory,
    /// The process's own executable file.
    OwnCode,
    /// Shared libraries.
    Libraries,
    /// Other files: the guest kernel or initramfs a VMM mapped, locale
    /// data and the like.
    OtherFiles,
    /// Every other anonymous mapping: heap, stacks, QEMU's TCG translation
    /// cache, I/O buffers.
    Anonymous,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Self::GuestMemory => "guest memory touched",
            Self::OwnCode => "own executable",
            Self::Libraries => "shared libraries",
            Self::OtherFiles => "other mapped files",
            Self::Anonymous => "heap, stacks, caches",
        }
    }
}

/// PSS in KiB by [`Cause`] of every process in the groups `pgids`, whose
/// guest has `guest_bytes` of memory.
pub fn pss_by_cause(pgids: &[u32], guest_bytes: u64) -> io::Result<Vec<(Cause, u64)>> {
    let mut total: Vec<(Cause, u64)> = Vec::new();
    for pid in processes_in_groups(pgids)? {
        let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
            continue;
        };
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for (cause, kib) in parse_smaps(&smaps, &exe, guest_bytes) {
            match total.iter_mut().find(|(c, _)| *c == cause) {
                Some((_, sum)) => *sum += kib,
                None => total.push((cause, kib)),
            }
        }
    }
    total.sort();
    Ok(total)
}

/// Each mapping of a `smaps` text as a cause and its PSS in KiB.
fn parse_smaps(text: &str, exe: &str, guest_bytes: u64) -> Vec<(Cause, u64)> {
    let mut out = Vec::new();
    let mut current: Option<Cause> = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) {
            // "start-end perms offset dev inode [path]"
            let path = words.nth(4).unwrap_or("");
            let size = end.saturating_sub(start);
            let memfd_or_anon = path.is_empty() || path.starts_with("/memfd:");
            current = Some(if memfd_or_anon && guest_bytes > 0 && size >= guest_bytes {
                Cause::GuestMemory
            } else if !exe.is_empty() && path == exe {
                Cause::OwnCode
            } else if path.ends_with(".so") || path.contains(".so.") {
                Cause::Libraries
            } else if path.starts_with('/') && !path.starts_with("/memfd:") {
                Cause::OtherFiles
            } else {
                Cause::Anonymous
            });
        } else if first == "Pss:" {
            if let (Some(cause), Some(kib)) = (current, words.next().and_then(|v| v.parse().ok())) {
                out.push((cause, kib));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_mappings_are_told_apart_by_cause() {
        let text = "\
55d0-55e0 r-xp 00000000 08:01 42 /usr/bin/qemu-system-x86_64
Pss:                 300 kB
7f00000000-7f10000000 rw-s 00000000 00:01 7 /memfd:nutshell-ram (deleted)
Size:             262144 kB
Pss:               40000 kB
7f20000000-7f21000000 rw-p 00000000 00:00 0
Pss:               16000 kB
7f30000000-7f30100000 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6
Pss:                 900 kB
7f40000000-7f40100000 r--p 00000000 08:01 44 /usr/share/nutshell/vmlinux
Pss:               11000 kB
7ffd0000-7ffe0000 rw-p 00000000 00:00 0 [stack]
Pss:                 100 kB
";
        let got = parse_smaps(text, "/usr/bin/qemu-system-x86_64", 256 << 20);
        assert_eq!(
            got,
            vec![
                (Cause::OwnCode, 300),
                (Cause::GuestMemory, 40000),
                (Cause::Anonymous, 16000),
                (Cause::Libraries, 900),
                (Cause::OtherFiles, 11000),
                (Cause::Anonymous, 100),
            ]
        );
        // A guest larger than the mapping: that mapping is not its RAM.
        assert_eq!(
            parse_smaps(text, "", 512 << 20)[1],
            (Cause::Anonymous, 40000)
        );
    }

    #[test]
    fn own_process_has_code_and_anonymous_memory() {
        let stat = fs::read_to_string("/proc/self/stat").unwrap();
        let pgrp = pgrp_of(&stat).unwrap();
        let by = pss_by_cause(&[pgrp], 1 << 40).unwrap();
        let of = |c| by.iter().find(|(x, _)| *x == c).map_or(0, |(_, k)| *k);
        assert!(of(Cause::OwnCode) > 0 && of(Cause::Anonymous) > 0, "{by:?}");
        assert_eq!(of(Cause::GuestMemory), 0);
    }

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
