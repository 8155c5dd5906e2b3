//! The task service: containerd's task API v2, call by call, onto the pod's
//! VM and its agent.
//!
//! Locking: `pod` is an async mutex held while the pod's VM boots (a second
//! container's Create waits for the VM it needs); `containers` is a plain
//! mutex held only to look up or change the map. No lock is held across an
//! agent call that can block (Wait, stdio), so `Wait` never stalls other
//! calls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use nutshell_protocol::agent::{CreateContainerRequest, ExecProcessRequest as AgentExec};
use oci_spec::runtime::Spec;

use super::events::Events;
use super::mounts::{bind_volume, guest_rootfs, host_kind, mount_rootfs, rewrite_spec};
use super::pod::{chain, Pod, PodSpec};
use super::process::{timestamp, Container, Process, VM_GONE_EXIT_STATUS};
use super::state::{check_id, cleanup_container};
use super::stdio::{Relays, StdioConfig};
use super::{
    metrics, options, sizing, ShimError, CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION,
};
use crate::agent::AgentError;
use crate::config::Config;

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

struct Inner {
    namespace: String,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TaskService {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                events: Arc::new(events),
                exit,
                pod: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Inner {
    fn container(&self, id: &str) -> Result<Arc<Container>, ShimError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
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

    async fn current_pod(&self) -> Result<Arc<Pod>, ShimError> {
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
    ) -> Result<(Arc<Pod>, bool), ShimError> {
        let mut guard = self.pod.lock().await;
        if let Some(p) = guard.as_ref() {
            if p.id != pod_id {
                return Err(ShimError::FailedPrecondition(format!(
                    "this shim serves pod {}, not pod {pod_id} of container {}",
                    p.id, req.id
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
            id: pod_id.to_string(),
            hostname: spec.hostname().clone().unwrap_or_default(),
            size,
            shared_pid_ns: false,
        };
        let pod = Pod::start(&pod_spec, &config, self.events.clone()).await?;
        *guard = Some(pod.clone());
        Ok((pod, true))
    }

    async fn drop_pod(&self, pod: &Arc<Pod>) {
        pod.shutdown().await;
        let mut guard = self.pod.lock().await;
        if guard.as_ref().is_some_and(|p| Arc::ptr_eq(p, pod)) {
            *guard = None;
        }
    }

    /// Watches a started process: records its exit, lets its output drain,
    /// then publishes TaskExit.
    fn spawn_waiter(self: &Arc<Self>, pod: Arc<Pod>, p: Arc<Process>) {
        let me = self.clone();
        tokio::spawn(async move {
            let status = match pod.agent().wait_process(&p.container_id, &p.exec_id).await {
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
        if lock(&self.containers).contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
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
            .create_in_pod(&req, &pod, &bundle, &mut spec, owns_pod)
            .await;
        match r {
            Ok(resp) => Ok(resp),
            Err(e) => {
                let (pod_name, cid) = (pod.id.clone(), req.id.clone());
                let _ =
                    tokio::task::spawn_blocking(move || cleanup_container(&pod_name, &cid)).await;
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
        pod: &Arc<Pod>,
        bundle: &Path,
        spec: &mut Spec,
        owns_pod: bool,
    ) -> Result<CreateTaskResponse, ShimError> {
        let cid = req.id.clone();
        let shared = pod.shared_dir().to_path_buf();
        let bundle_rootfs = spec
            .root()
            .as_ref()
            .map(|r| bundle.join(r.path()))
            .unwrap_or_else(|| bundle.join("rootfs"));
        let volumes = rewrite_spec(spec, &cid, &shared, host_kind);
        let rootfs_mounts = req.rootfs.clone();
        let target = shared.join(&cid).join("rootfs");
        tokio::task::spawn_blocking(move || -> Result<(), ShimError> {
            mount_rootfs(&rootfs_mounts, &bundle_rootfs, &target).map_err(ShimError::from_err)?;
            for v in &volumes {
                bind_volume(v).map_err(ShimError::from_err)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ShimError::Internal(e.to_string()))??;

        let spec_json =
            serde_json::to_vec(&spec).map_err(|e| ShimError::Internal(e.to_string()))?;
        let agent = pod.agent();
        let created = agent
            .create_container(&CreateContainerRequest {
                container_id: cid.clone(),
                spec_json,
                rootfs: guest_rootfs(&cid).display().to_string(),
                stdin: !req.stdin.is_empty(),
                ..Default::default()
            })
            .await
            .map_err(|e| ShimError::agent("CreateContainer", e))?;
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(&cid, "", stdio.clone(), Vec::new()));
        init.set_pid(created.pid);
        match Relays::start(agent, &cid, "", &self.namespace, &stdio).await {
            Ok(r) => init.set_relays(r).await,
            Err(e) => {
                let _ = agent.remove_container(&cid).await;
                return Err(ShimError::InvalidArgument(chain(&e)));
            }
        }
        let container = Arc::new(Container::new(&cid, bundle.to_path_buf(), owns_pod, init));
        lock(&self.containers).insert(cid.clone(), container);
        tracing::info!(container = %cid, pod = %pod.id, pid = created.pid, "container created");
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
        let (_c, p) = self.process(&req.id, &req.exec_id)?;
        if p.started() {
            return Err(ShimError::FailedPrecondition(format!(
                "process {} of container {} was already started",
                req.exec_id, req.id
            )));
        }
        let pod = self.current_pod().await?;
        let agent = pod.agent();
        let pid = if req.exec_id.is_empty() {
            agent
                .start_container(&req.id)
                .await
                .map_err(|e| ShimError::agent("StartContainer", e))?;
            p.pid()
        } else {
            let r = agent
                .exec_process(&AgentExec {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process_json: p.spec_json.clone(),
                    stdin: !p.stdio.stdin.is_empty(),
                    ..Default::default()
                })
                .await
                .map_err(|e| ShimError::agent("ExecProcess", e))?;
            match Relays::start(agent, &req.id, &req.exec_id, &self.namespace, &p.stdio).await {
                Ok(relays) => p.set_relays(relays).await,
                Err(e) => {
                    let _ = agent.signal_process(&req.id, &req.exec_id, 9, false).await;
                    return Err(ShimError::InvalidArgument(chain(&e)));
                }
            }
            r.pid
        };
        p.set_started(pid);
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
            if let Err(e) = pod.agent().remove_container(&req.id).await {
                tracing::debug!(container = %req.id, error = %chain(&e), "RemoveContainer");
            }
            let (pod_id, cid) = (pod.id.clone(), req.id.clone());
            match tokio::task::spawn_blocking(move || cleanup_container(&pod_id, &cid)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(container = %req.id, error = %chain(&e), "container clean-up")
                }
                Err(e) => tracing::warn!(container = %req.id, error = %e, "container clean-up"),
            }
        }
        lock(&self.containers).remove(&req.id);
        if c.owns_pod {
            if let Some(pod) = &pod {
                self.end_pod(pod).await;
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

    /// Ends the pod: whatever still runs in it exits with the VM.
    async fn end_pod(&self, pod: &Arc<Pod>) {
        self.drop_pod(pod).await;
        let left: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
        for c in left {
            for p in c.processes() {
                p.stop_relays().await;
                self.publish_exit(&p, VM_GONE_EXIT_STATUS, SystemTime::now())
                    .await;
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
        pod.agent()
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
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
            pod.agent()
                .pause_container(id)
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
            pod.agent()
                .resume_container(id)
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

    async fn shutdown(&self) {
        if !lock(&self.containers).is_empty() {
            tracing::debug!("shutdown requested while containers remain; staying up");
            return;
        }
        let pod = self.pod.lock().await.clone();
        if let Some(pod) = pod {
            self.drop_pod(&pod).await;
        }
        tracing::info!("no task left; shim exits");
        self.exit.signal();
    }
}

fn ok<T>(r: Result<T, ShimError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::warn!(error = %e, "task call failed");
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        ok(self.inner.state(&req))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, terminal = req.terminal, "Create");
        ok(self.inner.create(req).await)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec = %req.exec_id, "Start");
        ok(self.inner.start(req).await)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec = %req.exec_id, "Delete");
        ok(self.inner.delete(req).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let r = async {
            self.inner.container(&req.id)?;
            let pod = self.inner.current_pod().await?;
            let list = pod
                .agent()
                .list_processes(&req.id)
                .await
                .map_err(|e| ShimError::agent("ListProcesses", e))?;
            Ok(PidsResponse {
                processes: list
                    .processes
                    .iter()
                    .map(|p| ProcessInfo {
                        pid: p.pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        ok(r.await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        ok(self
            .inner
            .pause_or_resume(&req.id, true)
            .await
            .map(|()| Empty::new()))
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        ok(self
            .inner
            .pause_or_resume(&req.id, false)
            .await
            .map(|()| Empty::new()))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        ok(Err(ShimError::Unimplemented(
            "checkpoint is not supported by the nutshell runtime".into(),
        )))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "Kill");
        ok(self.inner.kill(req).await.map(|()| Empty::new()))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec = %req.exec_id, "Exec");
        ok(self.inner.exec(req).await.map(|()| Empty::new()))
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let r = async {
            self.inner.process(&req.id, &req.exec_id)?;
            let pod = self.inner.current_pod().await?;
            pod.agent()
                .resize_terminal(&req.id, &req.exec_id, req.height, req.width)
                .await
                .map_err(|e| ShimError::agent("ResizeTerminal", e))
        };
        ok(r.await.map(|()| Empty::new()))
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let r = async {
            let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
            if req.stdin {
                p.close_stdin().await;
            }
            Ok(())
        };
        ok(r.await.map(|()| Empty::new()))
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let r = async {
            self.inner.container(&req.id)?;
            let resources = req
                .resources
                .as_ref()
                .map(|a| a.value.clone())
                .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
            let pod = self.inner.current_pod().await?;
            pod.agent()
                .update_container(&req.id, resources)
                .await
                .map_err(|e| ShimError::agent("UpdateContainer", e))
        };
        ok(r.await.map(|()| Empty::new()))
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let r = async {
            let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
            let e = p.wait().await;
            Ok(WaitResponse {
                exit_status: e.status,
                exited_at: MessageField::some(e.timestamp()),
                ..Default::default()
            })
        };
        ok(r.await)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let r = async {
            self.inner.container(&req.id)?;
            let pod = self.inner.current_pod().await?;
            let s = pod
                .agent()
                .stats_container(&req.id)
                .await
                .map_err(|e| ShimError::agent("StatsContainer", e))?;
            let any = metrics::to_any(&s).map_err(ShimError::from_err)?;
            Ok(StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            })
        };
        ok(r.await)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = match self.inner.pod.lock().await.as_ref() {
            Some(p) => p.vmm_pid(),
            None => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.inner.shutdown().await;
        Ok(Empty::new())
    }
}
