//! cgroup v2.

/// Whether a cgroup v2 hierarchy is mounted at /sys/fs/cgroup.
pub fn available() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}
