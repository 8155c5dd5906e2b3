//! Starting a container's init process (agent side): the socketpair, the
//! stdio, the re-execution of `/proc/self/exe`, and the handshake up to
//! Ready. Only `dup2` runs between fork and exec (in `pre_exec`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::channel::{Channel, InitErrorKind, InitMsg};
use super::config::InitConfig;
use super::init::CONTROL_FD;
use crate::cgroup::Cgroup;
use crate::error::AgentError;
use crate::reaper::Reaper;
use crate::stdio::{spawn_reader, OutputBuffer, StdinWriter};

/// How long set-up may take before the agent gives up on it.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's handles on a process that reported Ready.
pub struct Spawned {
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    /// The control channel, for Start.
    pub channel: Channel,
    /// Stdin, if requested (or the pty).
    pub stdin: Option<StdinWriter>,
    /// Stdout (or the terminal's output).
    pub stdout: Arc<OutputBuffer>,
    /// Stderr (empty and at EOF for a terminal).
    pub stderr: Arc<OutputBuffer>,
    /// The pty master, for resizes.
    pub pty: Option<OwnedFd>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::internal(format!("creating a pipe: {e}")))
}

/// Maps an init's error to a status; the one place that decides it.
pub fn init_error(id: &str, kind: InitErrorKind, message: String) -> AgentError {
    let message = format!("container {id}: {message}");
    match kind {
        // NOT_FOUND on this API means the container or process the request
        // names does not exist; a missing executable is a mistake in the
        // request, like a malformed or unsupported one.
        InitErrorKind::NotFound | InitErrorKind::Invalid | InitErrorKind::Unsupported => {
            AgentError::InvalidArgument(message)
        }
        // The spec is fine but this host does not allow it (no
        // CAP_SYS_RESOURCE for oom_score_adj or rlimits).
        InitErrorKind::PermissionDenied => AgentError::FailedPrecondition(message),
        InitErrorKind::Internal => AgentError::Internal(message),
    }
}

/// Spawns the init, sends `cfg`, and waits until the process is set up.
pub async fn spawn(
    id: &str,
    cfg: InitConfig,
    want_stdin: bool,
    cgroup: Option<&Cgroup>,
    reaper: &Reaper,
) -> Result<Spawned, AgentError> {
    let terminal = cfg.terminal;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| AgentError::internal(format!("creating the control socket: {e}")))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(crate::INIT_ARG).env_clear();
    let mut stdin_w = None;
    let mut out_r = None;
    let mut err_r = None;
    if terminal {
        // The init opens the pty inside the container.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else {
        if want_stdin {
            let (r, w) = pipe()?;
            cmd.stdin(Stdio::from(r));
            stdin_w = Some(w);
        } else {
            cmd.stdin(Stdio::null());
        }
        let (r, w) = pipe()?;
        cmd.stdout(Stdio::from(w));
        out_r = Some(r);
        let (r, w) = pipe()?;
        cmd.stderr(Stdio::from(w));
        err_r = Some(r);
    }
    let raw = theirs.as_raw_fd();
    // SAFETY: the closure only calls dup2, fcntl and personality, which are
    // async-signal-safe, on a descriptor that stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // The init maps the agent at the same address every time.
            // Under QEMU's TCG, code run at a new virtual address is
            // translated again, so a randomized init translated once more
            // what the pool's warm-up's init had translated a moment
            // before: 4 MiB more of QEMU's memory per claimed pod, and a
            // slower start (README, "Where a pod's start goes"). The init
            // turns randomization back on before it executes anything
            // (`init::restore_address_randomization`).
            use nix::sys::personality::{self, Persona};
            personality::set(personality::get()? | Persona::ADDR_NO_RANDOMIZE)?;
            if raw == CONTROL_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| AgentError::internal(format!("starting the container init: {e}")))?;
    drop(theirs);
    drop(cmd);
    let stage1 = child.id() as i32;
    // The reaper, not std, collects it.
    drop(child);
    let stage1_exit = reaper.wait(stage1);
    // Kills a process we give up on; the dropped waiter makes the reaper
    // discard its exit instead of keeping it unclaimed.
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        drop(reaper.wait(pid));
    };
    if let Some(cg) = cgroup {
        if let Err(e) = cg.add(stage1) {
            kill(stage1);
            return Err(e);
        }
    }
    let mut channel =
        Channel::new(ours).map_err(|e| AgentError::internal(format!("control socket: {e}")))?;

    // The container process's pid once stage 1 reported it, for the
    // time-out path (which cannot see inside the handshake future).
    let seen_pid = std::sync::atomic::AtomicI32::new(0);
    let handshake = async {
        channel
            .send(&InitMsg::Config(Box::new(cfg)))
            .await
            .map_err(|e| AgentError::internal(format!("sending the config to the init: {e}")))?;
        let pid = match channel.recv().await {
            Ok(Some(InitMsg::Pid(pid))) => {
                seen_pid.store(pid, std::sync::atomic::Ordering::SeqCst);
                pid
            }
            Ok(Some(InitMsg::Error { kind, message })) => {
                return Err(init_error(id, kind, message))
            }
            Ok(other) => {
                return Err(AgentError::internal(format!(
                    "container {id}: the init ended its handshake early ({other:?})"
                )))
            }
            Err(e) => {
                return Err(AgentError::internal(format!(
                    "container {id}: reading from the init: {e}"
                )))
            }
        };
        let mut pty = None;
        loop {
            match channel.recv().await {
                Ok(Some(InitMsg::Ready)) => break,
                Ok(Some(InitMsg::Pty)) => pty = channel.fds.pop(),
                Ok(Some(InitMsg::Error { kind, message })) => {
                    kill(pid);
                    return Err(init_error(id, kind, message));
                }
                Ok(other) => {
                    kill(pid);
                    return Err(AgentError::internal(format!(
                        "container {id}: the container process ended during set-up ({other:?})"
                    )));
                }
                Err(e) => {
                    kill(pid);
                    return Err(AgentError::internal(format!(
                        "container {id}: reading from the init: {e}"
                    )));
                }
            }
        }
        Ok((pid, pty))
    };
    let (pid, pty) = match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            kill(stage1);
            let pid = seen_pid.load(std::sync::atomic::Ordering::SeqCst);
            if pid > 0 {
                kill(pid);
            }
            return Err(AgentError::internal(format!(
                "container {id}: set-up took longer than {SETUP_TIMEOUT:?}"
            )));
        }
    };
    // Stage 1 exits right after reporting the pid.
    let _ = tokio::time::timeout(SETUP_TIMEOUT, stage1_exit).await;

    let stdout = Arc::new(OutputBuffer::default());
    let stderr = Arc::new(OutputBuffer::default());
    let io_err = |e: std::io::Error| AgentError::internal(format!("container {id}: stdio: {e}"));
    let mut stdin = None;
    match (&pty, out_r, err_r) {
        (Some(master), _, _) => {
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(io_err);
            spawn_reader(dup(master)?, stdout.clone()).map_err(io_err)?;
            stderr.close();
            stdin = Some(StdinWriter::new(dup(master)?, true).map_err(io_err)?);
        }
        (None, Some(o), Some(e)) => {
            spawn_reader(o, stdout.clone()).map_err(io_err)?;
            spawn_reader(e, stderr.clone()).map_err(io_err)?;
            if let Some(w) = stdin_w {
                stdin = Some(StdinWriter::new(w, false).map_err(io_err)?);
            }
        }
        _ => {
            kill(pid);
            return Err(AgentError::internal(format!(
                "container {id}: a terminal was requested but the init sent no pty"
            )));
        }
    }
    Ok(Spawned {
        pid,
        channel,
        stdin,
        stdout,
        stderr,
        pty,
    })
}

/// Sends Start and waits for the execve: EOF on the channel (it is
/// close-on-exec) means it succeeded.
pub async fn start(id: &str, mut channel: Channel) -> Result<(), AgentError> {
    channel
        .send(&InitMsg::Start)
        .await
        .map_err(|e| AgentError::internal(format!("container {id}: sending start: {e}")))?;
    match tokio::time::timeout(SETUP_TIMEOUT, channel.recv()).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(InitMsg::Error { kind, message }))) => Err(init_error(id, kind, message)),
        Ok(Ok(Some(other))) => Err(AgentError::internal(format!(
            "container {id}: unexpected message after start: {other:?}"
        ))),
        Ok(Err(e)) => Err(AgentError::internal(format!(
            "container {id}: reading from the init: {e}"
        ))),
        Err(_) => Err(AgentError::internal(format!(
            "container {id}: the process did not exec within {SETUP_TIMEOUT:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    #[test]
    fn each_init_error_kind_has_one_status() {
        let cases = [
            (InitErrorKind::NotFound, Code::INVALID_ARGUMENT),
            (InitErrorKind::Invalid, Code::INVALID_ARGUMENT),
            (InitErrorKind::Unsupported, Code::INVALID_ARGUMENT),
            (InitErrorKind::PermissionDenied, Code::FAILED_PRECONDITION),
            (InitErrorKind::Internal, Code::INTERNAL),
        ];
        for (kind, code) in cases {
            let e = init_error("c1", kind, "it failed".into());
            assert_eq!(e.code(), code, "{kind:?}");
            assert_eq!(e.to_string(), "container c1: it failed");
        }
    }

    #[test]
    fn the_status_follows_the_kind_not_the_wording() {
        // Wordings the old substring match keyed on, under other kinds.
        let e = init_error(
            "c",
            InitErrorKind::Internal,
            "exec \"x\": is not supported".into(),
        );
        assert_eq!(e.code(), Code::INTERNAL);
        let e = init_error("c", InitErrorKind::Invalid, "setting it was refused".into());
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    }
}
