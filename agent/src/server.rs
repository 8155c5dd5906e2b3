//! The ttrpc `Agent` service: decodes requests, calls the engine, encodes
//! replies and errors.

use std::sync::Arc;

use async_trait::async_trait;
use nutshell_protocol::agent as pb;
use nutshell_protocol::agent_ttrpc::Agent;
use tokio::sync::mpsc;
use ttrpc::r#async::TtrpcContext;

use crate::container::Engine;

/// The service object registered with the ttrpc server.
pub struct AgentService {
    engine: Arc<Engine>,
    pid1: bool,
    shutdown: mpsc::Sender<String>,
}

impl AgentService {
    /// Creates the service; the receiver yields a reason when the agent
    /// should stop (DestroySandbox).
    pub fn new(pid1: bool) -> anyhow::Result<(Self, mpsc::Receiver<String>)> {
        let (tx, rx) = mpsc::channel(1);
        let engine = Engine::new(pid1).map_err(|e| anyhow::anyhow!("starting the reaper: {e}"))?;
        Ok((
            Self {
                engine: Arc::new(engine),
                pid1,
                shutdown: tx,
            },
            rx,
        ))
    }

    /// The container engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

fn empty() -> pb::Empty {
    pb::Empty::default()
}

fn time_parts(t: std::time::SystemTime) -> (i64, i32) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn read_u64(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

#[async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        Ok(pb::HealthResponse {
            status: "SERVING".to_string(),
            agent_version: crate::AGENT_VERSION.to_string(),
            protocol_version: nutshell_protocol::PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    async fn guest_details(
        &self,
        _ctx: &TtrpcContext,
        _: pb::GuestDetailsRequest,
    ) -> ttrpc::Result<pb::GuestDetailsResponse> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Ok(pb::GuestDetailsResponse {
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: crate::AGENT_VERSION.to_string(),
            mem_total_bytes: read_u64(&meminfo, "MemTotal:") * 1024,
            mem_available_bytes: read_u64(&meminfo, "MemAvailable:") * 1024,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            cgroup_v2: crate::cgroup::available(),
            pid1: self.pid1,
            ..Default::default()
        })
    }

    async fn set_time(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SetTimeRequest,
    ) -> ttrpc::Result<pb::Empty> {
        if !(0..1_000_000_000).contains(&req.nsec) || req.sec < 0 {
            return Err(crate::error::AgentError::invalid(format!(
                "time {}.{} is out of range",
                req.sec, req.nsec
            ))
            .into());
        }
        let ts = nix::sys::time::TimeSpec::new(req.sec, req.nsec.into());
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
            crate::error::AgentError::internal(format!("setting the clock failed: {e}"))
        })?;
        Ok(pb::Empty::default())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _: pb::DestroySandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine.destroy_all().await;
        if self.pid1 {
            let tx = self.shutdown.clone();
            // Give the reply time to leave before the guest powers off.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let _ = tx.send("DestroySandbox".to_string()).await;
            });
        }
        Ok(pb::Empty::default())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine.create_sandbox(&req).await?;
        Ok(empty())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let pid = self
            .engine
            .create_container(&req.container_id, &req.spec_json, &req.rootfs, req.stdin)
            .await?;
        Ok(pb::CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine.start_container(&req.container_id).await?;
        Ok(empty())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        let pid = self
            .engine
            .exec_process(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                req.stdin,
            )
            .await?;
        Ok(pb::ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let exit = self
            .engine
            .wait_process(&req.container_id, &req.exec_id)
            .await?;
        let (sec, nsec) = time_parts(exit.at);
        Ok(pb::WaitProcessResponse {
            exit_status: exit.status,
            signal: exit.signal,
            exited_at_sec: sec,
            exited_at_nsec: nsec,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine
            .signal_process(&req.container_id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(empty())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        let procs = self.engine.list_processes(&req.container_id).await?;
        Ok(pb::ListProcessesResponse {
            processes: procs
                .into_iter()
                .map(|(pid, exec_id)| pb::ProcessInfo {
                    pid: pid as u32,
                    exec_id,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> ttrpc::Result<pb::WriteStdinResponse> {
        let n = self
            .engine
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await?;
        Ok(pb::WriteStdinResponse {
            written: n as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine
            .close_stdin(&req.container_id, &req.exec_id)
            .await?;
        Ok(empty())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadOutputRequest,
    ) -> ttrpc::Result<pb::ReadOutputResponse> {
        let (data, eof) = self
            .engine
            .read_output(&req.container_id, &req.exec_id, false, req.max_bytes)
            .await?;
        Ok(pb::ReadOutputResponse {
            data,
            eof,
            ..Default::default()
        })
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadOutputRequest,
    ) -> ttrpc::Result<pb::ReadOutputResponse> {
        let (data, eof) = self
            .engine
            .read_output(&req.container_id, &req.exec_id, true, req.max_bytes)
            .await?;
        Ok(pb::ReadOutputResponse {
            data,
            eof,
            ..Default::default()
        })
    }

    async fn resize_terminal(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizeTerminalRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .await?;
        Ok(empty())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine.freeze(&req.container_id, true).await?;
        Ok(empty())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine.freeze(&req.container_id, false).await?;
        Ok(empty())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.engine
            .update(&req.container_id, &req.resources_json)
            .await?;
        Ok(empty())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        Ok(self.engine.stats(&req.container_id).await?)
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _: pb::GetOomEventRequest,
    ) -> ttrpc::Result<pb::OomEvent> {
        let id = self.engine.next_oom().await?;
        Ok(pb::OomEvent {
            container_id: id,
            ..Default::default()
        })
    }

    async fn update_network(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateNetworkRequest,
    ) -> ttrpc::Result<pb::Empty> {
        crate::network::update(&req).await?;
        Ok(empty())
    }

    async fn warm_up(&self, _ctx: &TtrpcContext, _: pb::WarmUpRequest) -> ttrpc::Result<pb::Empty> {
        // A directory of root's alone: /tmp is the agent's own tmpfs in a
        // guest.
        let took = self.engine.warm_up(&std::env::temp_dir()).await?;
        tracing::info!(elapsed_ms = took.as_millis() as u64, "warmed up");
        Ok(empty())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        if req.exec_id.is_empty() {
            self.engine.remove_container(&req.container_id).await?;
        } else {
            self.engine
                .remove_exec(&req.container_id, &req.exec_id)
                .await?;
        }
        Ok(empty())
    }
}
