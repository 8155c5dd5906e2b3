//! Making the pod's shared directory a mount with shared propagation.
//!
//! virtiofsd's default sandbox serves the directory from a private copy of
//! the host's mount namespace, taken when it starts. Container rootfs and
//! volumes are bind-mounted into the shared directory *after* the VM
//! started; they only reach virtiofsd (and so the guest) when the directory
//! is a shared mount, whose new submounts propagate into virtiofsd's copy.
//! (Measured here: with the host's private `/`, a bind mount made after
//! start stayed invisible in the guest; with a shared bind it appeared.)

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::HypervisorError;

/// Makes `dir` a shared mount unless it already is one: binds it onto itself
/// (recursively, keeping any submounts) and marks it shared. Returns the
/// mount to remove when the VM ends, if one was made.
pub(crate) fn ensure_shared(dir: &Path) -> Result<Option<PathBuf>, HypervisorError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        HypervisorError::SharedDir {
            path: dir.to_path_buf(),
            what: "reading /proc/self/mountinfo",
            source,
        }
    })?;
    if is_shared_mount(&mountinfo, dir) {
        return Ok(None);
    }
    let fail = |what: &'static str| {
        move |e: nix::Error| HypervisorError::SharedDir {
            path: dir.to_path_buf(),
            what,
            source: e.into(),
        }
    };
    let none = None::<&str>;
    mount(
        Some(dir),
        dir,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(fail("bind-mounting it onto itself"))?;
    if let Err(e) = mount(none, dir, none, MsFlags::MS_SHARED, none) {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        return Err(fail("making it a shared mount")(e));
    }
    Ok(Some(dir.to_path_buf()))
}

/// Undoes [`ensure_shared`]'s bind mount.
pub(crate) fn release(mount_point: &Path) {
    if let Err(e) = umount2(mount_point, MntFlags::MNT_DETACH) {
        tracing::warn!(path = %mount_point.display(), error = %e, "cannot unmount the shared directory's bind");
    }
}

/// Whether the top-most mount on `dir` has shared propagation.
fn is_shared_mount(mountinfo: &str, dir: &Path) -> bool {
    let want = escape(dir);
    // Later lines are mounted on top of earlier ones: the last match counts.
    mountinfo
        .lines()
        .rev()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let mount_point = f.nth(4)?;
            // Optional fields (`shared:N`, `master:N`) come after field 6
            // and end with `-`.
            let optional: Vec<&str> = f.skip(1).take_while(|x| *x != "-").collect();
            Some((mount_point, optional))
        })
        .find(|(mp, _)| *mp == want)
        .is_some_and(|(_, opt)| opt.iter().any(|o| o.starts_with("shared:")))
}

/// A path as mountinfo writes it (space, tab, newline and backslash octal).
fn escape(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::new();
    for &b in p.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => s.push_str(&format!("\\{b:03o}")),
            _ => s.push(char::from(b)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw
40 22 0:40 / /run/nutshell/p1/shared rw,relatime shared:5 - tmpfs tmpfs rw
41 22 0:41 / /run/nutshell/p2/shared rw,relatime - tmpfs tmpfs rw
42 41 0:41 / /run/nutshell/p2/shared rw,relatime shared:9 master:3 - tmpfs tmpfs rw
43 22 0:42 / /tmp/a\\040b rw shared:7 - tmpfs tmpfs rw
44 22 0:43 / /run/nutshell/p3/shared rw shared:8 - tmpfs tmpfs rw
45 44 0:43 / /run/nutshell/p3/shared rw - tmpfs tmpfs rw
";

    #[test]
    fn shared_mounts_are_recognised() {
        assert!(is_shared_mount(INFO, Path::new("/run/nutshell/p1/shared")));
        // The top-most mount decides.
        assert!(is_shared_mount(INFO, Path::new("/run/nutshell/p2/shared")));
        assert!(!is_shared_mount(INFO, Path::new("/run/nutshell/p3/shared")));
        assert!(is_shared_mount(INFO, Path::new("/tmp/a b")));
        assert!(!is_shared_mount(INFO, Path::new("/run/nutshell/p1")));
        assert!(!is_shared_mount(INFO, Path::new("/")));
    }
}
