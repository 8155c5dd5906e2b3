//! `nutshell run`: one container in its own microVM, without containerd.
//!
//! The VM is booted through the runtime library (`Sandbox::start`), the
//! rootfs reaches the guest over virtio-fs (a bind mount into the run's
//! shared directory, see [`workdir`]), the agent runs the command as a
//! container, its output is copied to ours as it comes, and the VM is shut
//! down and every host trace of the run removed before we exit with the
//! container's status.
//!
//! Exit status: the container's (128 + signal when a signal ended it); 125
//! when nutshell itself failed (the message says why); 127 when the rootfs
//! does not hold the command.

mod backend;
mod output;
mod spec;
mod workdir;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nutshell_protocol::agent::CreateContainerRequest;
use nutshell_runtime::agent::{AgentClient, AgentError, DialOptions};
use nutshell_runtime::config::Backend;
use nutshell_runtime::config::Config;
use nutshell_runtime::hypervisor::{
    sanitize_line, Accel, Hypervisor, RunningVm, VmConfig, GUEST_ASSETS_DIR,
};
use nutshell_runtime::pool::claim::claim_or_cold;
use nutshell_runtime::sandbox::{Sandbox, SandboxError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use self::backend::Watched;
use self::output::{Stream, Timing};
use self::spec::{CommandNotFound, Container};
use self::workdir::RunDir;

/// Exit status when nutshell itself failed.
const FAILED: u8 = 125;
/// Exit status when the rootfs lacks the command (as a shell's).
const NOT_FOUND: u8 = 127;
/// From the VM's start to its agent's first answer. A TCG boot takes 1–2 s
/// on an idle machine; a loaded one (parallel tests, builds) much more.
const AGENT_DEADLINE: Duration = Duration::from_secs(60);
/// How long the guest gets to power off after DestroySandbox.
const POWEROFF_GRACE: Duration = Duration::from_secs(2);
/// After a forwarded signal, how long the container gets before it is
/// killed (a shell as PID 1 ignores SIGINT and SIGTERM).
const KILL_AFTER: Duration = Duration::from_secs(10);
/// After the container exited, how long its output may take to arrive.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long an interrupted start waits for the VM to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(10);
/// Most of the console log `--debug-console` prints.
const CONSOLE_DUMP_BYTES: u64 = 1 << 20;
/// The container's (and the guest's) hostname.
const HOSTNAME: &str = "nutshell";

/// `nutshell run`'s options.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The VM monitor: `qemu`, `vmm` (nutshell's own), or `auto` (the own
    /// VMM where KVM can run Linux, else QEMU on TCG).
    #[arg(long, default_value = "auto")]
    pub backend: Backend,
    /// Guest kernel (uncompressed vmlinux).
    #[arg(long, default_value_t = format!("{GUEST_ASSETS_DIR}/vmlinux"))]
    pub kernel: String,
    /// Guest initramfs (the agent as /init).
    #[arg(long, default_value_t = format!("{GUEST_ASSETS_DIR}/initramfs.cpio.gz"))]
    pub initrd: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=1048576))]
    pub memory_mib: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub vcpus: u32,
    /// Directory holding the container's files (an unpacked image).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Mount the rootfs read-only (in the guest and on the host).
    #[arg(long)]
    pub readonly: bool,
    /// Set an environment variable in the container (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Print milestones to stderr, one line each:
    /// `timing: <vm-launched|agent-ready|container-started|container-exited|vm-stopped> <ms> ms`,
    /// counted from the start of the VM's launch.
    #[arg(long)]
    pub timing: bool,
    /// Verbose guest kernel console, printed to stderr when the VM stops.
    #[arg(long)]
    pub debug_console: bool,
    /// Boot a VM even when the warm pool (`nutshell pool`) has one. By
    /// default a VM of the run's size is claimed from the pool that the
    /// nutshell config's `[pool]` names, when it runs.
    #[arg(long)]
    pub cold: bool,
    /// The command to run in the container, and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs the command; never returns early without cleaning up.
pub fn main(args: RunArgs) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(&args)),
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    ExitCode::from(match result {
        Ok(status) => status,
        Err(e) => {
            eprintln!("nutshell run: {e:#}");
            if e.downcast_ref::<CommandNotFound>().is_some() {
                NOT_FOUND
            } else if let Some(Interrupted(sig)) = e.downcast_ref::<Interrupted>() {
                128u8.saturating_add(*sig as u8)
            } else {
                FAILED
            }
        }
    })
}

/// A signal stopped the run before the container started.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0} while the VM was starting; the VM was stopped")]
struct Interrupted(Signal);

async fn run(args: &RunArgs) -> Result<u8> {
    let id = format!("run-{}", std::process::id());
    let rootfs = preflight(args)?;
    let hypervisor = backend::select(args.backend).await?;
    let mut signals = Signals::new()?;

    RunDir::clean_leftover(&id)?;
    let mut timing = Timing::new(args.timing);
    timing.restart();
    let claimed = if args.cold {
        None
    } else {
        claim_warm(&id, args, hypervisor.name()).await
    };
    let dir = RunDir::create(&id)?;
    let container = Container {
        args: args.command.clone(),
        env: args.env.clone(),
        hostname: HOSTNAME.into(),
        guest_rootfs: dir.mount_rootfs(&rootfs, args.readonly)?,
        readonly: args.readonly,
    };
    let vm = vm_config(&id, args, dir.path());

    let watched = Watched::new(hypervisor.as_ref());
    let outcome = boot_and_run(
        &id,
        &container,
        (&watched, claimed),
        &vm,
        &timing,
        &mut signals,
    )
    .await;
    if args.debug_console {
        dump_console(&dir.path().join("console.log"));
    }
    if let Err(e) = dir.remove() {
        eprintln!("nutshell run: warning: {e:#}");
    }
    outcome
}

/// Checks what can be checked before anything is started; returns the
/// rootfs as an absolute path.
fn preflight(args: &RunArgs) -> Result<PathBuf> {
    spec::check_env(&args.env)?;
    for (what, flag, path) in [
        ("kernel", "--kernel", &args.kernel),
        ("initramfs", "--initrd", &args.initrd),
    ] {
        if !Path::new(path).is_file() {
            bail!(
                "the guest {what} {path} does not exist: build and install the guest image with guest-image/build.sh --install (tools/setup.sh does it), or pass {flag} PATH"
            );
        }
    }
    let path_var = Container {
        args: Vec::new(),
        env: args.env.clone(),
        hostname: String::new(),
        guest_rootfs: PathBuf::new(),
        readonly: false,
    }
    .path_var();
    spec::check_rootfs(&args.rootfs, &args.command[0], &path_var)?;
    let rootfs = std::fs::canonicalize(&args.rootfs)
        .with_context(|| format!("cannot resolve the rootfs {}", args.rootfs.display()))?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "root is needed: the run bind-mounts the rootfs into the directory shared with the VM and starts virtiofsd; run it as root (e.g. with sudo)"
        );
    }
    Ok(rootfs)
}

/// How the VM's start ended.
enum Started {
    /// The agent answered; `Some` when a signal came meanwhile.
    Up(Sandbox, Option<Signal>),
    Failed(SandboxError),
    /// A signal came; the start was abandoned once the launch returned.
    Interrupted(Signal, backend::Launched),
}

/// The VM the run's own would be, from the warm pool the nutshell config
/// names, when it has one; `None` (logged at debug level) boots cold.
async fn claim_warm(id: &str, args: &RunArgs, backend: &str) -> Option<RunningVm> {
    let config = match Config::load(None) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("no warm VM, booting cold: {e}");
            return None;
        }
    };
    let vm = vm_config(id, args, &workdir::run_dir(id));
    claim_or_cold(&config.pool, &vm, backend, None)
        .await
        .map(|c| c.vm)
}

/// The run's VM, its state in `dir`.
fn vm_config(id: &str, args: &RunArgs, dir: &Path) -> VmConfig {
    let mut vm = VmConfig::new(id, dir);
    vm.kernel = PathBuf::from(&args.kernel);
    vm.initrd = PathBuf::from(&args.initrd);
    vm.vcpus = args.vcpus;
    vm.memory_mib = args.memory_mib;
    vm.shared_dir = Some(dir.join("shared"));
    vm.accel = Accel::Auto;
    vm.debug_console = args.debug_console;
    vm
}

/// Boots the VM (or takes the claimed one), runs the container, shuts the
/// VM down. Returns the container's exit status.
async fn boot_and_run(
    id: &str,
    container: &Container,
    (hypervisor, claimed): (&Watched<'_>, Option<RunningVm>),
    vm: &VmConfig,
    timing: &Timing,
    signals: &mut Signals,
) -> Result<u8> {
    let dial = DialOptions {
        deadline: AGENT_DEADLINE,
        ..DialOptions::default()
    };
    let attached = match claimed {
        Some(warm) => {
            timing.mark("vm-launched");
            match Sandbox::attach(warm, &dial).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "the claimed warm VM's agent did not answer; booting cold");
                    None
                }
            }
        }
        None => None,
    };
    let started = match attached {
        Some(s) => Started::Up(s, None),
        None => start(hypervisor, vm, &dial, timing, signals).await,
    };
    let (sandbox, signalled) = match started {
        Started::Up(sandbox, signalled) => (sandbox, signalled),
        Started::Failed(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the VM did not come up (backend {})",
                hypervisor.name()
            )))
        }
        Started::Interrupted(sig, launched) => {
            // Dropping the start dropped the VM, which kills it: wait until
            // its processes are reaped, so that the clean-up after us finds
            // nothing in use.
            if let Some(end) = launched.end {
                let _ = timeout(REAP_LIMIT, end.wait()).await;
            }
            return Err(Interrupted(sig).into());
        }
    };
    timing.mark("agent-ready");
    let result = match signalled {
        Some(sig) => Err(Interrupted(sig).into()),
        None => run_container(id, container, &sandbox, timing, signals).await,
    };
    let exit = sandbox.shutdown(POWEROFF_GRACE).await;
    timing.mark("vm-stopped");
    tracing::debug!(%exit, "the VM ended");
    result
}

/// `Sandbox::start`, watching for signals meanwhile. A signal abandons the
/// start only once the VM's launch has returned, so that the VM is always
/// either not started or handed to its supervisor (which kills it when
/// dropped).
async fn start(
    hypervisor: &Watched<'_>,
    vm: &VmConfig,
    dial: &DialOptions,
    timing: &Timing,
    signals: &mut Signals,
) -> Started {
    let start = Sandbox::start(hypervisor, vm, dial);
    tokio::pin!(start);
    let mut signalled = None;
    let mut marked = false;
    loop {
        tokio::select! {
            r = &mut start => {
                if !marked {
                    if let Some(l) = hypervisor.try_launched().filter(|l| l.end.is_some()) {
                        timing.mark_at("vm-launched", l.at);
                    }
                }
                return match r {
                    Ok(s) => Started::Up(s, signalled),
                    Err(e) => Started::Failed(e),
                };
            }
            l = hypervisor.launched(), if !marked => {
                marked = true;
                // Only a launch that worked is a milestone.
                if l.end.is_some() {
                    timing.mark_at("vm-launched", l.at);
                }
            }
            sig = signals.next(), if signalled.is_none() => signalled = Some(sig),
            l = hypervisor.launched(), if signalled.is_some() => {
                if let Some(sig) = signalled {
                    return Started::Interrupted(sig, l);
                }
            }
        }
    }
}

/// Sets the sandbox up, runs the container with its output copied to ours,
/// and waits for it, passing signals on.
async fn run_container(
    id: &str,
    container: &Container,
    sandbox: &Sandbox,
    timing: &Timing,
    signals: &mut Signals,
) -> Result<u8> {
    let agent = sandbox.agent();
    let step = std::time::Instant::now();
    let took = |call: &str| {
        tracing::debug!(
            call,
            ms = step.elapsed().as_millis() as u64,
            "agent call done"
        )
    };
    sandbox
        .set_up(id, HOSTNAME, false)
        .await
        .map_err(|e| refused("set the sandbox up", e))?;
    took("SetTime and CreateSandbox");
    agent
        .create_container(&CreateContainerRequest {
            container_id: id.into(),
            spec_json: container.spec_json()?,
            rootfs: container.guest_rootfs.display().to_string(),
            stdin: false,
            ..Default::default()
        })
        .await
        .map_err(|e| refused("create the container", e))?;
    took("CreateContainer");
    // Reading before the start: nothing written early can be missed.
    let copies = [Stream::Stdout, Stream::Stderr]
        .map(|s| tokio::spawn(output::copy(agent.clone(), id.to_string(), s)));
    agent
        .start_container(id)
        .await
        .map_err(|e| refused("start the container", e))?;
    took("StartContainer");
    timing.mark("container-started");

    let wait = agent.wait_process(id, "");
    tokio::pin!(wait);
    // A forwarded signal arms the kill; a second signal fires it at once.
    let mut kill_at: Option<Instant> = None;
    let mut forwarded = false;
    let waited = loop {
        tokio::select! {
            r = &mut wait => break r,
            sig = signals.next() => {
                if forwarded {
                    kill_at = Some(Instant::now());
                } else {
                    forwarded = true;
                    eprintln!(
                        "nutshell run: {sig} passed to the container; it is killed in {} s or at the next signal",
                        KILL_AFTER.as_secs()
                    );
                    kill_at = Some(Instant::now() + KILL_AFTER);
                    send(agent, id, sig, false).await;
                }
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                send(agent, id, Signal::SIGKILL, true).await;
            }
        }
    };
    let waited = waited.context("waiting for the container failed")?;
    timing.mark("container-exited");

    let drained_by = Instant::now() + DRAIN_LIMIT;
    for copy in copies {
        match timeout_at(drained_by, copy).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("nutshell run: warning: the container's output was cut: {e}"),
            Ok(Err(e)) => eprintln!("nutshell run: warning: copying the container's output failed: {e}"),
            Err(_) => eprintln!(
                "nutshell run: warning: the container's output did not end within {} s of its exit; the rest is dropped",
                DRAIN_LIMIT.as_secs()
            ),
        }
    }
    // The guest reports shell-style statuses (128 + signal); anything else
    // is a misbehaving guest.
    Ok(u8::try_from(waited.exit_status).unwrap_or(FAILED))
}

/// An agent call's failure as a sentence: the guest's own message when it
/// refused, else the whole error (a VM that died quotes its console).
fn refused(what: &str, e: AgentError) -> anyhow::Error {
    match e.rpc_message() {
        Some(m) => anyhow::anyhow!("the guest could not {what}: {}", sanitize_line(m)),
        None => anyhow::Error::new(e).context(format!("cannot {what}")),
    }
}

async fn send(agent: &AgentClient, id: &str, sig: Signal, all: bool) {
    if let Err(e) = agent.signal_process(id, "", sig as u32, all).await {
        eprintln!("nutshell run: warning: cannot send {sig} to the container: {e}");
    }
}

/// Prints the end of the guest console log to stderr, line by line (the
/// guest wrote it: every line is sanitised).
fn dump_console(path: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        eprintln!("nutshell run: no console log at {}", path.display());
        return;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(CONSOLE_DUMP_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return;
    }
    eprintln!("nutshell run: guest console ({} bytes):", len);
    for line in String::from_utf8_lossy(&buf).lines() {
        eprintln!("console: {}", sanitize_line(line.trim_end_matches('\r')));
    }
}

/// The signals that stop a run: SIGINT (Ctrl-C), SIGTERM, SIGHUP.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        let on = |kind| signal(kind).context("cannot install a signal handler");
        Ok(Self {
            int: on(SignalKind::interrupt())?,
            term: on(SignalKind::terminate())?,
            hup: on(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}
