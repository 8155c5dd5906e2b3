//! A pod's VM together with its connected agent: the unit the shim holds.

use std::time::{Duration, SystemTime};

use nutshell_protocol::agent::{CreateSandboxRequest, Storage};

use crate::agent::{AgentAddress, AgentClient, AgentError, DialOptions};
use crate::hypervisor::{
    format_tail, Hypervisor, HypervisorError, RunningVm, VmConfig, VmExit, SHARED_DIR_TAG,
};

/// Where the agent mounts the pod's shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/nutshell/shared";

/// How long the agent gets to answer DestroySandbox during a shutdown.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);

/// The `Storage` entry for CreateSandbox that mounts the pod's shared
/// directory (virtio-fs tag [`SHARED_DIR_TAG`]) at [`GUEST_SHARED_DIR`].
fn shared_dir_storage() -> Storage {
    Storage {
        source: SHARED_DIR_TAG.into(),
        fstype: "virtiofs".into(),
        options: Vec::new(),
        mount_point: GUEST_SHARED_DIR.into(),
        ..Default::default()
    }
}

/// Errors starting a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The VM did not start.
    #[error("cannot start the VM")]
    Launch(#[from] HypervisorError),
    /// The VM ended before its agent answered (the source quotes its
    /// console).
    #[error("the VM's agent is not reachable")]
    Agent(#[from] AgentError),
    /// The VM ran but its agent did not answer; the VM has been killed.
    #[error("the VM's agent is not reachable (the VM was killed); {console}")]
    AgentUnreachable {
        console: String,
        #[source]
        source: AgentError,
    },
}

/// A running VM and its healthy agent.
#[derive(Debug)]
pub struct Sandbox {
    vm: RunningVm,
    agent: AgentClient,
}

impl Sandbox {
    /// Launches a VM with `hypervisor` and dials its agent. When the agent
    /// does not answer, the VM is killed and cleaned up before the error
    /// returns; the error quotes the console when the VM died.
    pub async fn start(
        hypervisor: &dyn Hypervisor,
        config: &VmConfig,
        dial: &DialOptions,
    ) -> Result<Self, SandboxError> {
        let vm = hypervisor.launch(config).await?;
        Self::attach(vm, dial).await
    }

    /// Dials the agent of a VM that runs already (one claimed from the
    /// warm pool). When the agent does not answer, the VM is killed and
    /// cleaned up before the error returns.
    pub async fn attach(vm: RunningVm, dial: &DialOptions) -> Result<Self, SandboxError> {
        let address = AgentAddress::hybrid_vsock(vm.agent_socket());
        match AgentClient::connect(&address, dial, Some(vm.end_watch())).await {
            Ok(agent) => Ok(Self { vm, agent }),
            Err(e @ AgentError::VmEnded { .. }) => Err(e.into()),
            Err(source) => {
                let exit = vm.kill().await;
                tracing::warn!(vm = %vm.id(), %exit, "agent unreachable, VM killed");
                Err(SandboxError::AgentUnreachable {
                    console: format_tail(&exit.console_tail),
                    source,
                })
            }
        }
    }

    /// [`Self::start`], with one more launch when the VM ran but its agent
    /// never answered a dial. The hybrid-vsock backend can leave every
    /// CONNECT of one VM unanswered for the VM's whole life while the guest
    /// has its agent listening (seen with vhost-device-vsock, a few times
    /// in some hundred boots); a new VM gets a new backend. A VM that died,
    /// or an agent that answered wrongly, is not launched again.
    pub async fn start_relaunching(
        hypervisor: &dyn Hypervisor,
        config: &VmConfig,
        dial: &DialOptions,
    ) -> Result<Self, SandboxError> {
        match Self::start(hypervisor, config, dial).await {
            Err(SandboxError::AgentUnreachable {
                console,
                source: source @ AgentError::DialTimeout { .. },
            }) => {
                tracing::warn!(vm = %config.id, error = %source, %console, "the VM's agent never answered; the VM was killed and is started once more");
                Self::start(hypervisor, config, dial).await
            }
            r => r,
        }
    }

    /// The VM.
    pub fn vm(&self) -> &RunningVm {
        &self.vm
    }

    /// The agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Sets the guest up for pod `id`: its clock from the host's, then
    /// CreateSandbox with `hostname` and the pod's shared directory mounted
    /// at [`GUEST_SHARED_DIR`]. Every front door (the shim, `nutshell run`)
    /// sets a sandbox up through here.
    pub async fn set_up(
        &self,
        id: &str,
        hostname: &str,
        shared_pid_ns: bool,
    ) -> Result<(), AgentError> {
        // A guest without the right time still runs containers; the clock
        // matters for TLS and logs, not for the pod's start.
        if let Err(e) = self.agent.set_time(SystemTime::now()).await {
            tracing::debug!(vm = %self.vm.id(), error = %e, "SetTime");
        }
        self.agent
            .create_sandbox(&CreateSandboxRequest {
                sandbox_id: id.into(),
                hostname: hostname.into(),
                storages: vec![shared_dir_storage()],
                shared_dir: GUEST_SHARED_DIR.into(),
                shared_pid_ns,
                ..Default::default()
            })
            .await
    }

    /// Asks the agent to destroy the sandbox (the guest powers off), then
    /// gives the VM `grace` to end before it is killed. Returns once every
    /// process is reaped and the VM's files are removed.
    pub async fn shutdown(&self, grace: Duration) -> VmExit {
        if self.vm.try_ended().is_none() {
            match tokio::time::timeout(DESTROY_TIMEOUT, self.agent.destroy_sandbox()).await {
                Ok(Ok(())) => {}
                // The guest may power off before the reply makes it out.
                Ok(Err(e)) => tracing::debug!(vm = %self.vm.id(), error = %e, "DestroySandbox"),
                Err(_) => tracing::warn!(vm = %self.vm.id(), "DestroySandbox timed out"),
            }
        }
        self.vm.shutdown(grace).await
    }
}
