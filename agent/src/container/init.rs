//! The internal `init` mode: the agent binary re-executed as the first
//! process of a container (or of an exec). It runs single-threaded, so it may
//! fork, setns and unshare freely, which the multi-threaded server must not.
//!
//! Stage 1 receives the [`InitConfig`] on fd 3, joins and creates the
//! namespaces, and forks, since a new or joined pid namespace only applies
//! to children. It reports the child's pid and exits; the child is
//! reparented to the agent (PID 1 or a subreaper). Stage 2, the child, sets
//! the container up, reports Ready, waits for Start, and execs the user
//! process. Errors travel back as a kind and a sentence; the channel is close-on-exec,
//! so EOF after Start means the execve succeeded.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use super::channel::{recv_blocking, send_blocking, InitErrorKind, InitMsg};
use super::config::InitConfig;
use super::{caps, mounts, namespaces, process, rlimits};

/// The descriptor the agent hands the control socket on.
pub const CONTROL_FD: i32 = 3;

/// An error in the container's init: its kind travels to the agent with
/// the message, which is forwarded to the caller.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InitError {
    /// What sort of failure; decides the status the caller gets.
    pub kind: InitErrorKind,
    /// A sentence saying what failed.
    pub message: String,
}

impl InitError {
    /// An error of `kind`.
    pub fn new(kind: InitErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The request is malformed or contradicts itself.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(InitErrorKind::Invalid, message)
    }

    /// The request is valid but not implemented here.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(InitErrorKind::Unsupported, message)
    }

    /// The agent's or the kernel's failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(InitErrorKind::Internal, message)
    }

    fn into_msg(self) -> InitMsg {
        InitMsg::Error {
            kind: self.kind,
            message: self.message,
        }
    }
}

/// Result of init steps.
pub type InitResult<T> = Result<T, InitError>;

/// Adds a sentence to a low-level error.
pub trait Context<T> {
    /// Maps the error to an internal "`what`: `error`".
    fn ctx(self, what: impl FnOnce() -> String) -> InitResult<T>;
    /// Maps the error to "`what`: `error`" of `kind`.
    fn ctx_as(self, kind: InitErrorKind, what: impl FnOnce() -> String) -> InitResult<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> InitResult<T> {
        self.ctx_as(InitErrorKind::Internal, what)
    }

    fn ctx_as(self, kind: InitErrorKind, what: impl FnOnce() -> String) -> InitResult<T> {
        self.map_err(|e| InitError::new(kind, format!("{}: {e}", what())))
    }
}

/// Entry point of the re-executed agent. Never returns.
pub fn main() -> ! {
    // SAFETY: the agent installs the control socket as fd 3 before exec and
    // nothing else in this fresh process owns it.
    let ctl = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    // Close-on-exec: a successful execve is reported by EOF.
    let _ = nix::fcntl::fcntl(
        &ctl,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let err = match stage1(ctl.as_fd()) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = send_blocking(ctl.as_fd(), &err.into_msg(), None);
    std::process::exit(1)
}

fn stage1(ctl: BorrowedFd<'_>) -> InitResult<std::convert::Infallible> {
    restore_address_randomization()?;
    let cfg = match recv_blocking(ctl).ctx(|| "reading the container config".into())? {
        Some(InitMsg::Config(cfg)) => cfg,
        Some(other) => {
            return Err(InitError::internal(format!(
                "unexpected control message {other:?}"
            )))
        }
        None => std::process::exit(1),
    };
    namespaces::enter(&cfg)?;
    let (sync_r, sync_w) = nix::unistd::pipe().ctx(|| "pipe".into())?;
    // SAFETY: this process is single-threaded (a fresh exec of the agent
    // that started no threads), so the child may run arbitrary code.
    match unsafe { nix::unistd::fork() }.ctx(|| "fork of the container process".into())? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(sync_r);
            let _ = send_blocking(ctl, &InitMsg::Pid(child.as_raw()), None);
            drop(sync_w);
            std::process::exit(0)
        }
        nix::unistd::ForkResult::Child => {
            drop(sync_w);
            // Wait until stage 1 has reported our pid, so the agent sees Pid
            // before anything stage 2 sends.
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&sync_r, &mut b);
            drop(sync_r);
            let err = match stage2(ctl, &cfg) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let _ = send_blocking(ctl, &err.into_msg(), None);
            std::process::exit(1)
        }
    }
}

/// The agent starts the init without address space randomization (see
/// `spawn`), for the init's own code. Everything the init executes gets it
/// back: the personality is inherited across execve.
fn restore_address_randomization() -> InitResult<()> {
    use nix::sys::personality::{self, Persona};
    let current = personality::get().ctx(|| "reading the personality".into())?;
    if current.contains(Persona::ADDR_NO_RANDOMIZE) {
        personality::set(current - Persona::ADDR_NO_RANDOMIZE)
            .ctx(|| "turning address space randomization back on".into())?;
    }
    Ok(())
}

fn stage2(ctl: BorrowedFd<'_>, cfg: &InitConfig) -> InitResult<std::convert::Infallible> {
    if !cfg.exec {
        mounts::prepare_rootfs(cfg)?;
        if let Some(h) = &cfg.hostname {
            nix::unistd::sethostname(h).ctx(|| format!("setting the hostname to {h:?}"))?;
        }
        mounts::pivot_root(&cfg.rootfs)?;
        process::apply_sysctls(&cfg.spec)?;
        mounts::mask_and_protect(&cfg.spec)?;
        if cfg
            .spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false)
        {
            mounts::readonly_root()?;
        }
    }
    if cfg.terminal {
        let master = process::attach_terminal()?;
        send_blocking(ctl, &InitMsg::Pty, Some(master.as_fd())).ctx(|| "sending the pty".into())?;
    }
    process::apply_oom_score_adj(&cfg.spec)?;
    rlimits::apply(&cfg.process)?;
    let prepared = process::prepare_exec(&cfg.process)?;
    send_blocking(ctl, &InitMsg::Ready, None).ctx(|| "reporting ready".into())?;
    match recv_blocking(ctl).ctx(|| "waiting for start".into())? {
        Some(InitMsg::Start) => {}
        // The agent went away or gave up: nothing to run.
        _ => std::process::exit(1),
    }
    let nnp = cfg.process.no_new_privileges().unwrap_or(false);
    if !nnp {
        // Without no_new_privileges the filter needs CAP_SYS_ADMIN, so it
        // goes on before the capabilities are dropped.
        super::seccomp::apply(&cfg.seccomp)?;
    }
    caps::drop_bounding(&cfg.process)?;
    process::switch_user(&cfg.process)?;
    caps::apply(&cfg.process)?;
    if nnp {
        nix::sys::prctl::set_no_new_privs().ctx(|| "setting no_new_privileges".into())?;
        super::seccomp::apply(&cfg.seccomp)?;
    }
    Err(process::exec(prepared))
}
