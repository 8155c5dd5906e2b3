//! The task service: containerd's task API v2, call by call, onto the pod's
//! VM and its agent.
//!
//! Locking: `pod` is an async mutex held while the pod's VM boots (a second
//! container's Create waits for the VM it needs); `containers` is a plain
//! mutex held only to look up or change the map. No lock is held across an
//! agent call that can block (Wait, stdio), so `Wait` never stalls other
//! calls.
//!
//! Claims: a Create reserves its id in `containers` before its first await
//! ([`CreateClaim`]) and a Start claims its process's start
//! ([`Process::claim_start`]), so of two concurrent calls for one id one
//! goes ahead and the other fails at once; a failed call gives its claim
//! back.
//!
//! The pod is reached through [`PodApi`] (`pod_api.rs`), so the state
//! machine here runs against a fake in the unit tests (`tests.rs`); the
//! ttrpc glue is in `api.rs`.

mod api;
mod pod_api;
#[cfg(test)]
mod tests;

pub use pod_api::{PodApi, PodLauncher, VmLauncher};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::ExitSignal;
use containerd_shim_protos::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, ExecProcessRequest,
    KillRequest, StartRequest, StartResponse, StateRequest, StateResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use nutshell_protocol::agent::{CreateContainerRequest, ExecProcessRequest as AgentExec};
use oci_spec::runtime::Spec;

use super::events::Events;
use super::pod::{chain, join_pod_network, NetworkMode, PodSpec};
use super::process::{timestamp, Container, Process, VM_GONE_EXIT_STATUS};
use super::state::{check_id, PodKey};
use super::stdio::StdioConfig;
use super::{options, sizing, ShimError, CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION};
use crate::agent::AgentError;
use crate::config::Config;
use crate::mounts::guest_rootfs;

/// How long output may sit idle after a process exits before its relay is
/// closed (a background child can hold the pipe forever).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// The longest the exit event waits for output at all (a background child
/// may also write forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// The shim's task service.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

/// A container id's entry: reserved by a Create still in progress, or a
/// created container.
enum Slot {
    Creating,
    Ready(Arc<Container>),
}

type Slots = Mutex<HashMap<String, Slot>>;

struct Inner {
    /// containerd's address and namespace: with the pod id they say whose
    /// a pod is ([`PodKey`]).
    address: String,
    namespace: String,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    launcher: Box<dyn PodLauncher>,
    pod: tokio::sync::Mutex<Option<Arc<dyn PodApi>>>,
    containers: Slots,
    /// The ending of a pod whose owner was deleted: it runs after Delete
    /// has answered, and the shim exits only once it is done.
    teardown: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TaskService {
    /// The service of the shim serving containerd at `address`, namespace
    /// `namespace`: pods are real VMs.
    pub fn new(address: &str, namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self::with_launcher(address, namespace, events, exit, Box::new(VmLauncher))
    }

    /// The same, starting pods with `launcher`.
    pub fn with_launcher(
        address: &str,
        namespace: &str,
        events: Events,
        exit: Arc<ExitSignal>,
        launcher: Box<dyn PodLauncher>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                address: address.to_string(),
                namespace: namespace.to_string(),
                events: Arc::new(events),
                exit,
                launcher,
                pod: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                teardown: Mutex::new(None),
            }),
        }
    }
}

/// One Create's reservation of its container id. Dropped unfilled (the
/// Create failed, or its future was dropped) it frees the id again.
struct CreateClaim<'a> {
    slots: &'a Slots,
    id: String,
    filled: bool,
}

impl CreateClaim<'_> {
    fn fill(mut self, container: Arc<Container>) {
        lock(self.slots).insert(self.id.clone(), Slot::Ready(container));
        self.filled = true;
    }
}

impl Drop for CreateClaim<'_> {
    fn drop(&mut self) {
        if self.filled {
            return;
        }
        let mut slots = lock(self.slots);
        if matches!(slots.get(&self.id), Some(Slot::Creating)) {
            slots.remove(&self.id);
        }
    }
}

impl Inner {
    /// Reserves `id` for a Create; `AlreadyExists` when it is created or
    /// being created.
    fn claim_id(&self, id: &str) -> Result<CreateClaim<'_>, ShimError> {
        let mut slots = lock(&self.containers);
        if slots.contains_key(id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        slots.insert(id.to_string(), Slot::Creating);
        Ok(CreateClaim {
            slots: &self.containers,
            id: id.to_string(),
            filled: false,
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ShimError> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            _ => Err(ShimError::NotFound(format!("container {id} not found"))),
        }
    }

    /// Every created container.
    fn created(&self) -> Vec<Arc<Container>> {
        lock(&self.containers)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(c.clone()),
                Slot::Creating => None,
            })
            .collect()
    }

    fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), ShimError> {
        let c = self.container(id)?;
        let p = c.process(exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("process {exec_id} of container {id} not found"))
        })?;
        Ok((c, p))
    }

    async fn current_pod(&self) -> Result<Arc<dyn PodApi>, ShimError> {
        self.pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("the pod's VM is not running".into()))
    }

    /// The pod for a new container: the running one, or a new VM when the
    /// container is the pod's owner. Returns whether it was started here.
    async fn pod_for(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        pod_id: &str,
    ) -> Result<(Arc<dyn PodApi>, bool), ShimError> {
        let mut guard = self.pod.lock().await;
        if let Some(p) = guard.as_ref() {
            if p.key().pod != pod_id {
                return Err(ShimError::FailedPrecondition(format!(
                    "this shim serves pod {}, not pod {pod_id} of container {}",
                    p.key().pod,
                    req.id
                )));
            }
            return Ok((p.clone(), false));
        }
        if pod_id != req.id {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} belongs to pod {pod_id}, whose VM is not running in this shim",
                req.id
            )));
        }
        let config_path = options::config_path(req.options.as_ref());
        let config = Config::load(config_path.as_deref())
            .map_err(|e| ShimError::InvalidArgument(chain(&e)))?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let size = sizing::size_for(&config.vm, &annotations, resources);
        let pod_spec = PodSpec {
            key: PodKey::new(&self.address, &self.namespace, pod_id),
            hostname: spec.hostname().clone().unwrap_or_default(),
            size,
            shared_pid_ns: false,
            network: NetworkMode::of(spec),
        };
        let pod = self
            .launcher
            .launch(&pod_spec, &config, self.events.clone())
            .await?;
        *guard = Some(pod.clone());
        Ok((pod, true))
    }

    async fn drop_pod(&self, pod: &Arc<dyn PodApi>) {
        pod.shutdown().await;
        let mut guard = self.pod.lock().await;
        if guard.as_ref().is_some_and(|p| Arc::ptr_eq(p, pod)) {
            *guard = None;
        }
    }

    /// Watches a started process: records its exit, lets its output drain,
    /// then publishes TaskExit.
    fn spawn_waiter(self: &Arc<Self>, pod: Arc<dyn PodApi>, p: Arc<Process>) {
        let me = self.clone();
        tokio::spawn(async move {
            let status = match pod.wait_process(&p.container_id, &p.exec_id).await {
                Ok(w) => u32::try_from(w.exit_status).unwrap_or(VM_GONE_EXIT_STATUS),
                Err(e @ AgentError::VmEnded { .. }) => {
                    tracing::warn!(container = %p.container_id, exec = %p.exec_id, error = %chain(&e), "process lost with its VM");
                    VM_GONE_EXIT_STATUS
                }
                Err(e) => {
                    tracing::warn!(container = %p.container_id, exec = %p.exec_id, error = %chain(&e), "WaitProcess failed");
                    VM_GONE_EXIT_STATUS
                }
            };
            let at = SystemTime::now();
            p.drain_output(DRAIN_IDLE, DRAIN_LIMIT).await;
            me.publish_exit(&p, status, at).await;
        });
    }

    async fn publish_exit(&self, p: &Process, status: u32, at: SystemTime) {
        if p.set_exited(status, at) {
            tracing::info!(container = %p.container_id, exec = %p.exec_id, status, "process exited");
            self.events
                .publish(TaskExit {
                    container_id: p.container_id.clone(),
                    id: p.event_id().to_string(),
                    pid: p.pid(),
                    exit_status: status,
                    exited_at: MessageField::some(timestamp(at)),
                    ..Default::default()
                })
                .await;
        }
    }

    async fn create(
        self: &Arc<Self>,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ShimError> {
        check_id(&req.id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let claim = self.claim_id(&req.id)?;
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            ShimError::InvalidArgument(format!("cannot read the bundle's config.json: {e}"))
        })?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let pod_id = annotations
            .get(SANDBOX_ID_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| req.id.clone());
        let owns_pod = pod_id == req.id
            || annotations
                .get(CONTAINER_TYPE_ANNOTATION)
                .map(String::as_str)
                == Some("sandbox");
        let (pod, new_pod) = self.pod_for(&req, &spec, &pod_id).await?;

        let r = self
            .create_in_pod(&req, &pod, &bundle, &mut spec, owns_pod, claim)
            .await;
        match r {
            Ok(resp) => Ok(resp),
            Err(e) => {
                if let Err(c) = pod.detach_filesystems(&req.id).await {
                    tracing::warn!(container = %req.id, error = %c, "clean-up after a failed Create");
                }
                if new_pod {
                    self.drop_pod(&pod).await;
                }
                Err(e)
            }
        }
    }

    async fn create_in_pod(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        pod: &Arc<dyn PodApi>,
        bundle: &Path,
        spec: &mut Spec,
        owns_pod: bool,
        claim: CreateClaim<'_>,
    ) -> Result<CreateTaskResponse, ShimError> {
        let cid = req.id.clone();
        // Where a Create's time goes, at debug level: the host's side of
        // the rootfs, then the guest's CreateContainer.
        let started = std::time::Instant::now();
        pod.attach_filesystems(req, bundle, spec).await?;
        let attached = started.elapsed();
        join_pod_network(spec);
        let spec_json =
            serde_json::to_vec(&spec).map_err(|e| ShimError::Internal(e.to_string()))?;
        let created = pod
            .create_container(&CreateContainerRequest {
                container_id: cid.clone(),
                spec_json,
                rootfs: guest_rootfs(&cid).display().to_string(),
                stdin: !req.stdin.is_empty(),
                ..Default::default()
            })
            .await
            .map_err(|e| ShimError::agent("CreateContainer", e))?;
        tracing::debug!(
            container = %cid,
            attach_ms = attached.as_millis() as u64,
            guest_ms = (started.elapsed() - attached).as_millis() as u64,
            "container's filesystems attached and created in the guest"
        );
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(&cid, "", stdio.clone(), Vec::new()));
        init.set_pid(created.pid);
        match pod.start_relays(&cid, "", &self.namespace, &stdio).await {
            Ok(Some(r)) => init.set_relays(r).await,
            Ok(None) => {}
            Err(e) => {
                let _ = pod.remove_container(&cid).await;
                return Err(ShimError::InvalidArgument(chain(&e)));
            }
        }
        let container = Arc::new(Container::new(&cid, bundle.to_path_buf(), owns_pod, init));
        claim.fill(container);
        tracing::info!(container = %cid, pod = %pod.key().pod, pid = created.pid, "container created");
        self.events
            .publish(TaskCreate {
                container_id: cid,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: created.pid,
                ..Default::default()
            })
            .await;
        Ok(CreateTaskResponse {
            pid: created.pid,
            ..Default::default()
        })
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> Result<StartResponse, ShimError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let claim = p.claim_start().ok_or_else(|| {
            ShimError::FailedPrecondition(format!(
                "process {} of container {} was already started",
                p.event_id(),
                req.id
            ))
        })?;
        let pod = self.current_pod().await?;
        let pid = if req.exec_id.is_empty() {
            if c.owns_pod {
                pod.sync_network().await?;
            }
            pod.start_container(&req.id)
                .await
                .map_err(|e| ShimError::agent("StartContainer", e))?;
            p.pid()
        } else {
            let r = pod
                .exec_process(&AgentExec {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process_json: p.spec_json.clone(),
                    stdin: !p.stdio.stdin.is_empty(),
                    ..Default::default()
                })
                .await
                .map_err(|e| ShimError::agent("ExecProcess", e))?;
            match pod
                .start_relays(&req.id, &req.exec_id, &self.namespace, &p.stdio)
                .await
            {
                Ok(Some(relays)) => p.set_relays(relays).await,
                Ok(None) => {}
                Err(e) => {
                    let _ = pod.signal_process(&req.id, &req.exec_id, 9, false).await;
                    return Err(ShimError::InvalidArgument(chain(&e)));
                }
            }
            r.pid
        };
        claim.commit(pid);
        self.spawn_waiter(pod, p.clone());
        if req.exec_id.is_empty() {
            self.events
                .publish(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
        } else {
            self.events
                .publish(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(self: &Arc<Self>, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if p.started() && p.exited().is_none() {
            return Err(ShimError::FailedPrecondition(format!(
                "process {} of container {} is running; kill it first",
                p.event_id(),
                req.id
            )));
        }
        let exit = p.exited();
        let (status, at) = exit.map_or((0, SystemTime::now()), |e| (e.status, e.at));
        p.stop_relays().await;
        let resp = DeleteResponse {
            pid: p.pid(),
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            c.remove_exec(&req.exec_id);
            return Ok(resp);
        }
        for e in c.processes().iter().skip(1) {
            e.stop_relays().await;
        }
        let pod = self.pod.lock().await.clone();
        if let Some(pod) = &pod {
            if let Err(e) = pod.remove_container(&req.id).await {
                tracing::debug!(container = %req.id, error = %chain(&e), "RemoveContainer");
            }
            if let Err(e) = pod.detach_filesystems(&req.id).await {
                tracing::warn!(container = %req.id, error = %e, "container clean-up");
            }
        }
        lock(&self.containers).remove(&req.id);
        if c.owns_pod {
            if let Some(pod) = pod {
                self.end_pod_after_reply(pod).await;
            }
        }
        tracing::info!(container = %req.id, status, "container deleted");
        self.events
            .publish(TaskDelete {
                container_id: req.id.clone(),
                pid: resp.pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at)),
                id: req.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(resp)
    }

    /// Ends the pod once its owner is deleted: whatever still runs in it
    /// exits with the VM. The owner's exit is recorded, its output drained
    /// and its filesystems detached by now, so nothing can be lost: the
    /// VM's power-off (a tenth of a second or more) runs after Delete has
    /// answered, off the caller's path. New requests find no pod at once;
    /// Shutdown waits for the end before the shim exits, and should the
    /// shim die meanwhile, `shim delete` cleans up as after any crash.
    async fn end_pod_after_reply(self: &Arc<Self>, pod: Arc<dyn PodApi>) {
        {
            let mut guard = self.pod.lock().await;
            if guard.as_ref().is_some_and(|p| Arc::ptr_eq(p, &pod)) {
                *guard = None;
            }
        }
        let me = self.clone();
        let end = tokio::spawn(async move {
            pod.shutdown().await;
            for c in me.created() {
                for p in c.processes() {
                    p.stop_relays().await;
                    me.publish_exit(&p, VM_GONE_EXIT_STATUS, SystemTime::now())
                        .await;
                }
            }
        });
        *lock(&self.teardown) = Some(end);
    }

    /// Waits until a pod's ending that Delete started is done.
    async fn teardown_done(&self) {
        let end = lock(&self.teardown).take();
        if let Some(end) = end {
            if let Err(e) = end.await {
                tracing::error!(error = %e, "the pod's teardown failed");
            }
        }
    }

    async fn kill(&self, req: KillRequest) -> Result<(), ShimError> {
        let (_c, p) = self.process(&req.id, &req.exec_id)?;
        if p.exited().is_some() {
            return Err(ShimError::NotFound(format!(
                "process {} of container {} already finished",
                p.event_id(),
                req.id
            )));
        }
        let pod = self.current_pod().await?;
        pod.signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(|e| ShimError::agent("SignalProcess", e))
    }

    async fn exec(&self, req: ExecProcessRequest) -> Result<(), ShimError> {
        check_id(&req.exec_id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let c = self.container(&req.id)?;
        if c.init.exited().is_some() {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        let spec_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let p = Arc::new(Process::new(&req.id, &req.exec_id, stdio, spec_json));
        if !c.add_exec(p) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {} already exists in container {}",
                req.exec_id, req.id
            )));
        }
        self.events
            .publish(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
            .await;
        Ok(())
    }

    fn state(&self, req: &StateRequest) -> Result<StateResponse, ShimError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let exit = p.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid(),
            status: p.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        let c = self.container(id)?;
        let pod = self.current_pod().await?;
        if pause {
            pod.pause_container(id)
                .await
                .map_err(|e| ShimError::agent("PauseContainer", e))?;
            for p in c.processes() {
                p.set_paused(true);
            }
            self.events
                .publish(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        } else {
            pod.resume_container(id)
                .await
                .map_err(|e| ShimError::agent("ResumeContainer", e))?;
            for p in c.processes() {
                p.set_paused(false);
            }
            self.events
                .publish(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    /// Answers at once and exits once the pod has ended: containerd waits
    /// for this answer inside its Delete, with a timeout.
    async fn shutdown(self: &Arc<Self>) {
        if !lock(&self.containers).is_empty() {
            tracing::debug!("shutdown requested while containers remain; staying up");
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.teardown_done().await;
            let pod = me.pod.lock().await.clone();
            if let Some(pod) = pod {
                me.drop_pod(&pod).await;
            }
            tracing::info!("no task left; shim exits");
            me.exit.signal();
        });
    }
}
