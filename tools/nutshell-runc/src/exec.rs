//! `exec`: a new process in a running container. With `--detach` (how
//! Docker's runc shim and conmon call it) a stand-in of its own runs it and
//! its pid goes to `--pid-file`; without, this process is the stand-in.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{Process, User};

use crate::bundle::{Bundle, NetPlan};
use crate::create::{await_ready, spawn_stand_in, write_pid_file, Stdio3};
use crate::standin::{exec_process, exit_like, runtime, ExecJob};
use crate::state::{Root, Status};
use crate::Globals;

#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// A JSON file with the OCI process to run (instead of arguments).
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Where to write the stand-in's pid (with --detach).
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A Unix socket to send the terminal's master to.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Start the process and return; a stand-in waits for it.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// The working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables to add (NAME=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// The user: UID[:GID].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Accepted for runc's callers; the guest applies the container's own.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Extra fds: none can be passed into a VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    /// The command and its arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The process to run, as JSON, and whether it has a terminal.
fn process_json(root: &Root, args: &ExecArgs) -> Result<(Vec<u8>, bool)> {
    if let Some(p) = &args.process {
        let text = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        let process: Process = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not an OCI process JSON object", p.display()))?;
        return Ok((text, process.terminal().unwrap_or(false)));
    }
    if args.command.is_empty() {
        bail!("exec needs a command, or --process FILE");
    }
    let rec = root.load(&args.id)?;
    let bundle = Bundle::load(&rec.bundle)?;
    let mut process = bundle.spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    process.set_console_size(None);
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.into());
    }
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(u) = &args.user {
        process.set_user(parse_user(u)?);
    }
    Ok((serde_json::to_vec(&process)?, args.tty))
}

fn parse_user(s: &str) -> Result<User> {
    let (uid, gid) = s.split_once(':').unwrap_or((s, "0"));
    let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
        bail!("--user {s:?}: expected UID[:GID] as numbers");
    };
    let mut u = User::default();
    u.set_uid(uid);
    u.set_gid(gid);
    Ok(u)
}

/// Runs `exec`; returns only in `--detach` mode.
pub fn exec(g: &Globals, root: &Root, args: &ExecArgs) -> Result<()> {
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: file descriptors cannot be passed into a VM",
            args.preserve_fds
        );
    }
    let rec = root.load(&args.id)?;
    if rec.status() != Status::Running {
        bail!(
            "cannot exec in container {}: it is {}, not running",
            args.id,
            rec.status()
        );
    }
    let (process_json, terminal) = process_json(root, args)?;
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    if !args.detach {
        let job = ExecJob {
            exec_id,
            process_json,
            terminal: terminal && args.console_socket.is_none(),
        };
        // Not dropped before the exit: see standin::main.
        let rt = runtime()?;
        let exit = rt.block_on(exec_process(root, &args.id, &job, None))?;
        exit_like(exit);
    }
    // The detached stand-in reads the process from a file beside the state.
    let job_file = root
        .container_dir(&args.id)?
        .join(format!("{exec_id}.json"));
    std::fs::write(&job_file, &process_json)
        .with_context(|| format!("cannot write {}", job_file.display()))?;
    let stdio = Stdio3::for_terminal(terminal, args.console_socket.as_deref())?;
    let mut stand_in_args = vec![
        "--exec-id".to_string(),
        exec_id,
        "--process".into(),
        job_file.display().to_string(),
    ];
    if terminal {
        stand_in_args.push("--tty".into());
    }
    stand_in_args.push(args.id.clone());
    let spawned = spawn_stand_in(g, &stand_in_args, &stdio, &NetPlan::Host);
    let (mut child, sync) = spawned?;
    drop(stdio);
    match await_ready(&sync, "the process started") {
        Ok(_) => {}
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    if let Some(p) = &args.pid_file {
        write_pid_file(p, child.id())?;
    }
    Ok(())
}
