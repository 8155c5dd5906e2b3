//! The stand-in: the host process that stands for a container's init (or
//! for one exec'd process), `nutshell-runc init`.
//!
//! `create` starts it in the container's network namespace and hands it
//! the caller's stdio; its pid is what `--pid-file` names, so the caller's
//! subreaper (Docker's runc shim, conmon) waits on it as on runc's init.
//! After the hooks have run, `create` says "go" on the sync socket (fd 3);
//! the stand-in boots the VM through the runtime library (`Pod::start`:
//! the same sandbox, network mirroring and filesystems as the shim),
//! creates the container, starts relaying stdio and answers with one JSON
//! line. It then lives until the guest process ends, forwarding signals to
//! it, and exits with its status, or dies by its signal.
//!
//! When the stand-in exits, its VM dies with it (the VMM's
//! `PR_SET_PDEATHSIG`); `delete` removes what is left on the host.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use containerd_shim_protos::api::CreateTaskRequest;
use nix::sys::signal::Signal;
use nutshell_protocol::agent::{CreateContainerRequest, ExecProcessRequest};
use nutshell_runtime::agent::{AgentAddress, AgentClient, DialOptions};
use nutshell_runtime::config::Config;
use nutshell_runtime::mounts::guest_rootfs;
use nutshell_runtime::shim::events::Events;
use nutshell_runtime::shim::pod::{chain, NetworkMode, Pod, PodSpec};
use nutshell_runtime::shim::sizing::size_for;
use nutshell_runtime::shim::stdio::Relays;
use nutshell_runtime::shim::task::PodApi;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::bundle::{Bundle, NetPlan};
use crate::console;
use crate::relay;
use crate::state::{Exit, Record, Root, Status};

/// The stand-in's end of the sync socket.
pub const SYNC_FD: i32 = 3;
/// How long output may sit idle after the process ended before its relay
/// is closed (a background child can hold the pipe forever), and the
/// longest it may flow at all, as the shim's.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// The exit status when the VM died under the process, as the shim's.
const VM_GONE_STATUS: i32 = 255;
/// Signals passed on to the guest process (SIGKILL and SIGSTOP cannot be
/// caught: they act on the stand-in, and `kill` sends them to the guest).
const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTERM,
    Signal::SIGALRM,
    Signal::SIGCONT,
];

/// The stand-in's answer to `create` or `exec`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    /// Empty on success.
    pub error: String,
    pub agent_socket: Option<PathBuf>,
}

/// What an exec stand-in runs.
#[derive(Debug, Clone)]
pub struct ExecJob {
    pub exec_id: String,
    pub process_json: Vec<u8>,
    pub terminal: bool,
}

/// `nutshell-runc init`: never returns.
pub fn main(root: &Root, config: Option<&Path>, id: &str, exec: Option<ExecJob>) -> ! {
    // SAFETY: `create`/`exec` put the sync socket on fd 3 for us alone;
    // nothing else in this process owns it.
    let sync = UnixStream::from(unsafe { OwnedFd::from_raw_fd(SYNC_FD) });
    // The runtime is never dropped: a dropped runtime waits for its
    // blocking threads, and the stdin relay's may sit in a read of a
    // terminal nobody writes to. The process exits from here instead.
    let rt = runtime();
    let outcome = match &rt {
        Ok(rt) => rt.block_on(async {
            match exec {
                None => init(root, config, id, sync).await,
                Some(job) => exec_process(root, id, &job, Some(sync)).await,
            }
        }),
        Err(e) => Err(anyhow!("{e:#}")),
    };
    match outcome {
        Ok(exit) => exit_like(exit),
        Err(e) => {
            // Logged only: the stand-in's stderr is the container's.
            tracing::error!("{e:#}");
            std::process::exit(VM_GONE_STATUS)
        }
    }
}

/// The async runtime of a stand-in or a verb.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Dials the agent of a running container's VM.
pub async fn dial(rec: &Record) -> Result<AgentClient> {
    let socket = rec.agent_socket.as_ref().ok_or_else(|| {
        anyhow!(
            "container {} has no VM yet (it is {})",
            rec.id,
            rec.status()
        )
    })?;
    let opts = DialOptions {
        deadline: Duration::from_secs(10),
        ..DialOptions::default()
    };
    AgentClient::connect(&AgentAddress::hybrid_vsock(socket), &opts, None)
        .await
        .with_context(|| format!("cannot reach the VM of container {}", rec.id))
}

fn reply(sync: &mut UnixStream, ready: &Ready) {
    let line = serde_json::to_string(ready).unwrap_or_default();
    if let Err(e) = writeln!(sync, "{line}") {
        tracing::warn!(error = %e, "cannot answer create");
    }
}

async fn init(root: &Root, config: Option<&Path>, id: &str, mut sync: UnixStream) -> Result<Exit> {
    let go = tokio::task::spawn_blocking({
        let s = sync.try_clone().context("sync socket")?;
        move || {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).map(|_| line)
        }
    })
    .await
    .context("sync")?
    .context("cannot read from create")?;
    if go.trim() != "go" {
        bail!("create went away before the container was set up");
    }
    let (pod, agent, terminal) = match boot(root, config, id).await {
        Ok(v) => v,
        Err(e) => {
            let error = format!("{e:#}");
            reply(
                &mut sync,
                &Ready {
                    error: error.clone(),
                    agent_socket: None,
                },
            );
            bail!(error);
        }
    };
    let signals = Forwarder::install(terminal);
    let relays = relay::start(&agent, id, "", terminal);
    reply(
        &mut sync,
        &Ready {
            error: String::new(),
            agent_socket: Some(pod.sandbox().vm().agent_socket().to_path_buf()),
        },
    );
    drop(sync);
    let started = {
        let (root, id) = (root.clone(), id.to_string());
        move || {
            root.load(&id)
                .map(|r| r.status != Status::Created && r.status != Status::Creating)
                .unwrap_or(false)
        }
    };
    let exit = serve(&agent, id, "", relays, signals, started).await;
    record_exit(root, id, exit);
    // `pod` is dropped with the process: the VM dies with us (see above).
    drop(pod);
    Ok(exit)
}

/// Boots the container's VM and creates the container in it.
async fn boot(
    root: &Root,
    config: Option<&Path>,
    id: &str,
) -> Result<(Arc<Pod>, AgentClient, bool)> {
    let rec = root.load(id)?;
    let bundle = Bundle::load(&rec.bundle)?;
    let config = Config::load(config)?;
    let network = match bundle.net_plan() {
        NetPlan::Host => NetworkMode::Host,
        NetPlan::New => {
            NetworkMode::Mirrored(format!("/proc/{}/ns/net", std::process::id()).into())
        }
        NetPlan::Join(p) => NetworkMode::Mirrored(p),
    };
    let annotations: HashMap<String, String> =
        bundle.spec.annotations().clone().unwrap_or_default();
    let resources = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref());
    let spec = PodSpec {
        key: root.pod_key(id),
        hostname: bundle.hostname(id),
        size: size_for(&config.vm, &annotations, resources),
        shared_pid_ns: false,
        network,
    };
    let pod = Pod::start(&spec, &config, Arc::new(Events::unpublished("oci")))
        .await
        .map_err(|e| anyhow!("cannot start the container's VM: {e}"))?;
    match create_container(&pod, &bundle, id).await {
        Ok(terminal) => {
            let agent = pod.agent().clone();
            Ok((pod, agent, terminal))
        }
        Err(e) => {
            pod.shutdown().await;
            Err(e)
        }
    }
}

async fn create_container(pod: &Arc<Pod>, bundle: &Bundle, id: &str) -> Result<bool> {
    let mut spec = bundle.guest_spec();
    let req = bundle_request(id);
    pod.attach_filesystems(&req, &bundle.dir, &mut spec)
        .await
        .map_err(|e| anyhow!("cannot share the container's files with the VM: {e}"))?;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let spec_json = serde_json::to_vec(&spec).context("cannot encode the spec")?;
    pod.agent()
        .create_container(&CreateContainerRequest {
            container_id: id.to_string(),
            spec_json,
            rootfs: guest_rootfs(id).display().to_string(),
            stdin: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("the guest did not create the container: {}", chain(&e)))?;
    Ok(terminal)
}

/// The request `attach_filesystems` reads: only the id, since a bundle's
/// rootfs is already a directory (no containerd mounts to make).
fn bundle_request(id: &str) -> CreateTaskRequest {
    CreateTaskRequest {
        id: id.to_string(),
        ..Default::default()
    }
}

/// Runs process `exec_id` of a running container and relays it; with
/// `sync`, answers the `exec --detach` that started this stand-in.
pub async fn exec_process(
    root: &Root,
    id: &str,
    job: &ExecJob,
    mut sync: Option<UnixStream>,
) -> Result<Exit> {
    let started = async {
        let rec = root.load(id)?;
        if rec.status() != Status::Running {
            bail!(
                "cannot exec in container {id}: it is {}, not running",
                rec.status()
            );
        }
        let agent = dial(&rec).await?;
        agent
            .exec_process(&ExecProcessRequest {
                container_id: id.to_string(),
                exec_id: job.exec_id.clone(),
                process_json: job.process_json.clone(),
                stdin: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("the guest did not start the process: {}", chain(&e)))?;
        Ok((agent, rec.agent_socket))
    }
    .await;
    let (agent, socket) = match started {
        Ok(v) => v,
        Err(e) => {
            if let Some(s) = sync.as_mut() {
                reply(
                    s,
                    &Ready {
                        error: format!("{e:#}"),
                        agent_socket: None,
                    },
                );
            }
            return Err(e);
        }
    };
    let signals = Forwarder::install(job.terminal);
    let relays = relay::start(&agent, id, &job.exec_id, job.terminal);
    if let Some(mut s) = sync {
        reply(
            &mut s,
            &Ready {
                error: String::new(),
                agent_socket: socket,
            },
        );
    }
    Ok(serve(&agent, id, &job.exec_id, relays, signals, || true).await)
}

/// The signals a stand-in passes on. Installed before the stand-in
/// answers, so that none sent once the caller knows its pid is lost; with
/// a terminal, the terminal is taken first, so its size changes come too.
struct Forwarder {
    rx: tokio::sync::mpsc::UnboundedReceiver<Signal>,
    terminal: bool,
}

impl Forwarder {
    fn install(terminal: bool) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut kinds: Vec<Signal> = FORWARDED.to_vec();
        if terminal {
            kinds.push(Signal::SIGWINCH);
            if let Err(e) = console::take_terminal(std::io::stdin().as_fd()) {
                tracing::warn!(error = %e, "the terminal cannot be made the stand-in's");
            }
        }
        for sig in kinds {
            match signal(SignalKind::from_raw(sig as i32)) {
                Ok(mut s) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while s.recv().await.is_some() {
                            if tx.send(sig).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!(signal = %sig, error = %e, "cannot forward this signal"),
            }
        }
        Self { rx, terminal }
    }
}

/// Waits for the guest process, forwarding signals (before `started()`,
/// a signal ends the stand-in itself, as it would end runc's waiting init)
/// and window-size changes; then lets the output drain.
async fn serve(
    agent: &AgentClient,
    cid: &str,
    exec_id: &str,
    mut relays: Relays,
    mut signals: Forwarder,
    started: impl Fn() -> bool,
) -> Exit {
    if signals.terminal {
        resize(agent, cid, exec_id).await;
    }
    let wait = agent.wait_process(cid, exec_id);
    tokio::pin!(wait);
    let exit = loop {
        tokio::select! {
            r = &mut wait => break match r {
                Ok(w) => Exit { status: w.exit_status, signal: w.signal },
                Err(e) => {
                    tracing::error!("the container's VM went away: {}", chain(&e));
                    Exit { status: VM_GONE_STATUS, signal: 0 }
                }
            },
            Some(sig) = signals.rx.recv() => {
                if sig == Signal::SIGWINCH {
                    resize(agent, cid, exec_id).await;
                } else if !started() {
                    if sig == Signal::SIGCONT {
                        continue;
                    }
                    exit_like(Exit { status: 128 + sig as i32, signal: sig as i32 });
                } else if let Err(e) = agent.signal_process(cid, exec_id, sig as u32, false).await {
                    tracing::warn!(signal = %sig, error = %chain(&e), "cannot pass the signal on");
                }
            }
        }
    };
    relays.drain(DRAIN_IDLE, DRAIN_LIMIT).await;
    exit
}

async fn resize(agent: &AgentClient, cid: &str, exec_id: &str) {
    if let Some((rows, cols)) = console::window_size(std::io::stdin().as_fd()) {
        if let Err(e) = agent
            .resize_terminal(cid, exec_id, rows.into(), cols.into())
            .await
        {
            tracing::debug!(error = %chain(&e), "ResizeTerminal");
        }
    }
}

/// Records how the container's init ended, for `state` and `delete`.
fn record_exit(root: &Root, id: &str, exit: Exit) {
    let r = root.lock(id).and_then(|l| {
        let mut rec = l.load()?;
        rec.status = Status::Stopped;
        rec.exit = Some(exit);
        l.save(&rec)
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot record the container's exit");
    }
}

/// Ends this process as the guest process ended: the same exit code, or
/// death by the same signal, so that the caller reports it.
pub fn exit_like(exit: Exit) -> ! {
    if exit.signal > 0 {
        if let Ok(sig) = Signal::try_from(exit.signal) {
            // SAFETY: restoring the default disposition installs no handler.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(sig);
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(sig);
        }
    }
    std::process::exit(exit.status.clamp(0, 255))
}
