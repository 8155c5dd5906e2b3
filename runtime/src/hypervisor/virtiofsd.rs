//! virtiofsd, the vhost-user file server behind the pod's shared directory.
//! Both backends run it the same way: the guest sees the same semantics
//! whichever VMM drives the device.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::shared_dir;
use super::supervisor::{ProcessTree, StateFiles};
use super::vm::ProcessRole;
use super::HypervisorError;

/// Takes the files virtiofsd makes in the state directory: its socket and the
/// lock file beside it.
pub(crate) fn claim_files(state: &mut StateFiles, socket: &Path) -> Result<(), HypervisorError> {
    state.claim(socket)?;
    let mut lock = socket.to_path_buf().into_os_string();
    lock.push(".pid");
    state.claim(&PathBuf::from(lock))?;
    Ok(())
}

/// Makes `dir` a shared mount (see [`shared_dir`]) and starts virtiofsd on
/// it, listening on `socket`. The caller waits for the socket and, on an
/// error, kills and cleans the tree.
pub(crate) fn start(
    tree: &mut ProcessTree,
    virtiofsd: &Path,
    dir: &Path,
    socket: &Path,
) -> Result<(), HypervisorError> {
    if let Some(mount) = shared_dir::ensure_shared(dir)? {
        tree.state().add_mount(mount);
    }
    let mut cmd = Command::new(virtiofsd);
    cmd.args(args(dir, socket));
    tree.spawn(ProcessRole::FsBackend, "virtiofsd", cmd)?;
    Ok(())
}

pub(crate) fn args(shared_dir: &Path, socket: &Path) -> Vec<OsString> {
    vec![
        "--socket-path".into(),
        socket.into(),
        "--shared-dir".into(),
        shared_dir.into(),
        // The guest never caches: the host changes the directory under it
        // (rootfs and volumes bind-mounted in as containers come).
        "--cache".into(),
        "never".into(),
        // Bind mounts inside the shared directory get their own st_dev in
        // the guest, so inode numbers of different filesystems never clash.
        "--announce-submounts".into(),
        // Keep the fd limit the runtime has: raising it needs
        // CAP_SYS_RESOURCE, and the attempt only adds a warning.
        "--rlimit-nofile".into(),
        "0".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::arg_tests::strings;

    #[test]
    fn never_caches_and_announces_submounts() {
        let f = strings(args(Path::new("/srv/x"), Path::new("/s/fs.sock")));
        assert_eq!(
            f,
            [
                "--socket-path",
                "/s/fs.sock",
                "--shared-dir",
                "/srv/x",
                "--cache",
                "never",
                "--announce-submounts",
                "--rlimit-nofile",
                "0"
            ]
        );
    }
}
