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
        Ok((
            Self {
                engine: Arc::new(Engine::default()),
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
        let tx = self.shutdown.clone();
        // Give the reply time to leave before the guest powers off.
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let _ = tx.send("DestroySandbox".to_string()).await;
        });
        Ok(pb::Empty::default())
    }
}
