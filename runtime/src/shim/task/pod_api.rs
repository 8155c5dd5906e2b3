//! What the task service needs from a pod, as a trait: the real [`Pod`]
//! (a VM and its agent) implements it, and the unit tests' fake does, so
//! the task state machine runs without a VM (youki's `Syscall` seam).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::CreateTaskRequest;
use nutshell_protocol::agent::{
    CreateContainerRequest, CreateContainerResponse, ExecProcessRequest, ExecProcessResponse,
    ListProcessesResponse, StatsContainerResponse, WaitProcessResponse,
};
use oci_spec::runtime::Spec;

use crate::agent::AgentError;
use crate::config::Config;
use crate::mounts::{bind_volume, host_kind, mount_rootfs, rewrite_spec};
use crate::shim::events::Events;
use crate::shim::pod::{Pod, PodSpec};
use crate::shim::state::{cleanup_container, PodKey};
use crate::shim::stdio::{Relays, StdioConfig, StdioError};
use crate::shim::ShimError;

/// A running pod as the task service uses it. Agent calls keep the
/// agent's own error, so its status code maps onto containerd's kinds.
#[async_trait]
pub trait PodApi: Send + Sync + std::fmt::Debug {
    /// Whose pod it is; `key().pod` is its id.
    fn key(&self) -> &PodKey;
    /// The VMM's host pid, what Connect reports as the task's.
    fn vmm_pid(&self) -> u32;
    /// Makes container `req.id`'s rootfs and volumes visible to the guest
    /// and rewrites `spec`'s paths to where the guest sees them.
    async fn attach_filesystems(
        &self,
        req: &CreateTaskRequest,
        bundle: &Path,
        spec: &mut Spec,
    ) -> Result<(), ShimError>;
    /// Unmounts and removes what [`Self::attach_filesystems`] made.
    async fn detach_filesystems(&self, cid: &str) -> Result<(), ShimError>;
    /// Starts relaying a process's stdio; `None` when nothing is relayed.
    async fn start_relays(
        &self,
        cid: &str,
        exec_id: &str,
        namespace: &str,
        stdio: &StdioConfig,
    ) -> Result<Option<Relays>, StdioError>;
    async fn create_container(
        &self,
        req: &CreateContainerRequest,
    ) -> Result<CreateContainerResponse, AgentError>;
    /// Brings the guest's network up to date with the pod's namespace
    /// (before the pod's first container starts).
    async fn sync_network(&self) -> Result<(), ShimError>;
    async fn start_container(&self, cid: &str) -> Result<(), AgentError>;
    async fn exec_process(
        &self,
        req: &ExecProcessRequest,
    ) -> Result<ExecProcessResponse, AgentError>;
    async fn wait_process(
        &self,
        cid: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError>;
    async fn signal_process(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    async fn list_processes(&self, cid: &str) -> Result<ListProcessesResponse, AgentError>;
    async fn resize_terminal(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError>;
    async fn pause_container(&self, cid: &str) -> Result<(), AgentError>;
    async fn resume_container(&self, cid: &str) -> Result<(), AgentError>;
    async fn update_container(&self, cid: &str, resources: Vec<u8>) -> Result<(), AgentError>;
    async fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse, AgentError>;
    async fn remove_container(&self, cid: &str) -> Result<(), AgentError>;
    /// Ends the pod's VM and removes its state.
    async fn shutdown(&self);
}

/// Starts pods.
#[async_trait]
pub trait PodLauncher: Send + Sync {
    async fn launch(
        &self,
        spec: &PodSpec,
        config: &Config,
        events: Arc<Events>,
    ) -> Result<Arc<dyn PodApi>, ShimError>;
}

/// Boots real VMs ([`Pod::start`]).
pub struct VmLauncher;

#[async_trait]
impl PodLauncher for VmLauncher {
    async fn launch(
        &self,
        spec: &PodSpec,
        config: &Config,
        events: Arc<Events>,
    ) -> Result<Arc<dyn PodApi>, ShimError> {
        let pod: Arc<dyn PodApi> = Pod::start(spec, config, events).await?;
        Ok(pod)
    }
}

#[async_trait]
impl PodApi for Pod {
    fn key(&self) -> &PodKey {
        Pod::key(self)
    }

    fn vmm_pid(&self) -> u32 {
        Pod::vmm_pid(self)
    }

    async fn attach_filesystems(
        &self,
        req: &CreateTaskRequest,
        bundle: &Path,
        spec: &mut Spec,
    ) -> Result<(), ShimError> {
        let shared = self.shared_dir().to_path_buf();
        let bundle_rootfs = spec
            .root()
            .as_ref()
            .map(|r| bundle.join(r.path()))
            .unwrap_or_else(|| bundle.join("rootfs"));
        let volumes = rewrite_spec(spec, &req.id, &shared, host_kind);
        let rootfs_mounts = req.rootfs.clone();
        let target = shared.join(&req.id).join("rootfs");
        tokio::task::spawn_blocking(move || -> Result<(), ShimError> {
            mount_rootfs(&rootfs_mounts, &bundle_rootfs, &target).map_err(ShimError::from_err)?;
            for v in &volumes {
                bind_volume(v).map_err(ShimError::from_err)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ShimError::Internal(e.to_string()))?
    }

    async fn detach_filesystems(&self, cid: &str) -> Result<(), ShimError> {
        let (key, cid) = (self.key().clone(), cid.to_string());
        tokio::task::spawn_blocking(move || cleanup_container(&key, &cid))
            .await
            .map_err(|e| ShimError::Internal(e.to_string()))?
            .map_err(ShimError::from_err)
    }

    async fn start_relays(
        &self,
        cid: &str,
        exec_id: &str,
        namespace: &str,
        stdio: &StdioConfig,
    ) -> Result<Option<Relays>, StdioError> {
        Relays::start(self.agent(), cid, exec_id, namespace, stdio)
            .await
            .map(Some)
    }

    async fn create_container(
        &self,
        req: &CreateContainerRequest,
    ) -> Result<CreateContainerResponse, AgentError> {
        self.agent().create_container(req).await
    }

    async fn sync_network(&self) -> Result<(), ShimError> {
        Pod::sync_network(self).await
    }

    async fn start_container(&self, cid: &str) -> Result<(), AgentError> {
        self.agent().start_container(cid).await
    }

    async fn exec_process(
        &self,
        req: &ExecProcessRequest,
    ) -> Result<ExecProcessResponse, AgentError> {
        self.agent().exec_process(req).await
    }

    async fn wait_process(
        &self,
        cid: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError> {
        self.agent().wait_process(cid, exec_id).await
    }

    async fn signal_process(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.agent().signal_process(cid, exec_id, signal, all).await
    }

    async fn list_processes(&self, cid: &str) -> Result<ListProcessesResponse, AgentError> {
        self.agent().list_processes(cid).await
    }

    async fn resize_terminal(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.agent().resize_terminal(cid, exec_id, rows, cols).await
    }

    async fn pause_container(&self, cid: &str) -> Result<(), AgentError> {
        self.agent().pause_container(cid).await
    }

    async fn resume_container(&self, cid: &str) -> Result<(), AgentError> {
        self.agent().resume_container(cid).await
    }

    async fn update_container(&self, cid: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        self.agent().update_container(cid, resources).await
    }

    async fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse, AgentError> {
        self.agent().stats_container(cid).await
    }

    async fn remove_container(&self, cid: &str) -> Result<(), AgentError> {
        self.agent().remove_container(cid).await
    }

    async fn shutdown(&self) {
        Pod::shutdown(self).await
    }
}
