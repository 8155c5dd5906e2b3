//! One method per call of the protocol, each with the bounds its reply
//! must keep.

use std::time::{SystemTime, UNIX_EPOCH};

use nutshell_protocol::agent::{
    CloseStdinRequest, ContainerRequest, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, DestroySandboxRequest, ExecProcessRequest, ExecProcessResponse,
    GetOomEventRequest, GuestDetailsRequest, GuestDetailsResponse, HealthRequest, HealthResponse,
    ListProcessesRequest, ListProcessesResponse, OomEvent, ReadOutputRequest, ReadOutputResponse,
    RemoveContainerRequest, ResizeTerminalRequest, SetTimeRequest, SignalProcessRequest,
    StartContainerRequest, StatsContainerResponse, UpdateContainerRequest, UpdateNetworkRequest,
    WaitProcessRequest, WaitProcessResponse, WarmUpRequest, WriteStdinRequest, WriteStdinResponse,
};

use super::{AgentClient, AgentError};

/// Longest string field accepted from the agent (versions, kernel release,
/// ids): anything longer is a misbehaving guest.
pub(super) const MAX_REPLY_STRING: usize = 4096;
/// Most processes a ListProcesses reply may name.
const MAX_LISTED_PROCESSES: usize = 65536;

impl AgentClient {
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

    /// Configures the pod's network in the guest: exactly these NICs'
    /// addresses, routes and neighbours.
    pub async fn update_network(&self, req: &UpdateNetworkRequest) -> Result<(), AgentError> {
        self.call(
            "UpdateNetwork",
            false,
            self.raw.update_network(self.ctx(false), req),
        )
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

    /// Has an idle agent create and remove a throw-away container, so that
    /// a pod's first create runs code the guest has run before.
    pub async fn warm_up(&self) -> Result<(), AgentError> {
        self.call(
            "WarmUp",
            false,
            self.raw.warm_up(self.ctx(false), &WarmUpRequest::default()),
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

pub(super) fn output_request(
    container_id: &str,
    exec_id: &str,
    max_bytes: u32,
) -> ReadOutputRequest {
    ReadOutputRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        max_bytes: max_bytes.clamp(1, nutshell_protocol::MAX_STDIO_CHUNK),
        ..Default::default()
    }
}

pub(super) fn check_len(call: &'static str, field: &str, value: &str) -> Result<(), AgentError> {
    if value.len() > MAX_REPLY_STRING {
        return Err(AgentError::InvalidReply {
            call,
            reason: format!("{field} is {} bytes long", value.len()),
        });
    }
    Ok(())
}

pub(super) fn check_output(
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
