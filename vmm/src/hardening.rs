//! What the VMM gives up once the VM is built: every capability, and every
//! syscall outside what running the VM needs (a seccomp allowlist applied to
//! all threads). A guest that takes over a device model can then neither
//! open files nor exec, mount, ptrace or load anything.

use std::collections::BTreeMap;

use caps::CapSet;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Failure to harden the process.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// The filter could not be built.
    #[error("Failed to build the seccomp filter.")]
    Build(#[source] seccompiler::BackendError),
    /// Compiling the filter to BPF failed.
    #[error("Failed to compile the seccomp filter.")]
    Compile(#[source] seccompiler::BackendError),
    /// Installing the filter failed.
    #[error("Failed to install the seccomp filter.")]
    Apply(#[source] seccompiler::Error),
    /// Dropping capabilities failed.
    #[error("Failed to drop capabilities.")]
    Caps(#[source] caps::errors::CapsError),
}

/// Syscalls a running VMM makes: vCPU ioctls, the event loop, eventfds,
/// the serial/block files, vsock and API sockets, memory allocation, thread
/// exit and the kick signal. virtio-fs activation and reset (the `vhost`
/// crate's frontend, on a vCPU thread) only add `sendmsg`/`recvmsg` on the
/// already connected vhost-user socket (our fds go out as SCM_RIGHTS; no
/// reply we ask for carries fds), `read`/`write` on eventfds and `futex`; the
/// connection itself is made before the filter is installed
/// (`tests/virtio_fs.rs` runs the binary through both under the filter).
/// virtio-net's tap is opened (and `TUNSETIFF`ed) at build time too; then
/// it needs only `read` and `writev` (`tests/virtio_net.rs`
/// runs a guest's ARP exchange through the binary under the filter).
pub const ALLOWED_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The allowlist as BPF; anything else kills the process (SIGSYS).
pub fn vmm_filter() -> Result<BpfProgram, HardeningError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED_SYSCALLS.iter().map(|&s| (s, vec![])).collect();
    // A thread that has just been spawned names itself; nothing else.
    let set_name = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::PR_SET_NAME as u64,
    )
    .map_err(HardeningError::Build)?;
    rules.insert(
        libc::SYS_prctl,
        vec![SeccompRule::new(vec![set_name]).map_err(HardeningError::Build)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(HardeningError::Build)?;
    filter.try_into().map_err(HardeningError::Compile)
}

/// Installs [`vmm_filter`] on every thread of the process. Irreversible:
/// only the `nutshell-vmm` binary does this, never a library caller.
pub fn apply_seccomp() -> Result<(), HardeningError> {
    let prog = vmm_filter()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(HardeningError::Apply)
}

/// Drops every capability (the VM's fds are already open).
pub fn drop_capabilities() -> Result<(), HardeningError> {
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(HardeningError::Caps)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_and_leaves_out_dangerous_calls() {
        let prog = vmm_filter().unwrap();
        assert!(!prog.is_empty());
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_clone,
            libc::SYS_init_module,
        ] {
            assert!(!ALLOWED_SYSCALLS.contains(&forbidden), "{forbidden}");
        }
    }
}
