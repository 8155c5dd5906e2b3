//! The task API's ttrpc methods, each onto [`Inner`]'s state machine.

use async_trait::async_trait;
use containerd_shim::{TtrpcContext, TtrpcResult};
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;

use super::TaskService;
use crate::shim::{metrics, ShimError};

pub(super) fn ok<T>(r: Result<T, ShimError>) -> TtrpcResult<T> {
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
            pod.resize_terminal(&req.id, &req.exec_id, req.height, req.width)
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
            pod.update_container(&req.id, resources)
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
