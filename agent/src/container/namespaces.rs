//! Joining and creating namespaces (init side), and mapping the spec's
//! namespace list onto what to join and what to create (agent side).

use std::fs::File;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use oci_spec::runtime::LinuxNamespaceType;

use super::config::{InitConfig, NsJoin};
use super::init::{Context, InitResult};

/// The namespace kinds the engine supports, with their /proc/<pid>/ns name.
pub const SUPPORTED: [(LinuxNamespaceType, &str); 6] = [
    (LinuxNamespaceType::Pid, "pid"),
    (LinuxNamespaceType::Network, "net"),
    (LinuxNamespaceType::Ipc, "ipc"),
    (LinuxNamespaceType::Uts, "uts"),
    (LinuxNamespaceType::Mount, "mnt"),
    (LinuxNamespaceType::Cgroup, "cgroup"),
];

/// The /proc/<pid>/ns name of a supported namespace kind.
pub fn proc_name(kind: LinuxNamespaceType) -> Option<&'static str> {
    SUPPORTED.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n)
}

/// The CLONE_NEW* flag of a namespace kind.
pub fn flag(kind: LinuxNamespaceType) -> i32 {
    kind as i32
}

/// Joins every namespace of `/proc/<pid>/ns` that differs from the agent's
/// own (for exec into a running container).
pub fn joins_for_exec(init_pid: i32) -> Vec<NsJoin> {
    // The mount namespace goes last: once in it, /proc may be another one.
    let order = ["cgroup", "ipc", "uts", "net", "pid", "mnt"];
    order
        .iter()
        .filter_map(|name| {
            let (kind, _) = SUPPORTED.iter().find(|(_, n)| n == name)?;
            let theirs = PathBuf::from(format!("/proc/{init_pid}/ns/{name}"));
            let ours = PathBuf::from(format!("/proc/self/ns/{name}"));
            let same = match (std::fs::read_link(&theirs), std::fs::read_link(&ours)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            (!same).then(|| NsJoin {
                kind: (*name).to_string(),
                flag: flag(*kind),
                path: theirs,
            })
        })
        .collect()
}

/// Init side: opens every namespace to join first (joining the mount
/// namespace changes what paths mean), enters them, then creates the new
/// ones.
pub fn enter(cfg: &InitConfig) -> InitResult<()> {
    let files = cfg
        .join
        .iter()
        .map(|j| {
            File::open(&j.path)
                .ctx(|| format!("opening the {} namespace {}", j.kind, j.path.display()))
        })
        .collect::<InitResult<Vec<_>>>()?;
    for (j, f) in cfg.join.iter().zip(&files) {
        nix::sched::setns(f, CloneFlags::from_bits_retain(j.flag))
            .ctx(|| format!("joining the {} namespace {}", j.kind, j.path.display()))?;
    }
    if cfg.unshare != 0 {
        nix::sched::unshare(CloneFlags::from_bits_retain(cfg.unshare))
            .ctx(|| "creating the container's namespaces".into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_match_the_kernel() {
        assert_eq!(flag(LinuxNamespaceType::Pid), libc::CLONE_NEWPID);
        assert_eq!(flag(LinuxNamespaceType::Network), libc::CLONE_NEWNET);
        assert_eq!(flag(LinuxNamespaceType::Mount), libc::CLONE_NEWNS);
        assert_eq!(flag(LinuxNamespaceType::Cgroup), libc::CLONE_NEWCGROUP);
        assert_eq!(proc_name(LinuxNamespaceType::User), None);
    }

    #[test]
    fn exec_into_ourselves_joins_nothing() {
        assert!(joins_for_exec(std::process::id() as i32).is_empty());
    }
}
