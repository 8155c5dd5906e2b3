//! WarmUp: one throw-away container, created and removed before any pod's.
//!
//! A guest runs each piece of code slowly the first time: under TCG, QEMU
//! translates it (about 80 ms of a first CreateContainer here); on KVM the
//! agent's and the kernel's pages still fault in. The warm pool calls this
//! once after boot, so that the pod's own first create runs code the guest
//! has already run. That includes the container init's own code: the init
//! is started without address space randomization (`spawn`), so the pod's
//! init runs it at the same addresses. The container goes as far as its
//! init waiting for Start (namespaces, mounts, `/dev`, pivot_root, masked
//! paths, a cgroup) and is removed without running anything: its rootfs
//! holds one empty executable file, which is never executed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;

use super::Engine;
use crate::error::{AgentError, Result};

/// The throw-away container's id. No pod's container can hold it: WarmUp
/// runs only in an agent with no container.
const WARM_UP_ID: &str = "nutshell-warm-up";
/// The one file of its rootfs, named as its process.
const WARM_UP_EXE: &str = "warm-up";

impl Engine {
    /// Creates and removes the throw-away container in a fresh directory
    /// under `base`; returns how long it took.
    pub async fn warm_up(&self, base: &Path) -> Result<Duration> {
        let started = Instant::now();
        if self.sandbox.lock().await.is_active() {
            return Err(AgentError::FailedPrecondition(
                "WarmUp is only for an idle agent, and a sandbox exists".into(),
            ));
        }
        if !self
            .containers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
        {
            return Err(AgentError::FailedPrecondition(
                "WarmUp is only for an idle agent, and a container exists".into(),
            ));
        }
        // A directory per call: a second WarmUp at once fails on the
        // container id, without touching the first one's rootfs.
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let n = CALLS.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("warm-up.{}.{n}", std::process::id()));
        let result = self.warm_up_in(&dir).await;
        remove_dir(&dir);
        result.map(|()| started.elapsed())
    }

    async fn warm_up_in(&self, dir: &Path) -> Result<()> {
        let rootfs = make_rootfs(dir).map_err(|e| {
            AgentError::internal(format!(
                "cannot make the warm-up rootfs in {}: {e}",
                dir.display()
            ))
        })?;
        let spec = serde_json::to_vec(&warm_up_spec(&rootfs)).map_err(AgentError::internal)?;
        let rootfs = rootfs.to_string_lossy();
        self.create_container(WARM_UP_ID, &spec, &rootfs, false)
            .await?;
        self.remove_container(WARM_UP_ID).await
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the warm-up directory");
        }
    }
}

fn make_rootfs(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let rootfs = dir.join("rootfs");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&rootfs)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(rootfs.join(WARM_UP_EXE))?;
    Ok(rootfs)
}

/// The spec of `runc spec` (oci-spec's default: the usual namespaces,
/// mounts, masked paths and capabilities), close to what a pod's
/// container asks for, with our rootfs and process.
fn warm_up_spec(rootfs: &Path) -> Spec {
    let mut spec = Spec::default();
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    spec.set_hostname(Some("warm-up".into()));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(vec![format!("/{WARM_UP_EXE}")]));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_points_at_the_rootfs_and_its_one_file() {
        let spec = warm_up_spec(Path::new("/run/x/rootfs"));
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/x/rootfs")
        );
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.args().as_deref(),
            Some(&["/warm-up".to_string()][..])
        );
        assert_eq!(process.terminal(), Some(false));
        // A container like a pod's: its own pid and mount namespaces.
        let ns: Vec<_> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(ns.contains(&oci_spec::runtime::LinuxNamespaceType::Pid));
        assert!(ns.contains(&oci_spec::runtime::LinuxNamespaceType::Mount));
    }

    #[test]
    fn the_rootfs_holds_one_executable_file() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = make_rootfs(&tmp.path().join("w")).unwrap();
        let entries: Vec<_> = std::fs::read_dir(&rootfs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from(WARM_UP_EXE)]);
        let mode = std::fs::metadata(rootfs.join(WARM_UP_EXE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the file is executable: {mode:o}");
        // A second warm-up in the same directory is refused, not mixed in.
        assert!(make_rootfs(&tmp.path().join("w")).is_err());
    }
}
