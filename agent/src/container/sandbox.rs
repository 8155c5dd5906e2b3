//! The pod sandbox: its hostname and DNS, its storages (the shared
//! directory), and whose namespaces its containers share.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags};
use nutshell_protocol::agent::CreateSandboxRequest;

use super::mounts::parse_options;
use super::spec::SandboxNs;
use crate::error::AgentError;

/// Where container rootfs live unless CreateSandbox says otherwise.
pub const DEFAULT_SHARED_DIR: &str = "/run/nutshell/shared";

/// The sandbox state.
pub struct Sandbox {
    pid1: bool,
    active: bool,
    hostname: Option<String>,
    shared_dir: PathBuf,
    shared_pid_ns: bool,
    /// The first container's init: the namespaces later containers join.
    holder: Option<i32>,
    mounts: Vec<PathBuf>,
}

impl Sandbox {
    /// No sandbox yet.
    pub fn new(pid1: bool) -> Self {
        Self {
            pid1,
            active: false,
            hostname: None,
            shared_dir: PathBuf::from(DEFAULT_SHARED_DIR),
            shared_pid_ns: false,
            holder: None,
            mounts: Vec::new(),
        }
    }

    /// Where relative rootfs paths resolve.
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// Whether CreateSandbox has run (and DestroySandbox not since).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The hostname for containers with their own UTS namespace.
    pub fn hostname(&self) -> Option<String> {
        self.hostname.clone()
    }

    /// The namespaces a new container shares.
    pub fn namespaces(&self) -> SandboxNs {
        if !self.active {
            return SandboxNs::default();
        }
        SandboxNs {
            holder: self.holder,
            share_pid: self.shared_pid_ns,
        }
    }

    /// Records the first container of the sandbox.
    pub fn container_created(&mut self, pid: i32) {
        if self.active && self.holder.is_none() {
            self.holder = Some(pid);
        }
    }

    /// Forgets the holder when it goes.
    pub fn container_removed(&mut self, pid: i32) {
        if self.holder == Some(pid) {
            self.holder = None;
        }
    }

    /// CreateSandbox: mounts the storages, writes resolv.conf (in a guest),
    /// remembers hostname and sharing.
    pub fn create(&mut self, req: &CreateSandboxRequest) -> Result<(), AgentError> {
        if self.active {
            return Err(AgentError::AlreadyExists(
                "a sandbox already exists in this agent".into(),
            ));
        }
        if !req.hostname.is_empty() && (req.hostname.len() > 64 || req.hostname.contains('\0')) {
            return Err(AgentError::invalid(format!(
                "hostname {:?} is invalid",
                req.hostname
            )));
        }
        let shared_dir = if req.shared_dir.is_empty() {
            PathBuf::from(DEFAULT_SHARED_DIR)
        } else {
            PathBuf::from(&req.shared_dir)
        };
        if !shared_dir.is_absolute() {
            return Err(AgentError::invalid(format!(
                "shared_dir {} is not absolute",
                shared_dir.display()
            )));
        }
        let mut mounted = Vec::new();
        for s in &req.storages {
            match mount_storage(s) {
                Ok(p) => mounted.push(p),
                Err(e) => {
                    for p in mounted.iter().rev() {
                        let _ = umount2(p, MntFlags::MNT_DETACH);
                    }
                    return Err(e);
                }
            }
        }
        if self.pid1 {
            // The guest is ours: its /etc is the agent's tmpfs root.
            if !req.hostname.is_empty() {
                let _ = nix::unistd::sethostname(&req.hostname);
            }
            let _ = std::fs::create_dir_all("/etc");
            let _ = std::fs::write("/etc/resolv.conf", resolv_conf(req));
        }
        self.active = true;
        self.hostname = (!req.hostname.is_empty()).then(|| req.hostname.clone());
        self.shared_dir = shared_dir;
        self.shared_pid_ns = req.shared_pid_ns;
        self.holder = None;
        self.mounts = mounted;
        tracing::info!(sandbox = %req.sandbox_id, "sandbox created");
        Ok(())
    }

    /// Unmounts the storages and forgets the sandbox.
    pub fn destroy(&mut self) {
        for p in self.mounts.drain(..).rev() {
            if let Err(e) = umount2(&p, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {} failed: {e}", p.display());
            }
        }
        *self = Self::new(self.pid1);
    }
}

fn resolv_conf(req: &CreateSandboxRequest) -> String {
    let mut out = String::new();
    for s in &req.dns_servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !req.dns_searches.is_empty() {
        out.push_str(&format!("search {}\n", req.dns_searches.join(" ")));
    }
    if !req.dns_options.is_empty() {
        out.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    out
}

fn mount_storage(s: &nutshell_protocol::agent::Storage) -> Result<PathBuf, AgentError> {
    let target = PathBuf::from(&s.mount_point);
    if !target.is_absolute() {
        return Err(AgentError::invalid(format!(
            "storage mount point {:?} is not absolute",
            s.mount_point
        )));
    }
    let opts = parse_options(&s.options).map_err(AgentError::invalid)?;
    std::fs::create_dir_all(&target)
        .map_err(|e| AgentError::internal(format!("creating {}: {e}", target.display())))?;
    let data = opts.data.join(",");
    mount(
        Some(s.source.as_str()),
        &target,
        Some(s.fstype.as_str()),
        opts.flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| {
        AgentError::internal(format!(
            "mounting {} ({}) on {}: {e}",
            s.source,
            s.fstype,
            target.display()
        ))
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_searches_options() {
        let req = CreateSandboxRequest {
            dns_servers: vec!["10.0.0.2".into()],
            dns_searches: vec!["a.example".into(), "b.example".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&req),
            "nameserver 10.0.0.2\nsearch a.example b.example\noptions ndots:5\n"
        );
    }

    #[test]
    fn the_first_container_holds_the_namespaces() {
        let mut sb = Sandbox::new(false);
        sb.container_created(10);
        assert_eq!(sb.namespaces().holder, None, "no sandbox: nothing shared");
        sb.create(&CreateSandboxRequest {
            shared_pid_ns: true,
            ..Default::default()
        })
        .expect("create");
        sb.container_created(10);
        sb.container_created(11);
        assert_eq!(sb.namespaces().holder, Some(10));
        assert!(sb.namespaces().share_pid);
        assert!(sb.create(&CreateSandboxRequest::default()).is_err());
        sb.container_removed(10);
        assert_eq!(sb.namespaces().holder, None);
    }
}
