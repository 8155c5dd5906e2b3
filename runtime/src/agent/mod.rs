//! The host side of the agent protocol: dial the agent (hybrid vsock or a
//! Unix socket), check its health and protocol version, then carry every
//! call of `nutshell_protocol` with a timeout (except the calls that block by
//! design) and with the VM's end as a second way out, so no call waits on a
//! dead guest.
//!
//! The agent runs in the guest, so its replies are untrusted: ttrpc bounds
//! each message at 4 MiB, the dial handshake is bounded, and replies are
//! checked where a bound is known (stdio chunks, strings).

mod dial;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nutshell_protocol::agent::{
    CloseStdinRequest, ContainerRequest, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, DestroySandboxRequest, ExecProcessRequest, ExecProcessResponse,
    GetOomEventRequest, GuestDetailsRequest, GuestDetailsResponse, HealthRequest, HealthResponse,
    ListProcessesRequest, ListProcessesResponse, OomEvent, ReadOutputRequest, ReadOutputResponse,
    RemoveContainerRequest, ResizeTerminalRequest, SetTimeRequest, SignalProcessRequest,
    StartContainerRequest, StatsContainerResponse, UpdateContainerRequest, WaitProcessRequest,
    WaitProcessResponse, WriteStdinRequest, WriteStdinResponse,
};
use nutshell_protocol::agent_ttrpc;
use ttrpc::context::{self, Context};

use crate::hypervisor::{sanitize_line, VmEndWatch, VmExit};

pub use dial::{AgentAddress, DialOptions};

/// Longest string field accepted from the agent (versions, kernel release,
/// ids): anything longer is a misbehaving guest.
const MAX_REPLY_STRING: usize = 4096;
/// How long a call whose connection broke waits to learn whether the VM
/// ended (its processes are reaped within milliseconds of dying).
const BROKEN_LINK_GRACE: Duration = Duration::from_millis(500);
/// Most processes a ListProcesses reply may name.
const MAX_LISTED_PROCESSES: usize = 65536;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket exists but may not be used.
    #[error("cannot connect to the agent at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer before the dial deadline.
    #[error(
        "the agent at {address} did not answer within {waited:?} ({attempts} attempts; last: {last_error})"
    )]
    DialTimeout {
        address: String,
        waited: Duration,
        attempts: u32,
        last_error: String,
    },
    /// The hybrid-vsock backend answered something other than `OK <port>`.
    #[error("the hybrid vsock handshake with {address} failed: {reason}")]
    Handshake { address: String, reason: String },
    /// The VM ended while a call (or the dial) was waiting.
    #[error("the VM ended while waiting for {during}: {exit}")]
    VmEnded {
        during: &'static str,
        exit: Box<VmExit>,
    },
    /// The agent is up but does not report itself as serving.
    #[error("the agent reports status {0:?} instead of SERVING")]
    NotServing(String),
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {agent}, this runtime speaks {runtime}")]
    ProtocolMismatch { agent: u32, runtime: u32 },
    /// A call did not complete in time.
    #[error("agent call {call} timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    /// A call failed: the agent returned an error, or the connection broke.
    #[error("agent call {call} failed")]
    Rpc {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// The agent's reply breaks the protocol's bounds.
    #[error("agent call {call} returned an invalid reply: {reason}")]
    InvalidReply { call: &'static str, reason: String },
}

impl AgentError {
    /// The status code the agent returned, when the agent itself refused the
    /// call (for mapping onto containerd's errors, e.g. `NOT_FOUND`).
    pub fn rpc_code(&self) -> Option<ttrpc::Code> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => Some(s.code()),
            _ => None,
        }
    }

    /// The agent's own error message, when it refused the call.
    pub fn rpc_message(&self) -> Option<&str> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => Some(s.message()),
            _ => None,
        }
    }
}

/// A connected, healthy agent. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    raw: agent_ttrpc::AgentClient,
    call_timeout: Duration,
    vm_end: Option<VmEndWatch>,
    health: HealthResponse,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_version", &self.health.agent_version)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Dials the agent at `address` (retrying until `opts.deadline`), runs
    /// Health and checks the protocol version. With `vm_end`, the dial and
    /// every later call fail as soon as the VM ends, quoting its console.
    pub async fn connect(
        address: &AgentAddress,
        opts: &DialOptions,
        vm_end: Option<VmEndWatch>,
    ) -> Result<Self, AgentError> {
        let stream = dial::dial(address, opts, vm_end.as_ref()).await?;
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        let raw = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket));
        let mut me = Self {
            raw,
            call_timeout: opts.call_timeout,
            vm_end,
            health: HealthResponse::default(),
        };
        let health = me.health().await?;
        if health.status != "SERVING" {
            return Err(AgentError::NotServing(sanitize_line(&health.status)));
        }
        if health.protocol_version != nutshell_protocol::PROTOCOL_VERSION {
            return Err(AgentError::ProtocolMismatch {
                agent: health.protocol_version,
                runtime: nutshell_protocol::PROTOCOL_VERSION,
            });
        }
        tracing::debug!(agent_version = %sanitize_line(&health.agent_version), "agent healthy");
        me.health = health;
        Ok(me)
    }

    /// The generated ttrpc client, for calls this wrapper does not cover.
    /// Calls made through it have no VM-end watch and only the timeout the
    /// caller gives.
    pub fn raw(&self) -> &agent_ttrpc::AgentClient {
        &self.raw
    }

    /// The agent's version, as its Health reported it (sanitised).
    pub fn agent_version(&self) -> String {
        sanitize_line(&self.health.agent_version)
    }

    /// Limit for each call that does not block by design.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    fn ctx(&self, blocking: bool) -> Context {
        if blocking {
            Context::default()
        } else {
            // The agent learns the deadline too (to give up on its side); it
            // is a little later than the client's own, so a late reply is
            // always reported as our `Timeout`.
            context::with_duration(self.call_timeout + Duration::from_secs(1))
        }
    }

    /// Runs one call: bounded by the call timeout unless `blocking`, and cut
    /// short when the VM ends.
    async fn call<T>(
        &self,
        name: &'static str,
        blocking: bool,
        fut: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        let limit = self.call_timeout;
        let bounded = async {
            let r = if blocking {
                fut.await
            } else {
                tokio::time::timeout(limit, fut)
                    .await
                    .map_err(|_| AgentError::Timeout {
                        call: name,
                        after: limit,
                    })?
            };
            r.map_err(|source| AgentError::Rpc { call: name, source })
        };
        let Some(end) = &self.vm_end else {
            return bounded.await;
        };
        let ended = |exit| AgentError::VmEnded {
            during: name,
            exit: Box::new(exit),
        };
        match tokio::select! {
            r = bounded => r,
            exit = end.wait() => return Err(ended(exit)),
        } {
            // The connection broke: when the VM is dying, its end (reaped a
            // moment later) is the error worth reporting.
            Err(AgentError::Rpc { source, .. })
                if !matches!(source, ttrpc::Error::RpcStatus(_)) =>
            {
                match tokio::time::timeout(BROKEN_LINK_GRACE, end.wait()).await {
                    Ok(exit) => Err(ended(exit)),
                    Err(_) => Err(AgentError::Rpc { call: name, source }),
                }
            }
            r => r,
        }
    }

    /// Health: status, agent and protocol versions.
    pub async fn health(&self) -> Result<HealthResponse, AgentError> {
        let r = self
            .call(
                "Health",
                false,
                self.raw.health(self.ctx(false), &HealthRequest::default()),
            )
            .await?;
        check_len("Health", "agent_version", &r.agent_version)?;
        check_len("Health", "status", &r.status)?;
        Ok(r)
    }

    /// Kernel release, agent version, memory and CPUs of the guest.
    pub async fn guest_details(&self) -> Result<GuestDetailsResponse, AgentError> {
        let r = self
            .call(
                "GuestDetails",
                false,
                self.raw
                    .guest_details(self.ctx(false), &GuestDetailsRequest::default()),
            )
            .await?;
        check_len("GuestDetails", "kernel_release", &r.kernel_release)?;
        check_len("GuestDetails", "agent_version", &r.agent_version)?;
        if r.mem_available_bytes > r.mem_total_bytes {
            return Err(AgentError::InvalidReply {
                call: "GuestDetails",
                reason: "more memory available than there is".into(),
            });
        }
        Ok(r)
    }

    /// Sets the guest clock to `now`.
    pub async fn set_time(&self, now: SystemTime) -> Result<(), AgentError> {
        let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let req = SetTimeRequest {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            ..Default::default()
        };
        self.call("SetTime", false, self.raw.set_time(self.ctx(false), &req))
            .await
            .map(drop)
    }

    /// Sets the sandbox up (hostname, DNS, storages such as the shared
    /// directory).
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), AgentError> {
        self.call(
            "CreateSandbox",
            false,
            self.raw.create_sandbox(self.ctx(false), req),
        )
        .await
        .map(drop)
    }

    /// Stops every container; the guest then powers off.
    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.call(
            "DestroySandbox",
            false,
            self.raw
                .destroy_sandbox(self.ctx(false), &DestroySandboxRequest::default()),
        )
        .await
        .map(drop)
    }

    /// Creates a container; its init process waits for
    /// [`Self::start_container`].
    pub async fn create_container(
        &self,
        req: &CreateContainerRequest,
    ) -> Result<CreateContainerResponse, AgentError> {
        self.call(
            "CreateContainer",
            false,
            self.raw.create_container(self.ctx(false), req),
        )
        .await
    }

    /// Starts a created container's init process.
    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.call(
            "StartContainer",
            false,
            self.raw.start_container(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// Runs another process in a container.
    pub async fn exec_process(
        &self,
        req: &ExecProcessRequest,
    ) -> Result<ExecProcessResponse, AgentError> {
        self.call(
            "ExecProcess",
            false,
            self.raw.exec_process(self.ctx(false), req),
        )
        .await
    }

    /// Blocks until the process exits (`exec_id` empty: the init process).
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError> {
        let req = WaitProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call(
            "WaitProcess",
            true,
            self.raw.wait_process(self.ctx(true), &req),
        )
        .await
    }

    /// Sends a signal to a process, or with `all` to every process of the
    /// container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.call(
            "SignalProcess",
            false,
            self.raw.signal_process(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// The processes of a container.
    pub async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<ListProcessesResponse, AgentError> {
        let req = ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        let r = self
            .call(
                "ListProcesses",
                false,
                self.raw.list_processes(self.ctx(false), &req),
            )
            .await?;
        if r.processes.len() > MAX_LISTED_PROCESSES {
            return Err(AgentError::InvalidReply {
                call: "ListProcesses",
                reason: format!("{} processes listed", r.processes.len()),
            });
        }
        Ok(r)
    }

    /// Writes to a process's stdin; returns how much was taken.
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<u32, AgentError> {
        let req = WriteStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        let r: WriteStdinResponse = self
            .call(
                "WriteStdin",
                false,
                self.raw.write_stdin(self.ctx(false), &req),
            )
            .await?;
        if r.written as usize > data.len() {
            return Err(AgentError::InvalidReply {
                call: "WriteStdin",
                reason: format!("{} bytes written of {}", r.written, data.len()),
            });
        }
        Ok(r.written)
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call(
            "CloseStdin",
            false,
            self.raw.close_stdin(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// Blocks until a process has stdout data (at most `max_bytes`) or EOF.
    pub async fn read_stdout(
        &self,
        container_id: &str,
        exec_id: &str,
        max_bytes: u32,
    ) -> Result<ReadOutputResponse, AgentError> {
        let req = output_request(container_id, exec_id, max_bytes);
        let r = self
            .call(
                "ReadStdout",
                true,
                self.raw.read_stdout(self.ctx(true), &req),
            )
            .await?;
        check_output("ReadStdout", &r, req.max_bytes)?;
        Ok(r)
    }

    /// Blocks until a process has stderr data (at most `max_bytes`) or EOF.
    pub async fn read_stderr(
        &self,
        container_id: &str,
        exec_id: &str,
        max_bytes: u32,
    ) -> Result<ReadOutputResponse, AgentError> {
        let req = output_request(container_id, exec_id, max_bytes);
        let r = self
            .call(
                "ReadStderr",
                true,
                self.raw.read_stderr(self.ctx(true), &req),
            )
            .await?;
        check_output("ReadStderr", &r, req.max_bytes)?;
        Ok(r)
    }

    /// Resizes a process's terminal.
    pub async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTerminalRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.call(
            "ResizeTerminal",
            false,
            self.raw.resize_terminal(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// Freezes every process of a container.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        self.call(
            "PauseContainer",
            false,
            self.raw.pause_container(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// Thaws a paused container.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        self.call(
            "ResumeContainer",
            false,
            self.raw.resume_container(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// Changes a container's resources (`resources_json`: OCI
    /// `LinuxResources` as JSON).
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json,
            ..Default::default()
        };
        self.call(
            "UpdateContainer",
            false,
            self.raw.update_container(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }

    /// cgroup statistics of a container.
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, AgentError> {
        let req = container_request(container_id);
        self.call(
            "StatsContainer",
            false,
            self.raw.stats_container(self.ctx(false), &req),
        )
        .await
    }

    /// Blocks until a container of the sandbox is OOM-killed.
    pub async fn get_oom_event(&self) -> Result<OomEvent, AgentError> {
        let r = self
            .call(
                "GetOomEvent",
                true,
                self.raw
                    .get_oom_event(self.ctx(true), &GetOomEventRequest::default()),
            )
            .await?;
        check_len("GetOomEvent", "container_id", &r.container_id)?;
        Ok(r)
    }

    /// Kills what is left of a container and frees it.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.call(
            "RemoveContainer",
            false,
            self.raw.remove_container(self.ctx(false), &req),
        )
        .await
        .map(drop)
    }
}

fn container_request(container_id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: container_id.into(),
        ..Default::default()
    }
}

fn output_request(container_id: &str, exec_id: &str, max_bytes: u32) -> ReadOutputRequest {
    ReadOutputRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        max_bytes: max_bytes.clamp(1, nutshell_protocol::MAX_STDIO_CHUNK),
        ..Default::default()
    }
}

fn check_len(call: &'static str, field: &str, value: &str) -> Result<(), AgentError> {
    if value.len() > MAX_REPLY_STRING {
        return Err(AgentError::InvalidReply {
            call,
            reason: format!("{field} is {} bytes long", value.len()),
        });
    }
    Ok(())
}

fn check_output(
    call: &'static str,
    r: &ReadOutputResponse,
    max_bytes: u32,
) -> Result<(), AgentError> {
    if r.data.len() > max_bytes as usize {
        return Err(AgentError::InvalidReply {
            call,
            reason: format!("{} bytes sent for at most {max_bytes}", r.data.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nutshell_protocol::agent::Empty;
    use std::sync::Arc;
    use ttrpc::r#async::TtrpcContext;

    #[test]
    fn output_bounds_are_enforced() {
        let req = output_request("c", "", 0);
        assert_eq!(req.max_bytes, 1);
        let req = output_request("c", "", u32::MAX);
        assert_eq!(req.max_bytes, nutshell_protocol::MAX_STDIO_CHUNK);
        let r = ReadOutputResponse {
            data: vec![0; 11],
            ..Default::default()
        };
        assert!(check_output("ReadStdout", &r, 10).is_err());
        assert!(check_output("ReadStdout", &r, 11).is_ok());
        assert!(check_len("Health", "x", &"a".repeat(MAX_REPLY_STRING + 1)).is_err());
    }

    /// An agent that lies and stalls, to test the client's guards.
    struct FakeAgent {
        protocol_version: u32,
    }

    #[async_trait::async_trait]
    impl agent_ttrpc::Agent for FakeAgent {
        async fn health(
            &self,
            _: &TtrpcContext,
            _: HealthRequest,
        ) -> ttrpc::Result<HealthResponse> {
            Ok(HealthResponse {
                status: "SERVING".into(),
                agent_version: "fake".into(),
                protocol_version: self.protocol_version,
                ..Default::default()
            })
        }
        async fn guest_details(
            &self,
            _: &TtrpcContext,
            _: GuestDetailsRequest,
        ) -> ttrpc::Result<GuestDetailsResponse> {
            Ok(GuestDetailsResponse {
                mem_total_bytes: 1,
                mem_available_bytes: 2,
                ..Default::default()
            })
        }
        async fn read_stdout(
            &self,
            _: &TtrpcContext,
            _: ReadOutputRequest,
        ) -> ttrpc::Result<ReadOutputResponse> {
            Ok(ReadOutputResponse {
                data: vec![b'x'; 100],
                ..Default::default()
            })
        }
        async fn wait_process(
            &self,
            _: &TtrpcContext,
            _: WaitProcessRequest,
        ) -> ttrpc::Result<WaitProcessResponse> {
            std::future::pending().await
        }
        async fn pause_container(
            &self,
            _: &TtrpcContext,
            _: ContainerRequest,
        ) -> ttrpc::Result<Empty> {
            std::future::pending().await
        }
    }

    async fn serve(
        dir: &std::path::Path,
        protocol_version: u32,
    ) -> (ttrpc::r#async::Server, AgentAddress) {
        let path = dir.join("agent.sock");
        let service = agent_ttrpc::create_agent(Arc::new(FakeAgent { protocol_version }));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        (server, AgentAddress::Unix(path))
    }

    fn opts() -> DialOptions {
        DialOptions {
            deadline: Duration::from_secs(5),
            call_timeout: Duration::from_millis(300),
            ..DialOptions::default()
        }
    }

    #[tokio::test]
    async fn replies_out_of_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
        let c = AgentClient::connect(&addr, &opts(), None).await.unwrap();
        assert_eq!(c.agent_version(), "fake");
        let e = c.guest_details().await.unwrap_err();
        assert!(matches!(e, AgentError::InvalidReply { .. }), "{e}");
        let e = c.read_stdout("c", "", 10).await.unwrap_err();
        assert!(
            e.to_string().contains("100 bytes sent for at most 10"),
            "{e}"
        );
        // Unimplemented calls carry the agent's code.
        let e = c.start_container("c").await.unwrap_err();
        assert_eq!(e.rpc_code(), Some(ttrpc::Code::NOT_FOUND));
    }

    /// A proxy in front of the fake agent whose link can be cut.
    async fn cuttable(
        dir: &std::path::Path,
        to: AgentAddress,
    ) -> (AgentAddress, tokio::task::JoinHandle<()>) {
        let AgentAddress::Unix(target) = to else {
            unreachable!()
        };
        let path = dir.join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let link = tokio::spawn(async move {
            let (mut a, _) = listener.accept().await.unwrap();
            let mut b = tokio::net::UnixStream::connect(target).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
        (AgentAddress::Unix(path), link)
    }

    #[tokio::test]
    async fn a_broken_connection_of_a_dying_vm_reports_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
        let (addr, link) = cuttable(dir.path(), addr).await;
        let (end, watch) = VmEndWatch::for_test();
        let c = AgentClient::connect(&addr, &opts(), Some(watch))
            .await
            .unwrap();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_process("c", "").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The link breaks first; the VM's end is published a moment later.
        link.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiter.is_finished(),
            "the broken link was reported before the VM's end"
        );
        end(crate::hypervisor::supervisor::lost_supervisor());
        let e = waiter.await.unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::VmEnded {
                    during: "WaitProcess",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_broken_connection_of_a_live_vm_is_an_rpc_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
        let (addr, link) = cuttable(dir.path(), addr).await;
        let (_end, watch) = VmEndWatch::for_test();
        let c = AgentClient::connect(&addr, &opts(), Some(watch))
            .await
            .unwrap();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_process("c", "").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        link.abort();
        let e = tokio::time::timeout(Duration::from_secs(3), waiter)
            .await
            .expect("a broken link left the call hanging")
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Rpc {
                    call: "WaitProcess",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION + 1).await;
        let e = AgentClient::connect(&addr, &opts(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::ProtocolMismatch { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_stalled_call_times_out_and_a_blocking_one_ends_with_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
        let (end, watch) = VmEndWatch::for_test();
        let c = AgentClient::connect(&addr, &opts(), Some(watch))
            .await
            .unwrap();
        let e = c.pause_container("c").await.unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Timeout {
                    call: "PauseContainer",
                    ..
                }
            ),
            "{e}"
        );

        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_process("c", "").await })
        };
        // WaitProcess blocks by design: no timeout ends it...
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished());
        // ...but the VM's end does, at once, with the console quoted.
        let mut exit = crate::hypervisor::supervisor::lost_supervisor();
        exit.console_tail = vec!["Kernel panic - not syncing".into()];
        end(exit);
        let e = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("Kernel panic - not syncing"), "{e}");
        assert!(matches!(
            e,
            AgentError::VmEnded {
                during: "WaitProcess",
                ..
            }
        ));
    }
}
