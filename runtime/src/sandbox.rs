//! A pod's VM together with its connected agent: the unit the shim holds.

use std::path::Path;
use std::time::{Duration, SystemTime};

use nutshell_protocol::agent::{CreateSandboxRequest, Storage};
use nutshell_protocol::AGENT_SERVING_LOG;

use crate::agent::{AgentAddress, AgentClient, AgentError, DialOptions};
use crate::hypervisor::{
    format_tail, last_lines, Hypervisor, HypervisorError, RunningVm, VmConfig, VmExit,
    SHARED_DIR_TAG,
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

/// How long a dial may go on failing after the agent logged that it
/// serves: three attempts' worth, since an attempt made while the guest
/// booted may hang for its whole timeout before the next one is made.
fn serving_grace(dial: &DialOptions) -> Duration {
    dial.attempt_timeout * 3
}

/// How often the console is read for the agent's line, and how much of its
/// end.
const CONSOLE_POLL: Duration = Duration::from_millis(200);
const CONSOLE_LINES_READ: usize = 50;

/// Resolves `grace` after the console at `console` shows the agent's
/// [`AGENT_SERVING_LOG`] line; never without a `grace`. The guest writes
/// the console: a guest that prints the line early only has its VM
/// launched once more.
async fn serving_for(console: &Path, grace: Option<Duration>) {
    let Some(grace) = grace else {
        return std::future::pending().await;
    };
    while !last_lines(console, CONSOLE_LINES_READ)
        .iter()
        .any(|l| l.contains(AGENT_SERVING_LOG))
    {
        tokio::time::sleep(CONSOLE_POLL).await;
    }
    tokio::time::sleep(grace).await;
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
        Self::attach_watching(vm, dial, None).await
    }

    /// [`Self::attach`]; with `serving_grace`, the dial also gives up that
    /// long after the agent logged on the console that it serves.
    async fn attach_watching(
        vm: RunningVm,
        dial: &DialOptions,
        serving_grace: Option<Duration>,
    ) -> Result<Self, SandboxError> {
        let address = AgentAddress::hybrid_vsock(vm.agent_socket());
        let connected = tokio::select! {
            r = AgentClient::connect(&address, dial, Some(vm.end_watch())) => r,
            () = serving_for(vm.console_log(), serving_grace) => {
                Err(AgentError::UnreachableWhileServing {
                    address: address.to_string(),
                    grace: serving_grace.unwrap_or_default(),
                })
            }
        };
        match connected {
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
    ///
    /// The first VM is given up [`serving_grace`] after its agent logged
    /// that it serves, not at the dial's deadline (20 s in the shim): a
    /// cold start that meets a wedged backend then costs seconds, not the
    /// whole deadline and a boot. The second gets
    /// the whole deadline, so a host too loaded to connect within the
    /// grace still starts its pod.
    pub async fn start_relaunching(
        hypervisor: &dyn Hypervisor,
        config: &VmConfig,
        dial: &DialOptions,
    ) -> Result<Self, SandboxError> {
        let vm = hypervisor.launch(config).await?;
        match Self::attach_watching(vm, dial, Some(serving_grace(dial))).await {
            Err(SandboxError::AgentUnreachable {
                console,
                source:
                    source @ (AgentError::DialTimeout { .. }
                    | AgentError::UnreachableWhileServing { .. }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GRACE: Duration = Duration::from_secs(6);

    #[tokio::test(start_paused = true)]
    async fn the_grace_starts_when_the_agent_says_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "[    0.5] Linux version 6.1\n").unwrap();
        let watch = serving_for(&console, Some(GRACE));
        tokio::pin!(watch);
        // Booting, for as long as it takes: no verdict.
        assert!(tokio::time::timeout(Duration::from_secs(60), &mut watch)
            .await
            .is_err());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .unwrap();
        writeln!(
            f,
            "2026-12-07T15:00:00Z  INFO nutshell_agent: {AGENT_SERVING_LOG} listen=vsock://1024"
        )
        .unwrap();
        writeln!(f, "[    1.2] a later kernel line").unwrap();
        let seen = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), &mut watch)
            .await
            .expect("the grace ends");
        let waited = seen.elapsed();
        assert!(
            waited >= GRACE && waited <= GRACE + 2 * CONSOLE_POLL,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_grace_the_console_is_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, format!("{AGENT_SERVING_LOG}\n")).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(600), serving_for(&console, None))
                .await
                .is_err()
        );
    }
}
