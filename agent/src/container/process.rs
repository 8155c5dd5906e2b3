//! The user process (init side): sysctls, terminal, oom_score_adj, user and
//! groups, cwd, umask, environment, the executable lookup and execve.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use oci_spec::runtime::{Process, Spec};

use super::channel::InitErrorKind;
use super::init::{Context, InitError, InitResult};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Writes the spec's sysctls under /proc/sys (of the container's
/// namespaces, since /proc is the container's by now).
pub fn apply_sysctls(spec: &Spec) -> InitResult<()> {
    let Some(sysctls) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) else {
        return Ok(());
    };
    for (key, value) in sysctls {
        if key.is_empty() || key.contains('/') || key.split('.').any(|c| c.is_empty() || c == "..")
        {
            return Err(InitError::invalid(format!(
                "sysctl name {key:?} is invalid"
            )));
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        fs::write(&path, value).ctx(|| format!("setting sysctl {key}={value}"))?;
    }
    Ok(())
}

/// Opens a pty in the container's devpts, makes its slave our controlling
/// terminal and stdio, and returns the master for the agent.
pub fn attach_terminal() -> InitResult<OwnedFd> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .ctx(|| "opening /dev/ptmx (does the spec mount devpts on /dev/pts?)".into())?;
    nix::pty::grantpt(&master).ctx(|| "grantpt".into())?;
    nix::pty::unlockpt(&master).ctx(|| "unlockpt".into())?;
    let name = nix::pty::ptsname_r(&master).ctx(|| "ptsname".into())?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ctx(|| format!("opening {name}"))?;
    nix::unistd::setsid().ctx(|| "setsid".into())?;
    // SAFETY: TIOCSCTTY takes an int argument; `slave` is an open tty.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(InitError::internal(format!(
            "making {name} the controlling terminal: {}",
            nix::Error::last()
        )));
    }
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors of this single-threaded
        // process; `slave` stays open across the calls.
        if unsafe { libc::dup2(slave.as_raw_fd(), fd) } < 0 {
            return Err(InitError::internal(format!(
                "dup2 of the terminal: {}",
                nix::Error::last()
            )));
        }
    }
    let master: OwnedFd = master.into();
    Ok(master)
}

/// Sets oom_score_adj; a refusal (lowering it needs CAP_SYS_RESOURCE) is an
/// error naming the setting, never ignored.
pub fn apply_oom_score_adj(spec: &Spec) -> InitResult<()> {
    let Some(adj) = spec.process().as_ref().and_then(|p| p.oom_score_adj()) else {
        return Ok(());
    };
    let current = fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
    if current.trim() == adj.to_string() {
        return Ok(());
    }
    fs::write("/proc/self/oom_score_adj", adj.to_string()).ctx_as(
        InitErrorKind::PermissionDenied,
        || {
            format!(
            "setting process.oomScoreAdj to {adj} was refused (lowering it needs CAP_SYS_RESOURCE)"
        )
        },
    )
}

/// Everything execve needs, computed before the start signal so a missing
/// executable fails CreateContainer/ExecProcess, not later.
pub struct PreparedExec {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    display: String,
}

fn cstring(s: &str, what: &str) -> InitResult<CString> {
    CString::new(s).map_err(|_| InitError::invalid(format!("{what} {s:?} contains a NUL byte")))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolves args[0] against PATH from the process environment.
pub fn resolve_executable(arg0: &str, env: &[String]) -> InitResult<PathBuf> {
    if arg0.contains('/') {
        let p = PathBuf::from(arg0);
        return match fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                Err(InitError::invalid(format!("exec {arg0:?}: is a directory")))
            }
            Ok(_) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(InitError::new(
                InitErrorKind::NotFound,
                format!("exec {arg0:?}: no such file or directory"),
            )),
            Err(e) => Err(InitError::invalid(format!("exec {arg0:?}: {e}"))),
        };
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(arg0))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            InitError::new(
                InitErrorKind::NotFound,
                format!(
                    "exec {arg0:?}: executable file not found in $PATH: no such file or directory"
                ),
            )
        })
}

/// Changes to the cwd, sets the umask and prepares argv, envp and the path.
pub fn prepare_exec(process: &Process) -> InitResult<PreparedExec> {
    let args = process.args().as_deref().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err(InitError::invalid("process.args is empty"));
    };
    let env = process.env().as_deref().unwrap_or_default();
    let cwd = process.cwd();
    nix::unistd::chdir(cwd)
        .ctx(|| format!("changing to the working directory {}", cwd.display()))?;
    if let Some(mask) = process.user().umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
            mask as libc::mode_t,
        ));
    }
    let path = resolve_executable(arg0, env)?;
    let display = path.display().to_string();
    Ok(PreparedExec {
        path: cstring(&display, "executable path")?,
        argv: args
            .iter()
            .map(|a| cstring(a, "argument"))
            .collect::<InitResult<_>>()?,
        env: env
            .iter()
            .map(|e| cstring(e, "environment entry"))
            .collect::<InitResult<_>>()?,
        display,
    })
}

/// Switches to the process's uid, gid and additional groups, keeping the
/// permitted capabilities for [`super::caps::apply`].
pub fn switch_user(process: &Process) -> InitResult<()> {
    let user = process.user();
    let groups: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).ctx(|| "setting the additional groups".into())?;
    nix::sys::prctl::set_keepcaps(true).ctx(|| "PR_SET_KEEPCAPS".into())?;
    nix::unistd::setresgid(user.gid().into(), user.gid().into(), user.gid().into())
        .ctx(|| format!("setting gid {}", user.gid()))?;
    nix::unistd::setresuid(user.uid().into(), user.uid().into(), user.uid().into())
        .ctx(|| format!("setting uid {}", user.uid()))?;
    nix::sys::prctl::set_keepcaps(false).ctx(|| "PR_SET_KEEPCAPS".into())?;
    Ok(())
}

/// execve; only returns the error.
///
/// Signal dispositions go back to their defaults first, as runc does: an
/// ignored signal stays ignored across execve, and this process is a Rust
/// program, whose runtime ignores SIGPIPE (a container's `yes | head` would
/// then never end). The blocked mask is emptied for the same reason.
pub fn exec(p: PreparedExec) -> InitError {
    if let Err(e) = reset_signals() {
        return e;
    }
    let Err(e) = nix::unistd::execve(&p.path, &p.argv, &p.env);
    // Whatever execve refuses is the image's or the spec's doing.
    let kind = if e == nix::Error::ENOENT {
        InitErrorKind::NotFound
    } else {
        InitErrorKind::Invalid
    };
    InitError::new(
        kind,
        format!("exec {:?}: {}", p.display, e.desc().to_lowercase()),
    )
}

/// Every catchable signal to SIG_DFL and none blocked.
fn reset_signals() -> InitResult<()> {
    use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run
        // in signal context; the previous disposition is not needed.
        unsafe { signal(sig, SigHandler::SigDfl) }
            .ctx(|| format!("resetting the disposition of {sig}"))?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .ctx(|| "unblocking every signal".into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_resolve_through_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        let sh = resolve_executable("sh", &env).expect("sh is on PATH");
        assert!(sh.ends_with("sh"));
        let e = resolve_executable("/no/such/binary", &env).expect_err("missing");
        assert_eq!(e.kind, InitErrorKind::NotFound);
        assert!(
            e.message.contains("/no/such/binary")
                && e.message.contains("no such file or directory"),
            "{e}"
        );
        let e = resolve_executable("no-such-command-x", &env).expect_err("missing");
        assert_eq!(e.kind, InitErrorKind::NotFound);
        assert!(
            e.message.contains("no-such-command-x") && e.message.contains("not found"),
            "{e}"
        );
        let e = resolve_executable("/", &env).expect_err("a directory");
        assert_eq!(e.kind, InitErrorKind::Invalid, "{e}");
    }
}
