//! A pod: one VM with its agent, the pod's state directory and its shared
//! directory. Created with the pod's first container (the CRI sandbox, or a
//! lone `ctr run` container) and torn down when that container is deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::agent::{AgentClient, DialOptions};
use crate::config::Config;
use crate::hypervisor::select::select_backend;
use crate::hypervisor::{Hypervisor, Nic, VmConfig};
use crate::network::{self, Mac, NetworkRecord, Plumbed, PodNetwork, TapSource};
use crate::pool::claim::claim_or_cold;
use crate::pool::wire::NetworkClaim;
use crate::sandbox::Sandbox;

use super::events::Events;
use super::sizing::VmSize;
use super::state::{check_id, record_processes, PodKey, PodRecord};
use super::ShimError;
use crate::mounts::{prepare_shared_dir, remove_tree, unmount_below};

/// How long the guest gets to power off after DestroySandbox before QEMU
/// is told to stop. Every container is gone by then and their files live
/// on the host, so nothing in the guest is worth waiting longer for.
const POWEROFF_GRACE: Duration = Duration::from_secs(1);

/// What a pod is started with.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Whose pod it is; `key.pod` is its id.
    pub key: PodKey,
    pub hostname: String,
    pub size: VmSize,
    /// Containers of the pod share one pid namespace.
    pub shared_pid_ns: bool,
    pub network: NetworkMode,
}

/// The network the pod's first container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// No network namespace in the spec: the host's network (a
    /// `hostNetwork` pod, `ctr run --net-host`). A VM cannot share it; the
    /// pod gets the guest's own, with loopback only.
    Host,
    /// A new, empty namespace (`ctr run` without options): as with runc,
    /// loopback only, made in the guest.
    Private,
    /// An existing namespace (CNI's, an engine's): mirrored into the VM.
    Mirrored(PathBuf),
}

impl NetworkMode {
    /// The mode of a container's spec.
    pub fn of(spec: &oci_spec::runtime::Spec) -> Self {
        let ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|nss| {
                nss.iter()
                    .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
            });
        match ns {
            None => Self::Host,
            Some(n) => match n.path() {
                Some(p) => Self::Mirrored(p.clone()),
                None => Self::Private,
            },
        }
    }
}

/// Points a container at the pod's network in the guest: a network
/// namespace given by path (CNI's for the pod's first container,
/// `/proc/<pid>/ns/net` of the sandbox for the others) is the pod's, which
/// is the guest's own, so the entry goes and the container stays in it.
/// The agent never sees the host path. An entry without a path (a new,
/// private namespace) stays.
pub fn join_pod_network(spec: &mut oci_spec::runtime::Spec) {
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let Some(nss) = linux.namespaces_mut() else {
        return;
    };
    nss.retain(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network || n.path().is_none());
}

/// The log line of a host-network pod; the README quotes it.
pub const HOST_NETWORK_WARNING: &str = "the pod asks for the host's network, which a VM cannot share: its containers get an isolated network with loopback only";

/// The pod's mirrored network: where it came from and what the guest was
/// last told.
#[derive(Debug)]
struct Mirror {
    record: NetworkRecord,
    sent: PodNetwork,
    /// A claimed warm VM's NIC MACs, which the guest's NICs carry until
    /// the first UpdateNetwork gives them the veths'; empty after a cold
    /// boot.
    warm_macs: Vec<Mac>,
}

/// A running pod.
#[derive(Debug)]
pub struct Pod {
    pub id: String,
    key: PodKey,
    sandbox: Sandbox,
    dir: PathBuf,
    shared: PathBuf,
    oom_watch: JoinHandle<()>,
    mirror: tokio::sync::Mutex<Option<Mirror>>,
}

impl Pod {
    /// Prepares the state and shared directories, boots the VM, waits for
    /// its agent and sets the sandbox up. On any failure, what was made is
    /// undone before the error returns.
    pub async fn start(
        spec: &PodSpec,
        config: &Config,
        events: Arc<Events>,
    ) -> Result<Arc<Self>, ShimError> {
        check_id(&spec.key.pod).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        check_assets(config)?;
        let hypervisor = select_backend(config.vm.backend).await.map_err(|e| {
            ShimError::FailedPrecondition(format!(
                "vm.backend = \"{}\" in {}: {}",
                config.vm.backend,
                config.source_name(),
                chain(&e)
            ))
        })?;
        let dir = spec.key.dir();
        let shared = spec.key.shared_dir();
        let vm = config.vm_config(
            &spec.key.pod,
            &dir,
            &shared,
            spec.size.vcpus,
            spec.size.memory_mib,
        );
        let network = read_network(spec).await?;
        let dial = DialOptions {
            deadline: config.agent.dial_timeout,
            ..DialOptions::default()
        };
        let warm = claim_warm(
            spec,
            &vm,
            config,
            hypervisor.as_ref(),
            network.as_ref(),
            &dial,
        )
        .await;
        let prep = {
            let (dir, shared, key) = (dir.clone(), shared.clone(), spec.key.clone());
            tokio::task::spawn_blocking(move || -> Result<(), ShimError> {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| {
                        ShimError::Internal(format!("cannot create {}: {e}", dir.display()))
                    })?;
                key.save_owner().map_err(ShimError::from_err)?;
                prepare_shared_dir(&shared).map_err(ShimError::from_err)
            })
            .await
            .map_err(|e| ShimError::Internal(e.to_string()))?
        };
        if let Err(e) = prep {
            undo_dirs(&dir).await;
            return Err(e);
        }
        let (attached, warm_macs) = match warm {
            Some((sandbox, macs)) => (Some(sandbox), macs),
            None => (None, Vec::new()),
        };
        let source = match attached {
            Some(_) => TapSource::Moved,
            None => TapSource::Make,
        };
        let plumbed = match plumb_network(network, &dir, source).await {
            Ok(p) => p,
            Err(e) => {
                undo_dirs(&dir).await;
                return Err(e);
            }
        };
        let (mirror, nics) = match plumbed {
            Some((net, p)) => {
                let nics = p
                    .taps
                    .into_iter()
                    .map(|(mac, fd)| Nic {
                        mac,
                        tap: Arc::new(fd),
                    })
                    .collect();
                let mirror = Mirror {
                    record: p.record,
                    sent: net,
                    warm_macs,
                };
                (Some(mirror), nics)
            }
            None => (None, Vec::new()),
        };
        let booted = Self::boot(
            spec,
            hypervisor.as_ref(),
            (vm, nics),
            mirror.as_ref(),
            (attached, &dial),
        )
        .await;
        match booted {
            Ok(sandbox) => {
                let agent = sandbox.agent().clone();
                let oom_watch = tokio::spawn(watch_oom(agent, events));
                Ok(Arc::new(Self {
                    id: spec.key.pod.clone(),
                    key: spec.key.clone(),
                    sandbox,
                    dir,
                    shared,
                    oom_watch,
                    mirror: tokio::sync::Mutex::new(mirror),
                }))
            }
            Err(e) => {
                if let Some(m) = &mirror {
                    unplumb_logged(&m.record).await;
                }
                undo_dirs(&dir).await;
                Err(e)
            }
        }
    }

    async fn boot(
        spec: &PodSpec,
        hypervisor: &dyn Hypervisor,
        (mut vm, nics): (VmConfig, Vec<Nic>),
        mirror: Option<&Mirror>,
        (attached, dial): (Option<Sandbox>, &DialOptions),
    ) -> Result<Sandbox, ShimError> {
        let dir = vm.state_dir.clone();
        vm.nics = nics;
        tracing::info!(
            pod = %spec.key.pod, namespace = %spec.key.namespace, backend = hypervisor.name(), vcpus = vm.vcpus, memory_mib = vm.memory_mib,
            "starting the pod's VM"
        );
        let started = std::time::Instant::now();
        let sandbox = match attached {
            Some(s) => s,
            None => Sandbox::start_relaunching(hypervisor, &vm, dial)
                .await
                .map_err(|e| ShimError::Vm(chain(&e)))?,
        };
        // The VMM holds its own copies of the taps now; closing ours ties
        // each tap's life to the VM's.
        drop(vm);
        let record = PodRecord {
            shim_pid: std::process::id(),
            processes: record_processes(
                &sandbox
                    .vm()
                    .processes()
                    .iter()
                    .map(|(role, pid)| (role.to_string(), *pid))
                    .collect::<Vec<_>>(),
            ),
        };
        if let Err(e) = record.save(&dir) {
            tracing::warn!(error = %chain(&e), "cannot record the VM's processes");
        }
        if let Err(e) = sandbox
            .set_up(&spec.key.pod, &spec.hostname, spec.shared_pid_ns)
            .await
        {
            let exit = sandbox.vm().kill().await;
            return Err(ShimError::Vm(format!("{} (VM killed: {exit})", chain(&e))));
        }
        if let Some(m) = mirror {
            let request = m.sent.to_request(&m.warm_macs);
            if let Err(e) = sandbox.agent().update_network(&request).await {
                let exit = sandbox.vm().kill().await;
                return Err(ShimError::Vm(format!(
                    "the guest did not take the pod's network from {}: {} (VM killed: {exit})",
                    m.record.netns.display(),
                    chain(&e)
                )));
            }
            tracing::info!(pod = %spec.key.pod, netns = %m.record.netns.display(), interfaces = m.sent.interfaces.len(), routes = m.sent.routes.len(), "pod network mirrored");
        }
        tracing::info!(pod = %spec.key.pod, elapsed_ms = started.elapsed().as_millis() as u64, "pod ready");
        Ok(sandbox)
    }

    pub fn agent(&self) -> &AgentClient {
        self.sandbox.agent()
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Whose pod it is (and so where its state lives).
    pub fn key(&self) -> &PodKey {
        &self.key
    }

    /// The pod's shared directory on the host.
    pub fn shared_dir(&self) -> &Path {
        &self.shared
    }

    /// The VMM's host pid (not its backends', which may start first).
    pub fn vmm_pid(&self) -> u32 {
        self.sandbox.vm().vmm_pid().unwrap_or(0)
    }

    /// Reads the pod's network namespace again and brings the guest up to
    /// date: an engine may configure it between Create and Start. A new
    /// interface is an error, since a running VM cannot get a NIC.
    pub async fn sync_network(&self) -> Result<(), ShimError> {
        let mut guard = self.mirror.lock().await;
        let Some(m) = guard.as_mut() else {
            return Ok(());
        };
        let now = network::scan(&m.record.netns)
            .await
            .map_err(|e| ShimError::FailedPrecondition(chain(&e)))?;
        if now == m.sent {
            return Ok(());
        }
        let mirrored = m.sent.macs();
        if let Some(new) = now.interfaces.iter().find(|i| !mirrored.contains(&i.mac)) {
            return Err(ShimError::FailedPrecondition(format!(
                "interface {} ({}) appeared in the pod's network namespace {} after its VM started, and nutshell cannot add a NIC to a running VM; configure the namespace before the pod's first container is created",
                new.name,
                new.mac,
                m.record.netns.display()
            )));
        }
        self.agent()
            .update_network(&now.to_request(&[]))
            .await
            .map_err(|e| ShimError::agent("UpdateNetwork", e))?;
        tracing::info!(pod = %self.id, "pod network updated after a change in its namespace");
        m.sent = now;
        Ok(())
    }

    /// Powers the guest off (or kills it), then takes the pod's network
    /// plumbing away and unmounts and removes the pod's directories.
    pub async fn shutdown(&self) {
        let exit = self.sandbox.shutdown(POWEROFF_GRACE).await;
        self.oom_watch.abort();
        tracing::info!(pod = %self.id, %exit, "pod's VM ended");
        if let Some(m) = self.mirror.lock().await.as_ref() {
            unplumb_logged(&m.record).await;
        }
        undo_dirs(&self.dir).await;
    }
}

/// Names the config key and file when a guest asset is missing: the most
/// likely first-run mistake.
fn check_assets(config: &Config) -> Result<(), ShimError> {
    for (key, path) in [
        ("vm.kernel", &config.vm.kernel),
        ("vm.initrd", &config.vm.initrd),
    ] {
        if !path.is_file() {
            return Err(ShimError::FailedPrecondition(format!(
                "the guest {} {} does not exist ({key} in {}); run tools/setup.sh or fix the config",
                if key == "vm.kernel" { "kernel" } else { "initramfs" },
                path.display(),
                config.source_name()
            )));
        }
    }
    Ok(())
}

/// A warm VM from the pool for the pod ([`claim_or_cold`]), its agent
/// dialled, with the guest MACs of the NICs whose taps the pool moved into
/// the pod's network namespace. An agent that does not answer means a
/// cold boot, like no warm VM at all; its VM is gone (and its taps with
/// it) by then.
async fn claim_warm(
    spec: &PodSpec,
    vm: &VmConfig,
    config: &Config,
    hypervisor: &dyn Hypervisor,
    network: Option<&(PathBuf, PodNetwork)>,
    dial: &DialOptions,
) -> Option<(Sandbox, Vec<Mac>)> {
    let claim = network.map(|(netns, net)| NetworkClaim {
        netns: netns.clone(),
        nics: net.interfaces.len(),
    });
    let warm = claim_or_cold(&config.pool, vm, hypervisor.name(), claim).await?;
    match Sandbox::attach(warm.vm, dial).await {
        Ok(s) => Some((s, warm.nic_macs)),
        Err(e) => {
            tracing::warn!(pod = %spec.key.pod, error = %chain(&e), "the claimed warm VM's agent did not answer; booting cold");
            None
        }
    }
}

/// Reads the pod's network namespace, when it has one to mirror. A
/// host-network pod is logged as the README says.
async fn read_network(spec: &PodSpec) -> Result<Option<(PathBuf, PodNetwork)>, ShimError> {
    let netns = match &spec.network {
        NetworkMode::Mirrored(p) => p,
        NetworkMode::Host => {
            tracing::warn!(pod = %spec.key.pod, "{HOST_NETWORK_WARNING}");
            return Ok(None);
        }
        NetworkMode::Private => return Ok(None),
    };
    let net = network::scan(netns)
        .await
        .map_err(|e| ShimError::FailedPrecondition(chain(&e)))?;
    Ok(Some((netns.clone(), net)))
}

/// Plumbs the pod's network, read by [`read_network`], with taps from
/// `source`.
async fn plumb_network(
    network: Option<(PathBuf, PodNetwork)>,
    dir: &Path,
    source: TapSource,
) -> Result<Option<(PodNetwork, Plumbed)>, ShimError> {
    let Some((netns, net)) = network else {
        return Ok(None);
    };
    let plumbed = network::plumb(&netns, &net, dir, source)
        .await
        .map_err(|e| ShimError::Internal(chain(&e)))?;
    Ok(Some((net, plumbed)))
}

/// Unplumbs, logging what fails: clean-up goes on regardless.
pub(super) async fn unplumb_logged(record: &NetworkRecord) {
    if let Err(e) = network::unplumb(record).await {
        tracing::warn!(netns = %record.netns.display(), error = %chain(&e), "cannot take the pod's network plumbing away");
    }
}

async fn undo_dirs(dir: &Path) {
    let dir = dir.to_path_buf();
    let r = tokio::task::spawn_blocking(move || {
        unmount_below(&dir)?;
        remove_tree(&dir)
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %chain(&e), "cannot clean the pod's directory"),
        Err(e) => tracing::warn!(error = %e, "pod clean-up task failed"),
    }
}

/// Publishes TaskOOM for every OOM kill the agent reports, until the VM
/// ends.
async fn watch_oom(agent: AgentClient, events: Arc<Events>) {
    loop {
        match agent.get_oom_event().await {
            Ok(ev) => {
                tracing::info!(container = %ev.container_id, "OOM kill in the guest");
                events
                    .publish(containerd_shim_protos::events::task::TaskOOM {
                        container_id: ev.container_id,
                        ..Default::default()
                    })
                    .await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "OOM watch ends");
                return;
            }
        }
    }
}

/// An error with its whole source chain, for messages that leave the shim.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
