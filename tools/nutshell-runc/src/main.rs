//! nutshell-runc: runc's command line, each container in a microVM of its
//! own. Docker (`daemon.json` `runtimes`) and Podman (`--runtime`) drive it
//! as they drive runc; see the crate's README for what maps to what.

mod bundle;
mod console;
mod create;
mod exec;
mod hooks;
mod host_cgroup;
mod log;
mod relay;
mod standin;
mod state;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::create::CreateArgs;
use crate::exec::ExecArgs;
use crate::standin::{exit_like, ExecJob};
use crate::state::{Exit, Root};

/// runc's global flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Globals {
    /// Where containers' state lives; two roots never share a container.
    #[arg(long, global = true, default_value_os_t = verbs::default_root())]
    pub root: PathBuf,
    /// Log file (default: stderr). Errors that end a verb are logged too.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// `text` or `json` (logrus's keys, as runc's callers parse them).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: log::Format,
    /// Debug logging.
    #[arg(long, global = true)]
    pub debug: bool,
    /// The nutshell config file (default: $NUTSHELL_CONFIG, else
    /// /etc/nutshell/config.toml, else the embedded defaults).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Accepted for runc's callers. The container's cgroup is in the guest,
    /// which has no systemd: cgroupsPath is used as a plain path there.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc's callers (`true`, `false`, `auto`); nutshell-runc
    /// needs root either way (it starts VMs and mounts).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
}

impl Globals {
    /// The flags a stand-in is started with, so it logs where we do.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--root".into(), self.root.display().to_string()];
        if let Some(l) = &self.log {
            a.extend(["--log".into(), l.display().to_string()]);
        }
        a.extend([
            "--log-format".into(),
            match self.log_format {
                log::Format::Text => "text".into(),
                log::Format::Json => "json".into(),
            },
        ]);
        if self.debug {
            a.push("--debug".into());
        }
        if let Some(c) = &self.config {
            a.extend(["--config".into(), c.display().to_string()]);
        }
        a
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "nutshell-runc",
    version,
    about = "runc's command line; each container runs in a microVM of its own"
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Create a container from a bundle; its process waits for `start`.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Create and start a container; without --detach, wait for it and
    /// delete it.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(long, short = 'd')]
        detach: bool,
        /// Keep the container's state after it exits.
        #[arg(long)]
        keep: bool,
    },
    /// Print a container's OCI state.
    State { id: String },
    /// Send a signal (default TERM) to a container.
    Kill {
        #[arg(long, short = 'a')]
        all: bool,
        id: String,
        #[arg(default_value = "TERM")]
        signal: String,
    },
    /// Remove a stopped container (--force: any container).
    Delete {
        #[arg(long, short = 'f')]
        force: bool,
        id: String,
    },
    /// Run a new process in a running container.
    Exec(ExecArgs),
    /// The container's processes.
    Ps {
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        id: String,
        /// ps options (ignored: the processes are in the guest).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Every container under --root.
    #[command(alias = "ls")]
    List {
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a container's resource limits.
    Update {
        /// An OCI LinuxResources JSON file, or - for stdin.
        #[arg(long, short = 'r')]
        resources: PathBuf,
        id: String,
    },
    /// A container's stats, once (--stats) or every --interval.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s", value_parser = parse_interval)]
        interval: Duration,
        id: String,
    },
    /// What this runtime supports (OCI features JSON).
    Features,
    /// The stand-in process (started by create and exec).
    #[command(hide = true)]
    Init {
        #[arg(long)]
        exec_id: Option<String>,
        #[arg(long)]
        process: Option<PathBuf>,
        #[arg(long)]
        tty: bool,
        id: String,
    },
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("bad interval {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad interval {s:?} (e.g. 5s, 500ms)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let g = &cli.globals;
    if let Err(e) = log::init(g.log.as_deref(), g.log_format, g.debug) {
        eprintln!("nutshell-runc: cannot open the log: {e}");
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::fatal(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let g = &cli.globals;
    let root = Root::open(&g.root)?;
    match &cli.verb {
        Verb::Create(a) => create::create(g, &root, a).map(drop),
        Verb::Start { id } => verbs::start(&root, id),
        Verb::Run {
            create,
            detach,
            keep,
        } => run_verb(g, &root, create, *detach, *keep),
        Verb::State { id } => verbs::state(&root, id),
        Verb::Kill { all, id, signal } => {
            verbs::kill_container(&root, id, verbs::parse_signal(signal)?, *all)
        }
        Verb::Delete { force, id } => verbs::delete(&root, id, *force),
        Verb::Exec(a) => exec::exec(g, &root, a),
        Verb::Ps { format, id, .. } => verbs::ps(&root, id, format == "json"),
        Verb::List { format, quiet } => verbs::list(&root, format == "json", *quiet),
        Verb::Pause { id } => verbs::pause(&root, id, true),
        Verb::Resume { id } => verbs::pause(&root, id, false),
        Verb::Update { resources, id } => verbs::update(&root, id, resources),
        Verb::Events {
            stats,
            interval,
            id,
        } => verbs::events(&root, id, *stats, *interval),
        Verb::Features => verbs::features(),
        Verb::Init {
            exec_id,
            process,
            tty,
            id,
        } => {
            let job = match (exec_id, process) {
                (Some(exec_id), Some(p)) => {
                    let process_json =
                        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                    let _ = std::fs::remove_file(p);
                    Some(ExecJob {
                        exec_id: exec_id.clone(),
                        process_json,
                        terminal: *tty,
                    })
                }
                _ => None,
            };
            standin::main(&root, g.config.as_deref(), id, job)
        }
    }
}

/// runc's `run`: create, start, and (in the foreground) wait and delete.
fn run_verb(g: &Globals, root: &Root, a: &CreateArgs, detach: bool, keep: bool) -> Result<()> {
    let mut child = create::create(g, root, a)?;
    if let Err(e) = verbs::start(root, &a.id) {
        let _ = verbs::delete(root, &a.id, true);
        return Err(e);
    }
    if detach {
        return Ok(());
    }
    let status = child.wait().context("cannot wait for the container")?;
    if !keep {
        verbs::delete(root, &a.id, true)?;
    }
    use std::os::unix::process::ExitStatusExt;
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => Exit {
            status: c,
            signal: 0,
        },
        (_, Some(s)) => Exit {
            status: 128 + s,
            signal: 0,
        },
        _ => Exit {
            status: 1,
            signal: 0,
        },
    };
    exit_like(exit)
}
