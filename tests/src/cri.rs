//! A CRI client on a test containerd's socket (`k8s-cri`, as the kubelet
//! speaks it), and the pod steps the CRI tests and the network benchmark
//! share. A failed call panics quoting containerd's log: these are test
//! helpers, and the log says why.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse,
    ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxState,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, BUSYBOX_IMAGE};
use crate::netns::spec_netns;

/// A CRI runtime service client.
pub type CriClient = RuntimeServiceClient<Channel>;

/// Connects a CRI client to the containerd socket `socket`.
pub async fn cri_client(socket: PathBuf) -> CriClient {
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("a static URI parses")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("CRI socket connects");
    RuntimeServiceClient::new(channel)
}

/// A pod's config: `name` (also its hostname and uid), container logs
/// under `log_dir`, network namespace `network` (`Pod`: CNI's; `Node`: the
/// host's).
pub fn pod_config(
    name: &str,
    log_dir: &std::path::Path,
    network: NamespaceMode,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `$cri.client.$method($request).await`, its reply unwrapped by
/// [`Cri::ok`] under the name `$what`.
macro_rules! call {
    ($cri:expr, $method:ident, $what:expr, $request:expr) => {{
        let r = $cri.client.$method($request).await;
        $cri.ok($what, r)
    }};
}

/// A CRI client bound to the containerd it talks to.
pub struct Cri<'a> {
    /// The raw client, for calls the helpers do not cover.
    pub client: CriClient,
    c: &'a Containerd,
}

impl<'a> Cri<'a> {
    /// Connects to `c`'s CRI socket.
    pub async fn connect(c: &'a Containerd) -> Self {
        Self {
            client: cri_client(c.socket.clone()).await,
            c,
        }
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ! {
        panic!("{what}: {e}\ncontainerd log:\n{}", self.c.log_tail(80))
    }

    /// The reply of call `what`, or a panic quoting containerd's log.
    fn ok<T>(&self, what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> T {
        r.unwrap_or_else(|e| self.fail(what, e)).into_inner()
    }

    /// RunPodSandbox under runtime handler `handler`; the pod's id.
    pub async fn run_pod(&mut self, config: &PodSandboxConfig, handler: &str) -> String {
        call!(
            self,
            run_pod_sandbox,
            &format!("RunPodSandbox ({handler})"),
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }
        )
        .pod_sandbox_id
    }

    /// Verbose PodSandboxStatus: the status and containerd's `info` JSON.
    pub async fn pod_status(
        &mut self,
        pod: &str,
    ) -> (k8s_cri::v1::PodSandboxStatus, serde_json::Value) {
        let resp = call!(
            self,
            pod_sandbox_status,
            "PodSandboxStatus",
            PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            }
        );
        let info = resp
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        (resp.status.unwrap_or_default(), info)
    }

    /// The pod's IP, as CRI reports it.
    pub async fn pod_ip(&mut self, pod: &str) -> String {
        let (status, _) = self.pod_status(pod).await;
        status.network.map(|n| n.ip).unwrap_or_default()
    }

    /// Whether the pod is ready (its sandbox runs).
    pub async fn pod_ready(&mut self, pod: &str) -> bool {
        self.pod_status(pod).await.0.state == PodSandboxState::SandboxReady as i32
    }

    /// The path of the pod's network namespace, from the sandbox's runtime
    /// spec (`linux.namespaces`, type `network`); `None` for a pod on the
    /// host's network.
    pub async fn pod_netns(&mut self, pod: &str) -> Option<PathBuf> {
        let (_, info) = self.pod_status(pod).await;
        spec_netns(&info["runtimeSpec"])
    }

    /// Creates and starts container `name` of the busybox image running
    /// `command` in `pod`, with `mounts`, logging to `<name>.log`; its id.
    pub async fn start_container(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        command: &[&str],
        mounts: Vec<Mount>,
    ) -> String {
        let id = call!(
            self,
            create_container,
            &format!("CreateContainer {name}"),
            CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: BUSYBOX_IMAGE.into(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    log_path: format!("{name}.log"),
                    mounts,
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config.clone()),
            }
        )
        .container_id;
        call!(
            self,
            start_container,
            &format!("StartContainer {name}"),
            StartContainerRequest {
                container_id: id.clone(),
            }
        );
        id
    }

    /// ExecSync of `sh -c script` in container `id` (timeout 120 s).
    pub async fn exec(&mut self, id: &str, script: &str) -> ExecSyncResponse {
        call!(
            self,
            exec_sync,
            "ExecSync",
            ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 120,
            }
        )
    }

    /// [`Self::exec`] that must exit 0; its stdout.
    pub async fn exec_ok(&mut self, id: &str, script: &str) -> String {
        let r = self.exec(id, script).await;
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        if r.exit_code != 0 {
            self.fail(
                &format!("`{script}` exited {}", r.exit_code),
                format!("{out}{}", String::from_utf8_lossy(&r.stderr)),
            );
        }
        out
    }

    /// Stops and removes `containers`, as the kubelet does.
    pub async fn remove_containers(&mut self, containers: &[String]) {
        for id in containers {
            let container_id = id.clone();
            call!(
                self,
                stop_container,
                "StopContainer",
                StopContainerRequest {
                    container_id,
                    timeout: 2,
                }
            );
            let container_id = id.clone();
            call!(
                self,
                remove_container,
                "RemoveContainer",
                RemoveContainerRequest { container_id }
            );
        }
    }

    /// Removes `containers`, then stops and removes `pod`, as the kubelet
    /// does when a pod is deleted.
    pub async fn remove_pod(&mut self, pod: &str, containers: &[String]) {
        self.remove_containers(containers).await;
        let pod_sandbox_id = pod.to_string();
        call!(
            self,
            stop_pod_sandbox,
            "StopPodSandbox",
            StopPodSandboxRequest { pod_sandbox_id }
        );
        let pod_sandbox_id = pod.to_string();
        call!(
            self,
            remove_pod_sandbox,
            "RemovePodSandbox",
            RemovePodSandboxRequest { pod_sandbox_id }
        );
    }
}
