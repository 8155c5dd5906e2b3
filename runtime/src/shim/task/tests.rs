//! The task state machine against a fake pod: no VM, no agent, no mounts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::Status;
use containerd_shim_protos::ttrpc;
use nutshell_protocol::agent::{
    CreateContainerResponse, ExecProcessResponse, ListProcessesResponse, StatsContainerResponse,
    WaitProcessResponse,
};
use tokio::sync::{watch, Semaphore};

use super::api::ok;
use super::*;
use crate::shim::stdio::{Relays, StdioError};

const ADDRESS: &str = "/run/containerd-test/containerd.sock";
const NAMESPACE: &str = "unit";
const VMM_PID: u32 = 4242;

/// What the test steers and sees, shared by the launcher and its pods.
#[derive(Debug)]
struct Control {
    /// `"<call> <id>"`, in order.
    calls: Mutex<Vec<String>>,
    /// Calls that wait for a permit of `gate` before answering.
    gated: Mutex<HashSet<&'static str>>,
    gate: Semaphore,
    /// The next call of this name fails with this code.
    fail_once: Mutex<HashMap<&'static str, ttrpc::Code>>,
    /// Exit statuses by `"<container>/<exec>"`; WaitProcess waits for one.
    exits: watch::Sender<HashMap<String, i32>>,
    launches: Mutex<Vec<PodKey>>,
    shutdowns: AtomicU32,
}

impl Control {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::default(),
            gated: Mutex::default(),
            gate: Semaphore::new(0),
            fail_once: Mutex::default(),
            exits: watch::channel(HashMap::new()).0,
            launches: Mutex::default(),
            shutdowns: AtomicU32::new(0),
        })
    }

    /// Records a call, holds it at the gate where asked, fails it once
    /// where asked.
    async fn hit(&self, call: &'static str, id: &str) -> Result<(), AgentError> {
        lock(&self.calls).push(format!("{call} {id}"));
        if lock(&self.gated).contains(call) {
            self.gate.acquire().await.expect("gate open").forget();
        }
        match lock(&self.fail_once).remove(call) {
            Some(code) => Err(AgentError::Rpc {
                call,
                source: ttrpc::Error::RpcStatus(ttrpc::get_status(code, "the fake says no")),
            }),
            None => Ok(()),
        }
    }

    fn count(&self, call: &str) -> usize {
        let prefix = format!("{call} ");
        lock(&self.calls)
            .iter()
            .filter(|c| c.starts_with(&prefix))
            .count()
    }

    /// Waits until `call` has been made `n` times in all.
    async fn seen(&self, call: &str, n: usize) {
        let wait = async {
            while self.count(call) < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("{call} was not called {n} times"));
    }

    fn exit(&self, cid: &str, exec_id: &str, status: i32) {
        self.exits.send_modify(|m| {
            m.insert(format!("{cid}/{exec_id}"), status);
        });
    }
}

#[derive(Debug)]
struct FakePod {
    key: PodKey,
    ctl: Arc<Control>,
}

#[async_trait]
impl PodApi for FakePod {
    fn key(&self) -> &PodKey {
        &self.key
    }

    fn vmm_pid(&self) -> u32 {
        VMM_PID
    }

    async fn attach_filesystems(
        &self,
        req: &CreateTaskRequest,
        _bundle: &Path,
        _spec: &mut Spec,
    ) -> Result<(), ShimError> {
        self.ctl
            .hit("Attach", &req.id)
            .await
            .map_err(ShimError::from_err)
    }

    async fn detach_filesystems(&self, cid: &str) -> Result<(), ShimError> {
        self.ctl
            .hit("Detach", cid)
            .await
            .map_err(ShimError::from_err)
    }

    async fn start_relays(
        &self,
        _cid: &str,
        _exec_id: &str,
        _namespace: &str,
        _stdio: &StdioConfig,
    ) -> Result<Option<Relays>, StdioError> {
        Ok(None)
    }

    async fn create_container(
        &self,
        req: &CreateContainerRequest,
    ) -> Result<CreateContainerResponse, AgentError> {
        self.ctl.hit("CreateContainer", &req.container_id).await?;
        Ok(CreateContainerResponse {
            pid: 1,
            ..Default::default()
        })
    }

    async fn sync_network(&self) -> Result<(), ShimError> {
        self.ctl
            .hit("UpdateNetwork", &self.key.pod)
            .await
            .map_err(|e| ShimError::agent("UpdateNetwork", e))
    }

    async fn start_container(&self, cid: &str) -> Result<(), AgentError> {
        self.ctl.hit("StartContainer", cid).await
    }

    async fn exec_process(&self, req: &AgentExec) -> Result<ExecProcessResponse, AgentError> {
        self.ctl.hit("ExecProcess", &req.exec_id).await?;
        Ok(ExecProcessResponse {
            pid: 7,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        cid: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError> {
        let key = format!("{cid}/{exec_id}");
        let mut rx = self.ctl.exits.subscribe();
        let status = rx
            .wait_for(|m| m.contains_key(&key))
            .await
            .map(|m| m[&key])
            .unwrap_or(-1);
        Ok(WaitProcessResponse {
            exit_status: status,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.ctl.hit("SignalProcess", cid).await?;
        self.ctl.exit(cid, exec_id, 128 + signal as i32);
        Ok(())
    }

    async fn list_processes(&self, cid: &str) -> Result<ListProcessesResponse, AgentError> {
        self.ctl.hit("ListProcesses", cid).await?;
        Ok(ListProcessesResponse::default())
    }

    async fn resize_terminal(
        &self,
        cid: &str,
        _exec_id: &str,
        _rows: u32,
        _cols: u32,
    ) -> Result<(), AgentError> {
        self.ctl.hit("ResizeTerminal", cid).await
    }

    async fn pause_container(&self, cid: &str) -> Result<(), AgentError> {
        self.ctl.hit("PauseContainer", cid).await
    }

    async fn resume_container(&self, cid: &str) -> Result<(), AgentError> {
        self.ctl.hit("ResumeContainer", cid).await
    }

    async fn update_container(&self, cid: &str, _resources: Vec<u8>) -> Result<(), AgentError> {
        self.ctl.hit("UpdateContainer", cid).await
    }

    async fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse, AgentError> {
        self.ctl.hit("StatsContainer", cid).await?;
        Ok(StatsContainerResponse::default())
    }

    async fn remove_container(&self, cid: &str) -> Result<(), AgentError> {
        self.ctl.hit("RemoveContainer", cid).await
    }

    async fn shutdown(&self) {
        self.ctl.shutdowns.fetch_add(1, Ordering::SeqCst);
    }
}

struct FakeLauncher(Arc<Control>);

#[async_trait]
impl PodLauncher for FakeLauncher {
    async fn launch(
        &self,
        spec: &PodSpec,
        _config: &Config,
        _events: Arc<Events>,
    ) -> Result<Arc<dyn PodApi>, ShimError> {
        lock(&self.0.launches).push(spec.key.clone());
        self.0
            .hit("Launch", &spec.key.pod)
            .await
            .map_err(|e| ShimError::Vm(e.to_string()))?;
        Ok(Arc::new(FakePod {
            key: spec.key.clone(),
            ctl: self.0.clone(),
        }))
    }
}

/// A task service on a fake pod, and a bundle whose spec is the default.
struct Harness {
    svc: TaskService,
    ctl: Arc<Control>,
    bundle: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let ctl = Control::new();
        let svc = TaskService::with_launcher(
            ADDRESS,
            NAMESPACE,
            Events::recorded(NAMESPACE),
            Arc::new(ExitSignal::default()),
            Box::new(FakeLauncher(ctl.clone())),
        );
        let bundle = tempfile::tempdir().expect("tempdir");
        let spec = serde_json::to_vec(&Spec::default()).expect("spec");
        std::fs::write(bundle.path().join("config.json"), spec).expect("config.json");
        Self { svc, ctl, bundle }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.svc.inner
    }

    async fn create(&self, id: &str) -> Result<CreateTaskResponse, ShimError> {
        self.inner()
            .create(CreateTaskRequest {
                id: id.into(),
                bundle: self.bundle.path().display().to_string(),
                ..Default::default()
            })
            .await
    }

    async fn start(&self, id: &str) -> Result<StartResponse, ShimError> {
        self.inner()
            .start(StartRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
    }

    async fn delete(&self, id: &str) -> Result<DeleteResponse, ShimError> {
        self.inner()
            .delete(DeleteRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
    }

    fn status(&self, id: &str) -> Result<Status, ShimError> {
        let r = self.inner().state(&StateRequest {
            id: id.into(),
            ..Default::default()
        })?;
        Ok(r.status.enum_value_or_default())
    }

    fn topics(&self) -> Vec<String> {
        self.inner().events.topics()
    }
}

/// The ttrpc code `r` reaches containerd with.
fn code<T: std::fmt::Debug>(r: Result<T, ShimError>) -> ttrpc::Code {
    match ok(r) {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

#[tokio::test]
async fn create_start_wait_delete() {
    let h = Harness::new();
    let created = h.create("c1").await.expect("create");
    assert_eq!(created.pid, 1);
    assert_eq!(
        *lock(&h.ctl.launches),
        [PodKey::new(ADDRESS, NAMESPACE, "c1")],
        "the pod is keyed by containerd, namespace and id"
    );
    assert_eq!(h.status("c1").unwrap(), Status::CREATED);

    h.start("c1").await.expect("start");
    assert_eq!(h.status("c1").unwrap(), Status::RUNNING);
    let e = h.delete("c1").await.unwrap_err();
    assert!(matches!(e, ShimError::FailedPrecondition(_)), "{e}");

    let waiter = {
        let inner = h.inner().clone();
        tokio::spawn(async move {
            let (_c, p) = inner.process("c1", "")?;
            Ok::<_, ShimError>(p.wait().await.status)
        })
    };
    h.ctl.exit("c1", "", 3);
    let status = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("Wait returns once the process exits")
        .unwrap()
        .unwrap();
    assert_eq!(status, 3);
    assert_eq!(h.status("c1").unwrap(), Status::STOPPED);

    let deleted = h.delete("c1").await.expect("delete");
    assert_eq!(deleted.exit_status, 3);
    assert_eq!(h.ctl.count("RemoveContainer"), 1);
    assert_eq!(h.ctl.count("Detach"), 1);
    // The VM's power-off runs after Delete answered.
    h.inner().teardown_done().await;
    assert_eq!(
        h.ctl.shutdowns.load(Ordering::SeqCst),
        1,
        "the owner ends the pod"
    );
    assert_eq!(
        h.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(code(h.status("c1")), ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn calls_on_unknown_ids_are_not_found() {
    let h = Harness::new();
    assert_eq!(code(h.start("nope").await), ttrpc::Code::NOT_FOUND);
    assert_eq!(code(h.delete("nope").await), ttrpc::Code::NOT_FOUND);
    assert_eq!(code(h.status("nope")), ttrpc::Code::NOT_FOUND);
    let kill = h
        .inner()
        .kill(KillRequest {
            id: "nope".into(),
            signal: 9,
            ..Default::default()
        })
        .await;
    assert_eq!(code(kill), ttrpc::Code::NOT_FOUND);
    h.create("c1").await.expect("create");
    let exec = h
        .inner()
        .start(StartRequest {
            id: "c1".into(),
            exec_id: "nope".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(exec), ttrpc::Code::NOT_FOUND, "an unknown exec");
}

#[tokio::test]
async fn a_second_create_of_an_id_already_exists() {
    let h = Harness::new();
    h.create("c1").await.expect("create");
    assert_eq!(code(h.create("c1").await), ttrpc::Code::ALREADY_EXISTS);
    assert_eq!(h.ctl.count("CreateContainer"), 1);
}

#[tokio::test]
async fn of_two_concurrent_creates_of_one_id_one_goes_ahead() {
    let h = Arc::new(Harness::new());
    lock(&h.ctl.gated).insert("CreateContainer");
    let first = {
        let h = h.clone();
        tokio::spawn(async move { h.create("c1").await.map(|r| r.pid) })
    };
    // The first Create is inside the pod (VM booted, rootfs mounted) when
    // the second arrives.
    h.ctl.seen("CreateContainer", 1).await;
    let second = tokio::time::timeout(Duration::from_secs(5), h.create("c1"))
        .await
        .expect("the second Create fails at once, not after the first");
    assert_eq!(code(second), ttrpc::Code::ALREADY_EXISTS);
    h.ctl.gate.add_permits(1);
    assert_eq!(first.await.unwrap().expect("the first Create"), 1);
    assert_eq!(lock(&h.ctl.launches).len(), 1, "one VM");
    assert_eq!(h.ctl.count("Attach"), 1, "one rootfs mount");
    assert_eq!(
        h.ctl.count("Detach"),
        0,
        "the loser undid nothing of the winner's"
    );
    assert_eq!(h.status("c1").unwrap(), Status::CREATED);
}

#[tokio::test]
async fn a_failed_create_frees_its_id_and_its_pod() {
    let h = Harness::new();
    lock(&h.ctl.fail_once).insert("CreateContainer", ttrpc::Code::INVALID_ARGUMENT);
    let e = h.create("c1").await;
    assert_eq!(
        code(e),
        ttrpc::Code::INVALID_ARGUMENT,
        "the agent's kind is kept"
    );
    assert_eq!(h.ctl.count("Detach"), 1);
    assert_eq!(h.ctl.shutdowns.load(Ordering::SeqCst), 1, "the new VM goes");
    assert_eq!(code(h.status("c1")), ttrpc::Code::NOT_FOUND);
    h.create("c1").await.expect("the id is free again");
    assert_eq!(lock(&h.ctl.launches).len(), 2);
}

#[tokio::test]
async fn a_create_whose_vm_fails_is_unavailable() {
    let h = Harness::new();
    lock(&h.ctl.fail_once).insert("Launch", ttrpc::Code::INTERNAL);
    assert_eq!(code(h.create("c1").await), ttrpc::Code::UNAVAILABLE);
    h.create("c1").await.expect("the id is free again");
}

#[tokio::test]
async fn a_second_start_is_refused() {
    let h = Harness::new();
    h.create("c1").await.expect("create");
    h.start("c1").await.expect("start");
    assert_eq!(code(h.start("c1").await), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(h.ctl.count("StartContainer"), 1);
}

#[tokio::test]
async fn of_two_concurrent_starts_one_goes_ahead() {
    let h = Arc::new(Harness::new());
    h.create("c1").await.expect("create");
    lock(&h.ctl.gated).insert("StartContainer");
    let first = {
        let h = h.clone();
        tokio::spawn(async move { h.start("c1").await.map(|r| r.pid) })
    };
    h.ctl.seen("StartContainer", 1).await;
    let second = tokio::time::timeout(Duration::from_secs(5), h.start("c1"))
        .await
        .expect("the second Start fails at once, not after the first");
    assert_eq!(code(second), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(
        code(h.delete("c1").await),
        ttrpc::Code::FAILED_PRECONDITION,
        "a process being started is not deleted under the Start"
    );
    h.ctl.gate.add_permits(1);
    assert_eq!(first.await.unwrap().expect("the first Start"), 1);
    assert_eq!(h.ctl.count("StartContainer"), 1);
    assert_eq!(h.status("c1").unwrap(), Status::RUNNING);
    assert_eq!(
        h.topics().iter().filter(|t| *t == "/tasks/start").count(),
        1
    );
}

#[tokio::test]
async fn a_failed_start_can_be_retried() {
    let h = Harness::new();
    h.create("c1").await.expect("create");
    lock(&h.ctl.fail_once).insert("StartContainer", ttrpc::Code::NOT_FOUND);
    assert_eq!(code(h.start("c1").await), ttrpc::Code::NOT_FOUND);
    assert_eq!(h.status("c1").unwrap(), Status::CREATED);
    h.start("c1").await.expect("the retry");
    assert_eq!(h.status("c1").unwrap(), Status::RUNNING);
}

#[tokio::test]
async fn the_pods_network_is_synced_before_its_first_container_starts() {
    let h = Harness::new();
    h.create("c1").await.expect("create");
    lock(&h.ctl.fail_once).insert("UpdateNetwork", ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(code(h.start("c1").await), ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(
        h.ctl.count("StartContainer"),
        0,
        "no start on a stale network"
    );
    assert_eq!(h.status("c1").unwrap(), Status::CREATED);
    h.start("c1").await.expect("the retry");
    let calls = lock(&h.ctl.calls).clone();
    let sync = calls.iter().rposition(|c| c.starts_with("UpdateNetwork"));
    let start = calls.iter().position(|c| c.starts_with("StartContainer"));
    assert!(sync < start, "{calls:?}");
}

#[tokio::test]
async fn exec_start_kill_and_wait() {
    let h = Harness::new();
    h.create("c1").await.expect("create");
    h.start("c1").await.expect("start");
    let exec = |id: &str| ExecProcessRequest {
        id: "c1".into(),
        exec_id: id.into(),
        spec: MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::any::Any {
                value: b"{}".to_vec(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    h.inner().exec(exec("e1")).await.expect("exec");
    assert_eq!(
        code(h.inner().exec(exec("e1")).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let started = h
        .inner()
        .start(StartRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .await
        .expect("start the exec");
    assert_eq!(started.pid, 7);
    h.inner()
        .kill(KillRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            signal: 9,
            ..Default::default()
        })
        .await
        .expect("kill");
    let (_c, p) = h.inner().process("c1", "e1").unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), p.wait())
        .await
        .expect("the exec exits");
    assert_eq!(e.status, 137);
}

#[tokio::test]
async fn calls_without_a_pod_are_failed_preconditions() {
    let h = Harness::new();
    let e = h.inner().current_pod().await.map(|_| ());
    assert_eq!(code(e), ttrpc::Code::FAILED_PRECONDITION);
}

#[test]
fn agent_errors_keep_their_kind_and_the_rest_are_unavailable() {
    let rpc = |c: ttrpc::Code| AgentError::Rpc {
        call: "X",
        source: ttrpc::Error::RpcStatus(ttrpc::get_status(c, "no")),
    };
    for c in [
        ttrpc::Code::NOT_FOUND,
        ttrpc::Code::ALREADY_EXISTS,
        ttrpc::Code::INVALID_ARGUMENT,
        ttrpc::Code::FAILED_PRECONDITION,
        ttrpc::Code::UNIMPLEMENTED,
    ] {
        assert_eq!(code::<()>(Err(ShimError::agent("X", rpc(c)))), c);
    }
    assert_eq!(
        code::<()>(Err(ShimError::agent("X", rpc(ttrpc::Code::INTERNAL)))),
        ttrpc::Code::UNAVAILABLE
    );
    let timeout = AgentError::Timeout {
        call: "X",
        after: Duration::from_secs(1),
    };
    assert_eq!(
        code::<()>(Err(ShimError::agent("X", timeout))),
        ttrpc::Code::UNAVAILABLE
    );
    assert_eq!(
        code::<()>(Err(ShimError::Internal("x".into()))),
        ttrpc::Code::INTERNAL
    );
}
