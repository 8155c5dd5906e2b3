//! The container's file system (init side): the rootfs bind, the spec's
//! mounts, pivot_root, masked and readonly paths, a readonly root.

use std::fs;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

use super::config::InitConfig;
use super::devices;
use super::init::{Context, InitError, InitResult};

/// Mount flags, propagation changes and file-system data parsed from a
/// spec mount's options.
#[derive(Debug, PartialEq)]
pub struct MountOptions {
    /// Flags for mount(2).
    pub flags: MsFlags,
    /// Flags that must be cleared (e.g. `rw` after a default).
    pub clear: MsFlags,
    /// MS_SHARED/MS_PRIVATE/... (+ MS_REC) applied after the mount.
    pub propagation: Vec<MsFlags>,
    /// Options the file system itself parses.
    pub data: Vec<String>,
    /// `tmpcopyup`: the new tmpfs starts with what the image had there.
    pub copy_up: bool,
}

/// Parses mount(8)-style options.
pub fn parse_options(options: &[String]) -> Result<MountOptions, String> {
    let mut o = MountOptions {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
        copy_up: false,
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let base = match opt.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                let rec = if opt.starts_with('r') {
                    MsFlags::MS_REC
                } else {
                    MsFlags::empty()
                };
                o.propagation.push(base | rec);
                continue;
            }
            "idmap" | "ridmap" => {
                return Err(format!(
                    "mount option {opt:?} (id-mapped mounts) is not supported"
                ))
            }
            "tmpcopyup" => {
                o.copy_up = true;
                continue;
            }
            other => {
                o.data.push(other.to_string());
                continue;
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
        o.clear.insert(clear);
    }
    Ok(o)
}

/// Joins `path` under `root` the way the container will see it: symlinks
/// resolve inside `root`, and `..` never climbs out of it.
pub fn secure_join(root: &Path, path: &Path) -> InitResult<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    while let Some(p) = pending.pop() {
        let mut comps: Vec<Component> = p.components().collect();
        comps.reverse();
        while let Some(c) = comps.pop() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let candidate = resolved.join(name);
                    match fs::read_link(root.join(&candidate)) {
                        Ok(target) => {
                            links += 1;
                            if links > 40 {
                                return Err(InitError::invalid(format!(
                                    "too many symbolic links in {}",
                                    path.display()
                                )));
                            }
                            if target.is_absolute() {
                                resolved = PathBuf::new();
                            }
                            let rest: PathBuf = comps.iter().rev().collect();
                            pending.push(rest);
                            pending.push(target);
                            break;
                        }
                        Err(_) => resolved = candidate,
                    }
                }
            }
        }
    }
    Ok(root.join(resolved))
}

fn create_mount_point(dest: &Path, is_file: bool) -> InitResult<()> {
    if dest.symlink_metadata().is_ok() {
        return Ok(());
    }
    if is_file {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        fs::File::create(dest).ctx(|| format!("creating {}", dest.display()))?;
    } else {
        fs::create_dir_all(dest).ctx(|| format!("creating {}", dest.display()))?;
    }
    Ok(())
}

fn do_mount(rootfs: &Path, m: &Mount, cgroup_v2: bool) -> InitResult<()> {
    let dest_in = m.destination();
    if !dest_in.is_absolute() {
        return Err(InitError::invalid(format!(
            "mount destination {} is not absolute",
            dest_in.display()
        )));
    }
    let opts =
        parse_options(m.options().as_deref().unwrap_or_default()).map_err(InitError::invalid)?;
    let dest = secure_join(rootfs, dest_in)?;
    let spec_type = m.typ().clone().unwrap_or_default();
    let mut fstype = spec_type.clone();
    let is_bind = opts.flags.contains(MsFlags::MS_BIND) || fstype == "bind";
    let mut source = m.source().clone().unwrap_or_default();
    if is_bind && source.is_relative() {
        // A bind's source is a path in the agent's view, never one in the
        // rootfs (the working directory while mounts are made).
        source = Path::new("/").join(source);
    }
    let data = opts.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let what = || {
        format!(
            "mounting {} ({}) on {}",
            source.display(),
            if is_bind { "bind" } else { spec_type.as_str() },
            dest_in.display()
        )
    };
    if is_bind {
        let is_file = fs::metadata(&source).map(|md| !md.is_dir()).ctx(what)?;
        create_mount_point(&dest, is_file)?;
        let flags = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        mount(Some(&source), &dest, None::<&str>, flags, None::<&str>).ctx(what)?;
        // Bind mounts ignore every other flag until remounted.
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .ctx(what)?;
        }
    } else {
        if fstype == "cgroup" || fstype == "cgroup2" {
            if !cgroup_v2 {
                // The host has no cgroup v2 (cgroup v1 hosts): the container
                // gets no cgroup file system, which README documents.
                tracing::debug!("no cgroup v2: not mounting {}", dest_in.display());
                return Ok(());
            }
            fstype = "cgroup2".to_string();
        }
        create_mount_point(&dest, false)?;
        if opts.copy_up {
            if fstype != "tmpfs" {
                return Err(InitError::invalid(format!(
                    "mount option \"tmpcopyup\" on {} needs a tmpfs, not {fstype:?}",
                    dest_in.display()
                )));
            }
            return tmpfs_copy_up(&dest, opts.flags, data).ctx(what);
        }
        let res = mount(
            Some(&source),
            &dest,
            Some(fstype.as_str()),
            opts.flags,
            data,
        );
        if let (Err(nix::Error::EPERM), "sysfs") = (&res, fstype.as_str()) {
            // sysfs needs a new network namespace; without one, bind the
            // agent's /sys read-only, as runc does.
            mount(
                Some("/sys"),
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(what)?;
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .ctx(what)?;
        } else {
            res.ctx(what)?;
        }
    }
    for p in &opts.propagation {
        mount(None::<&str>, &dest, None::<&str>, *p, None::<&str>).ctx(what)?;
    }
    Ok(())
}

/// `tmpcopyup` (runc's and crun's extension; Podman's `--read-only` puts
/// it on `/run`, `/tmp` and `/var/tmp`): a tmpfs is mounted aside, what
/// `dest` holds in the image is copied into it, and it is moved onto
/// `dest`. The aside directory is under the guest's `/run`, which the
/// container never sees (it is not under the rootfs).
fn tmpfs_copy_up(dest: &Path, flags: MsFlags, data: Option<&str>) -> std::io::Result<()> {
    let aside = PathBuf::from(format!("/run/nutshell-copyup-{}", std::process::id()));
    fs::create_dir_all(&aside)?;
    let writable = flags & !MsFlags::MS_RDONLY;
    let r = mount(Some("tmpfs"), &aside, Some("tmpfs"), writable, data)
        .map_err(std::io::Error::from)
        .and_then(|()| {
            let moved = copy_tree(dest, &aside).and_then(|()| {
                mount(
                    Some(&aside),
                    dest,
                    None::<&str>,
                    MsFlags::MS_MOVE,
                    None::<&str>,
                )
                .map_err(std::io::Error::from)
            });
            if moved.is_err() {
                let _ = umount2(&aside, MntFlags::MNT_DETACH);
            }
            moved
        })
        .and_then(|()| {
            if flags.contains(MsFlags::MS_RDONLY) {
                let ro = MsFlags::MS_REMOUNT | flags;
                mount(None::<&str>, dest, None::<&str>, ro, data).map_err(std::io::Error::from)
            } else {
                Ok(())
            }
        });
    let _ = fs::remove_dir(&aside);
    r
}

/// Copies the tree under `src` into the existing directory `dst`: files,
/// directories and symlinks with their modes and owners (`dst` takes
/// `src`'s own).
fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{chown, lchown, MetadataExt, PermissionsExt};
    let md = fs::symlink_metadata(src)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    chown(dst, Some(md.uid()), Some(md.gid()))?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let md = fs::symlink_metadata(&from)?;
        let kind = md.file_type();
        if kind.is_dir() {
            fs::create_dir(&to)?;
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            lchown(&to, Some(md.uid()), Some(md.gid()))?;
        } else if kind.is_file() {
            fs::copy(&from, &to)?;
            chown(&to, Some(md.uid()), Some(md.gid()))?;
        }
        // Sockets, FIFOs and device nodes are not copied, as with runc.
    }
    Ok(())
}

/// Makes the new mount namespace private, binds the rootfs onto itself (so
/// it is a mount point pivot_root accepts) and makes the spec's mounts and
/// the default /dev nodes under it.
pub fn prepare_rootfs(cfg: &InitConfig) -> InitResult<()> {
    let linux = cfg.spec.linux().as_ref();
    let propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") | Some("rprivate") | Some("private") => {
            MsFlags::MS_PRIVATE | MsFlags::MS_REC
        }
        Some("rslave") | Some("slave") => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        // pivot_root refuses a shared parent mount, and a shared root would
        // leak the container's mounts into the agent's namespace.
        Some(other @ ("rshared" | "shared")) => {
            return Err(InitError::unsupported(format!(
                "rootfsPropagation {other:?} is not supported"
            )))
        }
        Some(other) => {
            return Err(InitError::unsupported(format!(
                "rootfsPropagation {other:?} is not supported"
            )))
        }
    };
    // Nothing the container mounts may reach the agent's namespace.
    mount(None::<&str>, "/", None::<&str>, propagation, None::<&str>)
        .ctx(|| "setting the rootfs propagation".into())?;
    let rootfs = &cfg.rootfs;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("binding the rootfs {}", rootfs.display()))?;
    // The rootfs lies under the virtio-fs share, whose guest cache is off
    // (virtiofsd --cache never): each lookup of an absolute path asks
    // virtiofsd again for every shared component above the rootfs, a round
    // trip to the host each, milliseconds under TCG. Paths relative to the
    // rootfs's own directory skip them: 25-30 ms of a container's set-up
    // there (README, "Where a pod's start goes").
    nix::unistd::chdir(rootfs).ctx(|| format!("chdir to {}", rootfs.display()))?;
    let here = Path::new(".");
    for m in cfg.spec.mounts().as_deref().unwrap_or_default() {
        do_mount(here, m, cfg.cgroup_v2)?;
    }
    devices::create_default_nodes(here, cfg.spec.linux().as_ref())?;
    Ok(())
}

/// pivot_root into `rootfs` and detach the old root.
pub fn pivot_root(rootfs: &Path) -> InitResult<()> {
    nix::unistd::chdir(rootfs).ctx(|| format!("chdir to {}", rootfs.display()))?;
    // pivot_root(".", ".") stacks the old root under the new one, so no
    // put_old directory is needed in the rootfs.
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    // The old root must not propagate our unmount to the agent's namespace.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| "making the old root a slave".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
    Ok(())
}

/// Applies maskedPaths (hidden behind /dev/null or an empty readonly tmpfs)
/// and readonlyPaths (readonly bind mounts). Missing paths are skipped, as
/// the spec allows.
pub fn mask_and_protect(spec: &Spec) -> InitResult<()> {
    let Some(linux) = spec.linux() else {
        return Ok(());
    };
    for p in linux.masked_paths().as_deref().unwrap_or_default() {
        let path = Path::new(p);
        let Ok(md) = fs::metadata(path) else { continue };
        let res = if md.is_dir() {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )
        } else {
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        res.ctx(|| format!("masking {p}"))?;
    }
    for p in linux.readonly_paths().as_deref().unwrap_or_default() {
        let path = Path::new(p);
        if fs::symlink_metadata(path).is_err() {
            continue;
        }
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("binding readonly path {p}"))?;
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("making {p} readonly"))?;
    }
    Ok(())
}

/// Remounts the (pivoted) root readonly.
pub fn readonly_root() -> InitResult<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .ctx(|| "making the rootfs readonly".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&strings(&[
            "nosuid",
            "noexec",
            "mode=755",
            "size=65536k",
            "rslave",
            "ro",
        ]))
        .expect("ok");
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, strings(&["mode=755", "size=65536k"]));
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        let o = parse_options(&strings(&["rbind", "ro", "rw"])).expect("ok");
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(parse_options(&strings(&["idmap"])).is_err());
        let o = parse_options(&strings(&["tmpcopyup", "nosuid"])).expect("ok");
        assert!(o.copy_up);
        assert_eq!(o.data, Vec::<String>::new());
    }

    #[test]
    fn a_copied_up_tree_keeps_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tmp");
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir_all(src.join("sub")).expect("mkdir");
        fs::write(src.join("sub/file"), "data").expect("write");
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o1777)).expect("chmod");
        std::os::unix::fs::symlink("sub/file", src.join("link")).expect("symlink");
        fs::create_dir(&dst).expect("mkdir");
        copy_tree(&src, &dst).expect("copy");
        assert_eq!(fs::read_to_string(dst.join("link")).expect("read"), "data");
        assert_eq!(
            fs::read_link(dst.join("link")).expect("link"),
            Path::new("sub/file")
        );
        let mode = fs::metadata(dst.join("sub"))
            .expect("md")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1777);
    }

    #[test]
    fn secure_join_stays_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("a/abs")).expect("link");
        std::os::unix::fs::symlink("../../..", root.join("a/b/up")).expect("link");
        assert_eq!(
            secure_join(root, Path::new("/a/b/c")).expect("join"),
            root.join("a/b/c")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).expect("join"),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/abs/passwd")).expect("join"),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/b/up/y")).expect("join"),
            root.join("y")
        );
    }
}
