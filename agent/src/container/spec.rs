//! Reading and checking the caller's OCI spec (agent side): everything the
//! engine cannot honour is refused here with a sentence, before any process
//! exists.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::config::NsJoin;
use super::namespaces;
use crate::error::AgentError;

/// Parses the spec JSON.
pub fn parse_spec(id: &str, json: &[u8]) -> Result<Spec, AgentError> {
    serde_json::from_slice::<Spec>(json).map_err(|e| {
        AgentError::invalid(format!(
            "container {id}: the OCI runtime spec is malformed: {e}"
        ))
    })
}

/// Parses an OCI Process JSON (ExecProcess).
pub fn parse_process(id: &str, json: &[u8]) -> Result<Process, AgentError> {
    let p = serde_json::from_slice::<Process>(json).map_err(|e| {
        AgentError::invalid(format!("container {id}: the OCI process is malformed: {e}"))
    })?;
    check_process(id, &p)?;
    Ok(p)
}

fn check_process(id: &str, p: &Process) -> Result<(), AgentError> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::invalid(format!(
            "container {id}: process.args is empty"
        )));
    }
    if !p.cwd().is_absolute() {
        return Err(AgentError::invalid(format!(
            "container {id}: process.cwd {} is not absolute",
            p.cwd().display()
        )));
    }
    if p.console_size().is_some() && !p.terminal().unwrap_or(false) {
        return Err(AgentError::invalid(format!(
            "container {id}: process.consoleSize is set without process.terminal"
        )));
    }
    Ok(())
}

/// Refuses spec fields the engine does not implement.
pub fn check_supported(id: &str, spec: &Spec) -> Result<(), AgentError> {
    let refuse = |what: &str| {
        Err(AgentError::invalid(format!(
            "container {id}: {what} is not supported by nutshell-agent"
        )))
    };
    let Some(process) = spec.process() else {
        return Err(AgentError::invalid(format!(
            "container {id}: the spec has no process"
        )));
    };
    check_process(id, process)?;
    if spec.hooks().as_ref().is_some_and(|h| {
        h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_container().as_ref().is_some_and(|v| !v.is_empty())
            || h.start_container().as_ref().is_some_and(|v| !v.is_empty())
            || h.poststart().as_ref().is_some_and(|v| !v.is_empty())
            || h.poststop().as_ref().is_some_and(|v| !v.is_empty())
    }) {
        return refuse("hooks");
    }
    let Some(linux) = spec.linux() else {
        return Err(AgentError::invalid(format!(
            "container {id}: the spec has no linux section"
        )));
    };
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return refuse("linux.uidMappings/gidMappings (user namespaces)");
    }
    if linux.intel_rdt().is_some() {
        return refuse("linux.intelRdt");
    }
    if linux.personality().is_some() {
        return refuse("linux.personality");
    }
    if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
        return refuse("linux.timeOffsets");
    }
    if let Some(r) = linux.resources() {
        if r.network().is_some() {
            return refuse("linux.resources.network");
        }
        if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("linux.resources.rdma");
        }
    }
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        if namespaces::proc_name(ns.typ()).is_none() {
            return refuse(&format!("a {} namespace", ns.typ()));
        }
    }
    Ok(())
}

/// Namespaces a container shares with its sandbox: where to find them.
#[derive(Debug, Clone, Default)]
pub struct SandboxNs {
    /// Pid of the sandbox's first container, whose namespaces are shared.
    pub holder: Option<i32>,
    /// Whether the pid namespace is shared too.
    pub share_pid: bool,
}

/// What to join and what to create for a new container.
pub fn plan_namespaces(
    id: &str,
    spec: &Spec,
    sandbox: &SandboxNs,
) -> Result<(Vec<NsJoin>, i32), AgentError> {
    let mut join = Vec::new();
    let mut unshare = 0;
    let mut has_mount = false;
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        let kind = ns.typ();
        let name = namespaces::proc_name(kind).unwrap_or("?");
        let flag = namespaces::flag(kind);
        let shared = matches!(
            kind,
            LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts
        ) || (kind == LinuxNamespaceType::Pid && sandbox.share_pid);
        if kind == LinuxNamespaceType::Mount {
            if ns.path().is_some() {
                return Err(AgentError::invalid(format!(
                    "container {id}: joining an existing mount namespace is not supported"
                )));
            }
            has_mount = true;
        }
        match (shared, sandbox.holder, ns.path()) {
            // Inside a sandbox, its namespaces replace whatever path the
            // host put in the spec (a host path means nothing in the guest).
            (true, Some(holder), _) => join.push(NsJoin {
                kind: name.into(),
                flag,
                path: PathBuf::from(format!("/proc/{holder}/ns/{name}")),
            }),
            (_, _, Some(path)) => {
                if !Path::new(path).exists() {
                    return Err(AgentError::invalid(format!(
                        "container {id}: {name} namespace path {} does not exist",
                        path.display()
                    )));
                }
                join.push(NsJoin {
                    kind: name.into(),
                    flag,
                    path: path.clone(),
                });
            }
            _ => unshare |= flag,
        }
    }
    if !has_mount {
        return Err(AgentError::invalid(format!(
            "container {id}: the spec must ask for a mount namespace"
        )));
    }
    // Never the agent's pid namespace (a host-PID container): from there a
    // container sees the agent and every container's processes, and with
    // CAP_KILL signals them. It gets the pod's shared one, else its own.
    if !namespaces
        .iter()
        .any(|ns| ns.typ() == LinuxNamespaceType::Pid)
    {
        let pid = LinuxNamespaceType::Pid;
        match (sandbox.share_pid, sandbox.holder) {
            (true, Some(holder)) => join.push(NsJoin {
                kind: "pid".into(),
                flag: namespaces::flag(pid),
                path: PathBuf::from(format!("/proc/{holder}/ns/pid")),
            }),
            _ => unshare |= namespaces::flag(pid),
        }
    }
    // The mount namespace is joined last; pid before it (setns by path).
    join.sort_by_key(|j| j.kind == "mnt");
    Ok((join, unshare))
}

/// The rootfs: the request's, else the spec's root.path, relative to
/// `<shared_dir>/<id>`. It must be an existing directory.
pub fn rootfs(
    id: &str,
    requested: &str,
    spec: &Spec,
    shared_dir: &Path,
) -> Result<PathBuf, AgentError> {
    let p = if !requested.is_empty() {
        PathBuf::from(requested)
    } else {
        spec.root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default()
    };
    if p.as_os_str().is_empty() {
        return Err(AgentError::invalid(format!(
            "container {id}: no rootfs given (neither in the request nor in root.path)"
        )));
    }
    let p = if p.is_absolute() {
        p
    } else {
        shared_dir.join(id).join(p)
    };
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(AgentError::invalid(format!(
            "container {id}: rootfs {} is not a directory",
            p.display()
        ))),
        Err(e) => Err(AgentError::invalid(format!(
            "container {id}: rootfs {}: {e}",
            p.display()
        ))),
    }
}

/// Container and exec ids become paths (cgroups) and log fields.
pub fn check_id(what: &str, id: &str, allow_empty: bool) -> Result<(), AgentError> {
    if id.is_empty() && allow_empty {
        return Ok(());
    }
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(format!(
            "{what} {id:?} is invalid: use 1 to 128 of [A-Za-z0-9_.-], not starting with '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("spec")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "args": ["sh"], "cwd": "/", "user": { "uid": 0, "gid": 0 } },
            "root": { "path": "rootfs" },
            "linux": { "namespaces": [{ "type": "mount" }, { "type": "pid" }, { "type": "network" }] }
        })
    }

    #[test]
    fn namespaces_are_created_or_shared() {
        let s = spec(base());
        let (join, unshare) = plan_namespaces("c", &s, &SandboxNs::default()).expect("plan");
        assert!(join.is_empty());
        assert_eq!(
            unshare,
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET
        );
        let sb = SandboxNs {
            holder: Some(42),
            share_pid: false,
        };
        let (join, unshare) = plan_namespaces("c", &s, &sb).expect("plan");
        assert_eq!(join.len(), 1);
        assert_eq!(join[0].path, PathBuf::from("/proc/42/ns/net"));
        assert_eq!(unshare, libc::CLONE_NEWNS | libc::CLONE_NEWPID);
    }

    #[test]
    fn a_container_never_gets_the_agents_pid_namespace() {
        let mut j = base();
        j["linux"]["namespaces"] = serde_json::json!([{ "type": "mount" }]);
        let s = spec(j);
        let (join, unshare) = plan_namespaces("c", &s, &SandboxNs::default()).expect("plan");
        assert!(join.is_empty());
        assert_eq!(unshare, libc::CLONE_NEWNS | libc::CLONE_NEWPID);
        let shared = SandboxNs {
            holder: Some(42),
            share_pid: true,
        };
        let (join, unshare) = plan_namespaces("c", &s, &shared).expect("plan");
        assert_eq!(unshare, libc::CLONE_NEWNS);
        assert_eq!(join.len(), 1);
        assert_eq!(join[0].path, PathBuf::from("/proc/42/ns/pid"));
    }

    #[test]
    fn unsupported_fields_are_refused() {
        let mut j = base();
        j["linux"]["namespaces"] = serde_json::json!([{ "type": "pid" }]);
        assert!(plan_namespaces("c", &spec(j), &SandboxNs::default())
            .unwrap_err()
            .to_string()
            .contains("mount namespace"));
        let mut j = base();
        j["linux"]["namespaces"] = serde_json::json!([{ "type": "mount" }, { "type": "user" }]);
        assert!(check_supported("c", &spec(j))
            .unwrap_err()
            .to_string()
            .contains("user"));
        let mut j = base();
        j["process"]["args"] = serde_json::json!([]);
        assert!(check_supported("c", &spec(j))
            .unwrap_err()
            .to_string()
            .contains("args"));
        assert!(parse_spec("c", b"{not json").is_err());
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("container id", "abc-1_2.x", false).is_ok());
        assert!(check_id("container id", "", false).is_err());
        assert!(check_id("container id", "../x", false).is_err());
        assert!(check_id("exec id", "", true).is_ok());
    }
}
