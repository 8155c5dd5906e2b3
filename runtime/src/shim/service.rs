//! The shim process's life: `start` (find or spawn the pod's shim, print its
//! address), serving the task API, and `delete` (clean up after a shim that
//! died).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{spawn, Config as ShimConfig, Error, ExitSignal, Flags, Shim, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use super::events::Events;
use super::process::timestamp;
use super::state::{check_id, cleanup_container, cleanup_pod, PodKey};
use super::task::TaskService;
use super::SANDBOX_ID_ANNOTATION;
use crate::network::NetworkRecord;

/// Exit status `delete` reports for a task whose shim died: it was killed.
const KILLED_EXIT_STATUS: u32 = 128 + 9;

/// The `Shim` of `containerd-shim`: one value per shim process.
pub struct NutshellShim {
    id: String,
    /// containerd's gRPC address: with the namespace and the pod id it
    /// names the pod's state ([`PodKey`]), in `delete` as in the shim.
    address: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

/// The annotations of the bundle's `config.json` (empty when unreadable).
fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    let Ok(bytes) = std::fs::read(bundle.join("config.json")) else {
        return HashMap::new();
    };
    #[derive(serde::Deserialize)]
    struct Partial {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    serde_json::from_slice::<Partial>(&bytes)
        .map(|p| p.annotations)
        .unwrap_or_default()
}

/// The pod a container belongs to: its CRI sandbox, or itself.
pub fn pod_of(id: &str, annotations: &HashMap<String, String>) -> String {
    annotations
        .get(SANDBOX_ID_ANNOTATION)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for NutshellShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Self {
            id: args.id.clone(),
            address: args.address.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Containers of one pod share a shim: the socket address is derived
    /// from the pod id, and a shim started for an address that already
    /// serves exits at once, leaving the running one to answer.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = pod_of(&opts.id, &bundle_annotations(&self.bundle));
        check_id(&grouping).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// Runs after the shim is gone (or never came up): kill what the VM left,
    /// unmount and remove the state. The owner of the pod removes the whole
    /// pod; any other container only its own part.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let pod = pod_of(&self.id, &bundle_annotations(&self.bundle));
        let key = PodKey::new(&self.address, &self.namespace, &pod);
        let id = self.id.clone();
        tracing::info!(%id, %pod, namespace = %key.namespace, dir = %key.dir().display(), "cleaning up after the shim");
        // Read before the pod's directory goes; used once the VM's processes
        // (and so its taps) are gone.
        let network = if key.pod == id {
            NetworkRecord::load(&key.dir()).unwrap_or_else(|e| {
                tracing::warn!(error = %super::pod::chain(&e), "the pod's network plumbing cannot be taken away");
                None
            })
        } else {
            None
        };
        let r = tokio::task::spawn_blocking(move || {
            if key.pod == id {
                cleanup_pod(&key)
            } else {
                cleanup_container(&key, &id)
            }
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
        if let Some(record) = &network {
            super::pod::unplumb_logged(record).await;
        }
        if let Err(e) = r {
            return Err(Error::Other(super::pod::chain(&e)));
        }
        if let Ok(address) = std::fs::read_to_string(self.bundle.join("address")) {
            remove_dead_socket(&address);
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED_EXIT_STATUS,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        TaskService::new(
            &self.address,
            &self.namespace,
            Events::new(publisher, &self.namespace),
            self.exit.clone(),
        )
    }
}

/// Removes the shim socket at `address` (`unix:///path`) unless a shim still
/// answers on it: a shim killed with SIGKILL cannot remove its own.
pub fn remove_dead_socket(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => tracing::debug!(path = %path.display(), "shim socket still served"),
        Err(_) => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the shim socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_group_by_cri_sandbox_id() {
        let mut a = HashMap::new();
        assert_eq!(pod_of("c1", &a), "c1");
        a.insert(SANDBOX_ID_ANNOTATION.to_string(), "pod9".to_string());
        assert_eq!(pod_of("c1", &a), "pod9");
        a.insert(SANDBOX_ID_ANNOTATION.to_string(), String::new());
        assert_eq!(pod_of("c1", &a), "c1");
    }

    #[test]
    fn annotations_come_from_the_bundle() {
        let d = tempfile::tempdir().unwrap();
        assert!(bundle_annotations(d.path()).is_empty());
        std::fs::write(
            d.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-id":"p"}}"#,
        )
        .unwrap();
        assert_eq!(pod_of("c", &bundle_annotations(d.path())), "p");
    }

    #[test]
    fn only_dead_sockets_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let live = d.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        remove_dead_socket(&format!("unix://{}", live.display()));
        assert!(live.exists(), "a served socket stays");
        let dead = d.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        remove_dead_socket(&format!("unix://{}\n", dead.display()));
        assert!(!dead.exists(), "a dead socket goes");
        let file = d.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        remove_dead_socket(file.to_str().unwrap());
        assert!(file.exists(), "only sockets are touched");
    }
}
