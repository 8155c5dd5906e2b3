//! The container `nutshell run` starts: its OCI runtime spec, and the
//! checks on the rootfs that can be made before a VM is started.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Spec;

/// `PATH` in the container unless `--env PATH=…` says otherwise: the OCI
/// default (runc's, containerd's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command is not in the rootfs. A type of its own so that `main` can
/// exit 127, as a shell does for a command it cannot find.
#[derive(Debug, thiserror::Error)]
#[error("the command `{command}` is not in the rootfs {rootfs} (looked in {looked_in}): pass a command the rootfs holds, or a rootfs that holds it")]
pub struct CommandNotFound {
    pub command: String,
    pub rootfs: PathBuf,
    pub looked_in: String,
}

/// What the container runs.
#[derive(Debug, Clone)]
pub struct Container {
    /// The command and its arguments.
    pub args: Vec<String>,
    /// `K=V` pairs from `--env`, in order (a later one wins).
    pub env: Vec<String>,
    pub hostname: String,
    /// The rootfs as the guest sees it.
    pub guest_rootfs: PathBuf,
    pub readonly: bool,
}

impl Container {
    /// The container's environment: `PATH` first (the default unless
    /// `--env` sets it), then `--env` in order, each name once.
    pub fn environment(&self) -> Vec<String> {
        let mut env: Vec<String> = vec![format!("PATH={DEFAULT_PATH}")];
        for kv in &self.env {
            let name = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != name);
            env.push(kv.clone());
        }
        env
    }

    /// The `PATH` the container's command is looked up in.
    pub fn path_var(&self) -> String {
        self.environment()
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
            .unwrap_or_else(|| DEFAULT_PATH.to_string())
    }

    /// The OCI runtime spec, as JSON: the defaults containerd and runc use
    /// (new pid, mount, ipc, uts and network namespaces, the default
    /// capability set, masked and read-only paths, `/proc`, `/dev`, `/sys`),
    /// with this command, environment, hostname and root.
    pub fn spec_json(&self) -> Result<Vec<u8>> {
        let mut spec = Spec::default();
        spec.set_hostname(Some(self.hostname.clone()));
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(self.guest_rootfs.clone());
        root.set_readonly(Some(self.readonly));
        spec.set_root(Some(root));
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(self.args.clone()));
        process.set_env(Some(self.environment()));
        process.set_cwd(PathBuf::from("/"));
        process.set_terminal(Some(false));
        spec.set_process(Some(process));
        serde_json::to_vec(&spec).context("cannot encode the container's OCI spec")
    }
}

/// Checks `--env` values: `NAME=value` with a non-empty name and no NUL.
pub fn check_env(env: &[String]) -> Result<()> {
    for kv in env {
        match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() && !kv.contains('\0') => {}
            _ => bail!("--env {kv:?} is not of the form NAME=value"),
        }
    }
    Ok(())
}

/// Checks that `rootfs` is a directory holding `command`, looked up the
/// way the container will: a name with a `/` as a path in the rootfs,
/// otherwise in each directory of `path_var`. Symbolic links are resolved
/// inside the rootfs (busybox's applets link to `/bin/busybox`, which
/// must mean the rootfs's, not the host's).
pub fn check_rootfs(rootfs: &Path, command: &str, path_var: &str) -> Result<()> {
    if !rootfs.is_dir() {
        bail!(
            "the rootfs {} is not a directory: pass --rootfs a directory that holds the container's files (an unpacked image)",
            rootfs.display()
        );
    }
    if command.is_empty() {
        bail!("the command is empty: give one after `--`");
    }
    let candidates: Vec<PathBuf> = if command.contains('/') {
        vec![PathBuf::from(command)]
    } else {
        path_var
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| Path::new(d).join(command))
            .collect()
    };
    if candidates
        .iter()
        .any(|c| resolves_to_file(rootfs, c).unwrap_or(false))
    {
        return Ok(());
    }
    let looked_in = if command.contains('/') {
        command.to_string()
    } else {
        path_var.to_string()
    };
    Err(CommandNotFound {
        command: command.to_string(),
        rootfs: rootfs.to_path_buf(),
        looked_in,
    }
    .into())
}

/// One step of a path walked inside the rootfs.
#[derive(Debug)]
enum Step {
    Root,
    Up,
    Name(OsString),
}

/// Whether `path` (absolute inside the rootfs, or relative to its root,
/// the container's cwd) names a regular file of `rootfs`, following
/// symbolic links as the container would see them. `None` when a link
/// chain is too long.
fn resolves_to_file(rootfs: &Path, path: &Path) -> Option<bool> {
    // As the kernel does: give up after 40 links.
    const MAX_LINKS: usize = 40;
    let mut links = 0;
    // Steps still to take (the next one last), and the names walked.
    let mut todo: Vec<Step> = Vec::new();
    push_steps(&mut todo, path);
    let mut done: Vec<OsString> = Vec::new();
    while let Some(step) = todo.pop() {
        let name = match step {
            Step::Root => {
                done.clear();
                continue;
            }
            Step::Up => {
                done.pop();
                continue;
            }
            Step::Name(n) => n,
        };
        let mut host = rootfs.to_path_buf();
        host.extend(&done);
        host.push(&name);
        match std::fs::symlink_metadata(&host) {
            Err(_) => return Some(false),
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                let target = std::fs::read_link(&host).ok()?;
                push_steps(&mut todo, &target);
            }
            Ok(_) => done.push(name),
        }
    }
    let mut host = rootfs.to_path_buf();
    host.extend(&done);
    Some(std::fs::metadata(&host).is_ok_and(|m| m.is_file()))
}

/// Pushes `path`'s steps onto `stack` so that its first step pops first.
fn push_steps(stack: &mut Vec<Step>, path: &Path) {
    let steps: Vec<Step> = path
        .components()
        .filter_map(|c| match c {
            Component::RootDir => Some(Step::Root),
            Component::ParentDir => Some(Step::Up),
            Component::Normal(n) => Some(Step::Name(n.to_os_string())),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    stack.extend(steps.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn container(env: &[&str]) -> Container {
        Container {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: env.iter().map(|s| s.to_string()).collect(),
            hostname: "h".into(),
            guest_rootfs: "/run/nutshell/shared/c/rootfs".into(),
            readonly: true,
        }
    }

    #[test]
    fn environment_has_path_and_later_values_win() {
        let c = container(&["A=1", "PATH=/x", "A=2"]);
        assert_eq!(c.environment(), ["PATH=/x", "A=2"]);
        assert_eq!(c.path_var(), "/x");
        let d = container(&[]);
        assert_eq!(d.environment(), [format!("PATH={DEFAULT_PATH}")]);
    }

    #[test]
    fn env_values_are_checked() {
        check_env(&["A=".into(), "B=c=d".into()]).unwrap();
        assert!(check_env(&["=x".into()]).is_err());
        assert!(check_env(&["NOVALUE".into()]).is_err());
    }

    #[test]
    fn spec_carries_command_env_root_and_hostname() {
        let json: serde_json::Value =
            serde_json::from_slice(&container(&["K=V"]).spec_json().unwrap()).unwrap();
        assert_eq!(
            json["process"]["args"],
            serde_json::json!(["sh", "-c", "true"])
        );
        assert_eq!(json["process"]["cwd"], "/");
        assert_eq!(
            json["process"]["env"],
            serde_json::json!([format!("PATH={DEFAULT_PATH}"), "K=V"])
        );
        assert_eq!(json["root"]["path"], "/run/nutshell/shared/c/rootfs");
        assert_eq!(json["root"]["readonly"], true);
        assert_eq!(json["hostname"], "h");
        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for kind in ["pid", "mount", "ipc", "uts", "network"] {
            assert!(ns.contains(&kind), "{kind} missing from {ns:?}");
        }
    }

    #[test]
    fn commands_are_found_through_links_inside_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("bin/busybox"), b"").unwrap();
        // Absolute links mean the rootfs's root, not the host's.
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
        symlink("/etc/passwd", r.join("bin/hostfile")).unwrap();
        symlink("loop", r.join("bin/loop")).unwrap();
        symlink("/bin", r.join("usr/bin/dir")).unwrap();
        check_rootfs(r, "sh", DEFAULT_PATH).unwrap();
        check_rootfs(r, "env", DEFAULT_PATH).unwrap();
        check_rootfs(r, "/bin/sh", "").unwrap();
        check_rootfs(r, "usr/bin/env", "").unwrap();
        let e = check_rootfs(r, "hostfile", DEFAULT_PATH).unwrap_err();
        assert!(e.downcast_ref::<CommandNotFound>().is_some(), "{e:#}");
        assert!(check_rootfs(r, "loop", DEFAULT_PATH).is_err());
        assert!(check_rootfs(r, "dir", DEFAULT_PATH).is_err());
        assert!(check_rootfs(r, "sh", "/usr/bin").is_err());
        let e = check_rootfs(r, "nope", DEFAULT_PATH).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("`nope`") && text.contains(DEFAULT_PATH),
            "{text}"
        );
        let e = check_rootfs(&r.join("missing"), "sh", DEFAULT_PATH).unwrap_err();
        assert!(format!("{e:#}").contains("is not a directory"));
    }
}
