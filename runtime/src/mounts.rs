//! Getting a container's filesystems into the guest.
//!
//! The pod has one shared directory on the host,
//! `/run/nutshell/<hash>/shared`, which virtio-fs shows to the guest at
//! [`GUEST_SHARED_DIR`]. Each container gets `shared/<cid>/rootfs` (the
//! mounts containerd handed over: an overlay from the default snapshotter,
//! or a bind from the native one) and `shared/<cid>/volumes/<n>-<name>`
//! for every host bind mount of its spec (CRI's `/etc/hosts`,
//! `resolv.conf`, `hostname`, emptyDir, configMaps, secrets). The spec is
//! rewritten to the guest paths. Read-only binds are remounted read-only
//! on the host, so the guest cannot write through them even if it ignored
//! its own `ro`.
//!
//! The shared directory is bind-mounted onto itself and made a shared
//! mount before the VM starts: virtiofsd runs in its own mount namespace,
//! and only a shared mount propagates the mounts made later (containers
//! added to a running pod) into it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount as TaskMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

use crate::sandbox::GUEST_SHARED_DIR;

/// Errors mounting or unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount(2) or umount(2) failed.
    #[error("cannot {what} {target}")]
    Sys {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory or file could not be made or removed.
    #[error("cannot {what} {path}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// containerd's rootfs mount failed.
    #[error("cannot mount the rootfs ({fstype} from {source_path}) on {target}: {message}")]
    Rootfs {
        fstype: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
    /// Something is still mounted where a tree was to be removed.
    #[error("{0} still has mounts below it; not removing it")]
    StillMounted(PathBuf),
}

fn sys<'a>(what: &'static str, target: &'a Path) -> impl FnOnce(nix::Error) -> MountError + 'a {
    move |e| MountError::Sys {
        what,
        target: target.to_path_buf(),
        source: io::Error::from(e),
    }
}

fn fs_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MountError + 'a {
    move |source| MountError::Fs {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `dir` (created when missing) a shared bind mount of itself.
pub fn prepare_shared_dir(dir: &Path) -> Result<(), MountError> {
    fs::create_dir_all(dir).map_err(fs_err("create", dir))?;
    if !is_mount_point(dir) {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys("bind-mount", dir))?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(sys("make shared", dir))
}

/// Mounts a container's rootfs on `target`: containerd's mounts in order,
/// or, when there are none (`ctr run --rootfs`, a prepared bundle), a bind
/// of the bundle's rootfs directory.
pub fn mount_rootfs(
    mounts: &[TaskMount],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), MountError> {
    fs::create_dir_all(target).map_err(fs_err("create", target))?;
    if mounts.is_empty() {
        return mount(
            Some(bundle_rootfs),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys("bind-mount the bundle rootfs on", target));
    }
    for m in mounts {
        let (fstype, source, options, dest) = (
            m.type_.clone(),
            m.source.clone(),
            m.options.clone(),
            target.to_path_buf(),
        );
        // containerd-shim's mount helper understands containerd's option
        // vocabulary (and compacts long overlay lowerdirs, which needs a
        // chdir on the calling thread): give it a thread of its own so the
        // chdir cannot leak into the runtime's threads.
        let r = std::thread::spawn(move || {
            containerd_shim::mount::mount_rootfs(
                Some(fstype.as_str()),
                Some(source.as_str()),
                &options,
                &dest,
            )
            .map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("the mount thread panicked".into()));
        if let Err(message) = r {
            return Err(MountError::Rootfs {
                fstype: m.type_.clone(),
                source_path: m.source.clone(),
                target: target.to_path_buf(),
                message,
            });
        }
    }
    Ok(())
}

/// A host bind mount of the spec, to be made visible in the shared dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The host path the spec binds.
    pub source: PathBuf,
    /// Where it is bind-mounted under the pod's shared directory (host).
    pub host_target: PathBuf,
    /// The same place as the guest sees it.
    pub guest_path: PathBuf,
    pub readonly: bool,
    pub is_dir: bool,
}

/// Rewrites `spec` for the guest: the root becomes
/// `<guest shared>/<cid>/rootfs`, host bind mounts point into
/// `<guest shared>/<cid>/volumes/`, and `/dev/shm` becomes a guest tmpfs
/// (a host tmpfs seen through virtio-fs cannot back shared memory).
/// Returns the volumes to bind on the host under `host_shared`.
/// `kind_of(path)` says whether a host path is a directory (`Some(true)`),
/// another file (`Some(false)`), or missing (`None`: left as it is).
pub fn rewrite_spec(
    spec: &mut Spec,
    cid: &str,
    host_shared: &Path,
    kind_of: impl Fn(&Path) -> Option<bool>,
) -> Vec<Volume> {
    let guest_shared = Path::new(GUEST_SHARED_DIR);
    if let Some(root) = spec.root_mut() {
        root.set_path(guest_rootfs(cid));
    }
    let mut volumes = Vec::new();
    let Some(mounts) = spec.mounts_mut() else {
        return volumes;
    };
    for (i, m) in mounts.iter_mut().enumerate() {
        if m.destination() == Path::new("/dev/shm") && is_bind(m) {
            *m = shm_tmpfs(m);
            continue;
        }
        if !is_bind(m) {
            continue;
        }
        let Some(source) = m.source().clone() else {
            continue;
        };
        if !source.is_absolute()
            || ["/proc", "/sys", "/dev"]
                .iter()
                .any(|p| source.starts_with(p))
        {
            continue;
        }
        let Some(is_dir) = kind_of(&source) else {
            continue;
        };
        let name = format!("{i}-{}", safe_name(&source));
        let rel = Path::new(cid).join("volumes").join(&name);
        let readonly = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "ro"));
        let v = Volume {
            source: source.clone(),
            host_target: host_shared.join(&rel),
            guest_path: guest_shared.join(&rel),
            readonly,
            is_dir,
        };
        m.set_source(Some(v.guest_path.clone()));
        volumes.push(v);
    }
    volumes
}

/// The guest path of a container's rootfs.
pub fn guest_rootfs(cid: &str) -> PathBuf {
    Path::new(GUEST_SHARED_DIR).join(cid).join("rootfs")
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn shm_tmpfs(m: &Mount) -> Mount {
    let mut t = m.clone();
    t.set_typ(Some("tmpfs".into()));
    t.set_source(Some("shm".into()));
    let mut opts = vec![
        "nosuid".to_string(),
        "noexec".to_string(),
        "nodev".to_string(),
        "mode=1777".to_string(),
        "size=65536k".to_string(),
    ];
    if m.options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == "ro"))
    {
        opts.push("ro".into());
    }
    t.set_options(Some(opts));
    t
}

/// A file-name-safe form of a path's last component.
fn safe_name(p: &Path) -> String {
    let base = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        "v".into()
    } else {
        s
    }
}

/// What a host path is, for [`rewrite_spec`].
pub fn host_kind(p: &Path) -> Option<bool> {
    fs::metadata(p).ok().map(|m| m.is_dir())
}

/// Bind-mounts a volume under the shared directory.
pub fn bind_volume(v: &Volume) -> Result<(), MountError> {
    let t = &v.host_target;
    if let Some(parent) = t.parent() {
        fs::create_dir_all(parent).map_err(fs_err("create", parent))?;
    }
    if v.is_dir {
        fs::create_dir_all(t).map_err(fs_err("create", t))?;
    } else {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(t)
            .map_err(fs_err("create", t))?;
    }
    mount(
        Some(&v.source),
        t,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("bind-mount a volume on", t))?;
    if v.readonly {
        mount(
            None::<&str>,
            t,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(sys("make read-only", t))?;
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn is_mount_point(dir: &Path) -> bool {
    mounts_below(dir).iter().any(|m| m == dir)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// Unmounts everything at or below `dir` (lazily: a file the guest still
/// holds open must not block the pod's deletion).
pub fn unmount_below(dir: &Path) -> Result<(), MountError> {
    let mut first_err = None;
    // A stacked mount needs one umount per layer: repeat while progress is made.
    for _ in 0..8 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            break;
        }
        for m in &mounts {
            if let Err(e) = umount2(m.as_path(), MntFlags::MNT_DETACH) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    first_err.get_or_insert_with(|| sys("unmount", m)(e));
                }
            }
        }
    }
    match (first_err, mounts_below(dir).is_empty()) {
        (_, true) => Ok(()),
        (Some(e), false) => Err(e),
        (None, false) => Err(MountError::StillMounted(dir.to_path_buf())),
    }
}

/// Removes `dir` and what it holds without ever crossing into another
/// filesystem: if an unmount was missed, the image layer or volume below
/// it survives and this fails instead.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fs_err("inspect", dir)(e)),
    };
    if !mounts_below(dir).is_empty() {
        return Err(MountError::StillMounted(dir.to_path_buf()));
    }
    remove_same_dev(dir, meta.dev())
}

fn remove_same_dev(path: &Path, dev: u64) -> Result<(), MountError> {
    // What vanishes meanwhile was removed by someone else (two `shim
    // delete`s of one pod run at once): gone is what we wanted.
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(fs_err("inspect", path)(e)),
    };
    if meta.dev() != dev {
        return Err(MountError::StillMounted(path.to_path_buf()));
    }
    let removed = if meta.is_dir() {
        let entries = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(fs_err("list", path)(e)),
        };
        for e in entries {
            match e {
                Ok(e) => remove_same_dev(&e.path(), dev)?,
                Err(e) if gone(&e) => {}
                Err(e) => return Err(fs_err("list", path)(e)),
            }
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(e) if !gone(&e) => Err(fs_err("remove", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{MountBuilder, RootBuilder, SpecBuilder};

    fn bind(src: &str, dst: &str, ro: bool) -> Mount {
        let mut opts = vec!["rbind".to_string(), "rprivate".to_string()];
        opts.push(if ro { "ro" } else { "rw" }.into());
        MountBuilder::default()
            .destination(dst)
            .typ("bind")
            .source(src)
            .options(opts)
            .build()
            .unwrap()
    }

    fn spec(mounts: Vec<Mount>) -> Spec {
        SpecBuilder::default()
            .root(
                RootBuilder::default()
                    .path("rootfs")
                    .readonly(true)
                    .build()
                    .unwrap(),
            )
            .mounts(mounts)
            .build()
            .unwrap()
    }

    #[test]
    fn root_and_host_binds_point_into_the_shared_dir() {
        let mut s = spec(vec![
            MountBuilder::default()
                .destination("/proc")
                .typ("proc")
                .source("proc")
                .build()
                .unwrap(),
            bind("/var/lib/cri/sandboxes/p1/hosts", "/etc/hosts", false),
            bind(
                "/var/lib/kubelet/pods/u/volumes/secret",
                "/var/run/secrets",
                true,
            ),
            bind("/missing/path", "/data", false),
        ]);
        let vols = rewrite_spec(&mut s, "c1", Path::new("/run/nutshell/p1/shared"), |p| {
            if p.starts_with("/missing") {
                None
            } else {
                Some(!p.ends_with("hosts"))
            }
        });
        let root = s.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/run/nutshell/shared/c1/rootfs"));
        assert_eq!(root.readonly(), Some(true));

        assert_eq!(vols.len(), 2);
        assert_eq!(
            vols[0].host_target,
            Path::new("/run/nutshell/p1/shared/c1/volumes/1-hosts")
        );
        assert_eq!(
            vols[0].guest_path,
            Path::new("/run/nutshell/shared/c1/volumes/1-hosts")
        );
        assert!(!vols[0].is_dir && !vols[0].readonly);
        assert!(vols[1].is_dir && vols[1].readonly);

        let m = s.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            m[1].source().as_deref(),
            Some(Path::new("/run/nutshell/shared/c1/volumes/1-hosts"))
        );
        assert_eq!(
            m[2].source().as_deref(),
            Some(Path::new("/run/nutshell/shared/c1/volumes/2-secret"))
        );
        assert!(m[2].options().as_ref().unwrap().contains(&"ro".to_string()));
        assert_eq!(
            m[3].source().as_deref(),
            Some(Path::new("/missing/path")),
            "a missing source is left for the agent to refuse"
        );
    }

    #[test]
    fn dev_shm_becomes_a_guest_tmpfs_and_dev_sources_stay() {
        let mut s = spec(vec![
            bind("/run/containerd/cri/sandboxes/p/shm", "/dev/shm", false),
            bind("/dev/null", "/masked", true),
        ]);
        let vols = rewrite_spec(&mut s, "c", Path::new("/h"), |_| Some(true));
        assert!(vols.is_empty());
        let m = s.mounts().as_ref().unwrap();
        assert_eq!(m[0].typ().as_deref(), Some("tmpfs"));
        assert_eq!(m[0].source().as_deref(), Some(Path::new("shm")));
        assert_eq!(m[1].source().as_deref(), Some(Path::new("/dev/null")));
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(safe_name(Path::new("/a/b c$")), "b_c_");
        assert_eq!(safe_name(Path::new("/")), "root");
        assert_eq!(safe_name(Path::new("/x/..")), "root");
    }

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/x\\"), PathBuf::from("/x\\"));
    }

    #[test]
    fn remove_tree_removes_plain_trees() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        fs::create_dir_all(t.join("a/b")).unwrap();
        fs::write(t.join("a/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", t.join("link")).unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        assert!(Path::new("/etc").exists(), "symlinks are not followed");
        remove_tree(&t).unwrap();
    }
}
