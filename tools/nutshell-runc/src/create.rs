//! `create` (and the first half of `run`): the stand-in is started in the
//! container's network namespace, the createRuntime and prestart hooks run
//! on the host with its pid (Docker 20.10 configures the namespace there),
//! and only then is the VM booted, so the mirrored network is the
//! configured one.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;

use crate::bundle::{Bundle, HookKind, NetPlan};
use crate::console;
use crate::hooks;
use crate::host_cgroup;
use crate::standin::{Ready, SYNC_FD};
use crate::state::{now_rfc3339, Locked, Record, Root, Status};
use crate::Globals;

/// How long `create` waits for the VM and the container. A TCG boot on a
/// loaded host takes seconds; the agent's own dial deadline is 30 s.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What `create` (and `run`) are given.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// The bundle: the directory holding config.json.
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket to send the terminal's master to (process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Where to write the stand-in's pid.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc's callers: the rootfs is never pivoted on the host.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc's callers: the guest kernel has its own keyrings.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds for the container: none can be passed into a VM, so only 0.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

/// Where the stand-in's stdio comes from.
pub enum Stdio3 {
    /// Ours, inherited (pipes, files: what the caller gave us).
    Inherit,
    /// A new pty whose master went to the console socket.
    Pty(OwnedFd),
}

impl Stdio3 {
    /// A pty for `--console-socket` when the process wants a terminal.
    pub fn for_terminal(terminal: bool, socket: Option<&Path>) -> Result<Self> {
        if !terminal {
            return Ok(Self::Inherit);
        }
        let Some(socket) = socket else {
            bail!("the process asks for a terminal (process.terminal) but no --console-socket was given to send it to");
        };
        let (master, slave, name) = console::open_pty().context("cannot make a pty")?;
        console::send_master(socket, &master, &name)?;
        Ok(Self::Pty(slave))
    }
}

/// Starts `nutshell-runc [globals] init ID [exec args]` with the sync
/// socket on fd 3, in a new session, in network namespace `net`.
pub fn spawn_stand_in(
    g: &Globals,
    args: &[String],
    stdio: &Stdio3,
    net: &NetPlan,
) -> Result<(Child, UnixStream)> {
    let (ours, theirs) = UnixStream::pair().context("cannot make the sync socket")?;
    let exe = std::env::current_exe().context("cannot find nutshell-runc's own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(g.to_args()).arg("init").args(args);
    if let Stdio3::Pty(slave) = stdio {
        for (n, what) in [(0, "stdin"), (1, "stdout"), (2, "stderr")] {
            let fd = slave.try_clone().with_context(|| format!("pty {what}"))?;
            match n {
                0 => cmd.stdin(Stdio::from(fd)),
                1 => cmd.stdout(Stdio::from(fd)),
                _ => cmd.stderr(Stdio::from(fd)),
            };
        }
    }
    let netns = match net {
        NetPlan::Join(p) => Some(
            std::fs::File::open(p)
                .with_context(|| format!("cannot open the network namespace {}", p.display()))?,
        ),
        _ => None,
    };
    let new_net = *net == NetPlan::New;
    let sync_fd = theirs.as_raw_fd();
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: between fork and exec the closure only makes raw system calls
    // (setsid, unshare, setns, dup2, fcntl) on fds that outlive the spawn;
    // it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if new_net {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if sync_fd == SYNC_FD {
                let flags = libc::fcntl(sync_fd, libc::F_GETFD);
                libc::fcntl(sync_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(sync_fd, SYNC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the stand-in process")?;
    drop(theirs);
    Ok((child, ours))
}

/// Waits for the stand-in's one-line answer.
pub fn await_ready(sync: &UnixStream, what: &str) -> Result<Ready> {
    sync.set_read_timeout(Some(READY_TIMEOUT)).ok();
    let mut line = String::new();
    BufReader::new(sync)
        .read_line(&mut line)
        .with_context(|| format!("no answer from the stand-in while {what}"))?;
    if line.is_empty() {
        bail!("the stand-in ended while {what}; see the log (--log) for why");
    }
    let ready: Ready = serde_json::from_str(&line).context("the stand-in's answer is garbled")?;
    if !ready.error.is_empty() {
        bail!("{}", ready.error);
    }
    Ok(ready)
}

/// Writes `pid` to `path` as runc does: whole, by rename.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("nutshell-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the pid file {}", path.display()))
}

/// Creates the container; returns its stand-in (our child).
pub fn create(g: &Globals, root: &Root, args: &CreateArgs) -> Result<Child> {
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: file descriptors cannot be passed into a VM (only 0 works)",
            args.preserve_fds
        );
    }
    let dir = std::fs::canonicalize(&args.bundle)
        .with_context(|| format!("the bundle {} does not exist", args.bundle.display()))?;
    let bundle = Bundle::load(&dir)?;
    let locked = root.create(&args.id)?;
    let mut child = None;
    let r = create_locked(g, &locked, &bundle, args, &mut child);
    if let Err(e) = r {
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The stand-in undoes its own VM before it answers with an error;
        // what a killed one left, delete's clean-up takes.
        crate::verbs::clean_up(root, &args.id, None);
        if let Ok(rec) = locked.load() {
            host_cgroup::remove(&rec.host_cgroups);
        }
        let _ = locked.remove();
        return Err(e);
    }
    child.ok_or_else(|| anyhow!("internal: no stand-in after create"))
}

fn create_locked(
    g: &Globals,
    locked: &Locked,
    bundle: &Bundle,
    args: &CreateArgs,
    child_out: &mut Option<Child>,
) -> Result<()> {
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let stdio = Stdio3::for_terminal(terminal, args.console_socket.as_deref())?;
    let net = bundle.net_plan();
    let (child, sync) = spawn_stand_in(g, std::slice::from_ref(&args.id), &stdio, &net)?;
    let pid = child.id();
    *child_out = Some(child);
    drop(stdio);
    let mut rec = Record {
        id: args.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs(),
        created: now_rfc3339(),
        status: Status::Creating,
        pid,
        pid_start: nutshell_runtime::shim::state::process_start_time(pid).unwrap_or(0),
        annotations: bundle
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        agent_socket: None,
        exit: None,
        host_cgroups: Vec::new(),
    };
    let cgroups_path = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone());
    if let Some(dirs) = cgroups_path.as_deref().and_then(host_cgroup::dirs) {
        // Recorded first, so that delete removes what a failure left.
        rec.host_cgroups = dirs;
        locked.save(&rec)?;
        if let Err(e) = host_cgroup::join(&rec.host_cgroups, pid) {
            tracing::warn!(error = %e, "the VM's host processes stay in the caller's cgroup");
        }
    }
    locked.save(&rec)?;
    let state = rec.oci_state();
    for kind in [HookKind::CreateRuntime, HookKind::Prestart] {
        hooks::run_all(kind, &bundle.hooks(kind), &state)?;
    }
    (&sync)
        .write_all(b"go\n")
        .context("the stand-in went away before the VM was started")?;
    let ready = await_ready(&sync, "the VM started")?;
    rec.status = Status::Created;
    rec.agent_socket = ready.agent_socket;
    locked.save(&rec)?;
    if let Some(p) = &args.pid_file {
        write_pid_file(p, pid)?;
    }
    Ok(())
}
