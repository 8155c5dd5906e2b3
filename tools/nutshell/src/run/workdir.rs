//! The host directory of one `nutshell run`: `/run/nutshell/run-<pid>/`.
//!
//! It is the VM's state directory (sockets, console log) and holds the
//! directory shared into the guest over virtio-fs, `shared/`, with the
//! rootfs bind-mounted at `shared/<id>/rootfs`, as the shim lays a pod out
//! (the same functions of `nutshell_runtime::mounts` do the work).
//! Everything is unmounted and removed when the run ends, on every path:
//! explicitly at the end, or by `Drop` on an early return or a panic.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nutshell_runtime::mounts::{
    bind_volume, guest_rootfs, mounts_below, prepare_shared_dir, remove_tree, unmount_below, Volume,
};

/// Where every run's directory lives (the shim's pods live there too).
pub const RUN_ROOT: &str = "/run/nutshell";

/// The directory of a run with this id.
pub fn run_dir(id: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(id)
}

/// A run's directory, removed (with its mounts) when dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    id: String,
    removed: bool,
}

impl RunDir {
    /// Removes what a dead run with the same id left in `/run/nutshell/<id>`
    /// (the id holds our pid, so its owner is gone).
    pub fn clean_leftover(id: &str) -> Result<()> {
        let path = run_dir(id);
        if path.exists() {
            clean(&path).with_context(|| {
                format!(
                    "{} is left from an earlier run and cannot be removed",
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    /// Creates `/run/nutshell/<id>` (mode 0700: it holds the VM's sockets)
    /// with a shared `shared/` in it, or takes it over from a warm VM the
    /// pool moved there, which has both already.
    pub fn create(id: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = run_dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let me = Self {
            path,
            id: id.to_string(),
            removed: false,
        };
        prepare_shared_dir(&me.shared_dir())
            .context("cannot prepare the directory shared with the VM")?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory shared into the guest.
    pub fn shared_dir(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// Bind-mounts `rootfs` at `shared/<id>/rootfs` (read-only when asked:
    /// then the guest cannot write through it even if it ignored its own
    /// read-only mount). Returns the path the guest sees it at.
    pub fn mount_rootfs(&self, rootfs: &Path, readonly: bool) -> Result<PathBuf> {
        let guest_path = guest_rootfs(&self.id);
        let volume = Volume {
            source: rootfs.to_path_buf(),
            host_target: self.shared_dir().join(&self.id).join("rootfs"),
            guest_path: guest_path.clone(),
            readonly,
            is_dir: true,
        };
        bind_volume(&volume).with_context(|| {
            format!(
                "cannot make the rootfs {} visible to the VM",
                rootfs.display()
            )
        })?;
        Ok(guest_path)
    }

    /// Unmounts and removes everything. The VM's processes must be gone
    /// (virtiofsd holds the shared directory while it runs).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        clean(&self.path).with_context(|| format!("cannot remove {}", self.path.display()))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = clean(&self.path) {
                eprintln!(
                    "nutshell run: warning: cannot remove {}: {e:#}",
                    self.path.display()
                );
            }
        }
    }
}

/// Unmounts (lazily: a file the guest still held must not block it) and
/// removes `dir`, never crossing into a filesystem still mounted below it.
fn clean(dir: &Path) -> Result<()> {
    unmount_below(dir)?;
    remove_tree(dir)?;
    let left = mounts_below(dir);
    anyhow::ensure!(left.is_empty(), "mounts are left below it: {left:?}");
    Ok(())
}
