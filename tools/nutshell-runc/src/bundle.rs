//! The bundle: its `config.json`, what of it runs on the host (hooks, the
//! network namespace) and what the guest gets.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Hook, LinuxNamespaceType, Spec};

/// Errors reading a bundle or refusing its spec.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: it should be the bundle's OCI runtime spec (is --bundle right?)")]
    Read {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("the spec has no root.path: nutshell-runc needs the container's root filesystem")]
    NoRoot,
    #[error("the spec has no process to run")]
    NoProcess,
    #[error("the spec joins the {typ} namespace at {path}: each nutshell container has a VM of its own, so it cannot join another container's namespaces (Podman pods, docker --network/--ipc/--pid container:); run such containers with runc")]
    JoinsNamespace { typ: String, path: PathBuf },
    #[error("the spec has {0} hooks, which run inside the container; the container is inside a VM where host programs cannot run, so nutshell-runc refuses them (prestart, createRuntime, poststart and poststop hooks run on the host and are fine)")]
    InContainerHooks(&'static str),
}

/// Where the container's network comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetPlan {
    /// No network namespace in the spec: the host's, which a VM cannot
    /// share; the guest gets loopback only.
    Host,
    /// A new namespace: the stand-in makes it, hooks (Docker's libnetwork)
    /// configure it, and the VM mirrors it.
    New,
    /// An existing namespace (Podman's netavark, CNI), mirrored.
    Join(PathBuf),
}

/// A bundle as `create` reads it.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
}

impl Bundle {
    /// Reads `<dir>/config.json` and checks what nutshell-runc cannot do.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let path = dir.join("config.json");
        let spec = Spec::load(&path).map_err(|source| BundleError::Read { path, source })?;
        let me = Self {
            dir: dir.to_path_buf(),
            spec,
        };
        me.check()?;
        Ok(me)
    }

    fn check(&self) -> Result<(), BundleError> {
        if self.spec.root().is_none() {
            return Err(BundleError::NoRoot);
        }
        if self.spec.process().is_none() {
            return Err(BundleError::NoProcess);
        }
        if let Some(h) = self.spec.hooks() {
            for (name, hooks) in [
                ("createContainer", h.create_container()),
                ("startContainer", h.start_container()),
            ] {
                if hooks.as_ref().is_some_and(|v| !v.is_empty()) {
                    return Err(BundleError::InContainerHooks(name));
                }
            }
        }
        for ns in self.namespaces() {
            let Some(path) = ns.path() else { continue };
            // A network namespace by path is mirrored; one of another
            // container (a /proc path: its stand-in's) already feeds that
            // container's VM.
            if ns.typ() == LinuxNamespaceType::Network && !path.starts_with("/proc") {
                continue;
            }
            return Err(BundleError::JoinsNamespace {
                typ: ns.typ().to_string(),
                path: path.clone(),
            });
        }
        Ok(())
    }

    fn namespaces(&self) -> &[oci_spec::runtime::LinuxNamespace] {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_deref())
            .unwrap_or_default()
    }

    /// The root filesystem on the host (`root.path`, relative to the bundle).
    pub fn rootfs(&self) -> PathBuf {
        let root = self.spec.root().as_ref().map(|r| r.path().clone());
        self.dir
            .join(root.unwrap_or_else(|| PathBuf::from("rootfs")))
    }

    pub fn net_plan(&self) -> NetPlan {
        match self
            .namespaces()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
        {
            None => NetPlan::Host,
            Some(n) => match n.path() {
                Some(p) => NetPlan::Join(p.clone()),
                None => NetPlan::New,
            },
        }
    }

    /// The hooks of one kind that run on the host.
    pub fn hooks(&self, kind: HookKind) -> Vec<Hook> {
        let Some(h) = self.spec.hooks() else {
            return Vec::new();
        };
        #[allow(deprecated)] // prestart: deprecated by OCI, still Docker 20.10's
        let v = match kind {
            HookKind::CreateRuntime => h.create_runtime(),
            HookKind::Prestart => h.prestart(),
            HookKind::Poststart => h.poststart(),
            HookKind::Poststop => h.poststop(),
        };
        v.clone().unwrap_or_default()
    }

    /// The spec the guest gets: no hooks (they ran on the host), and no
    /// network namespace entry, since the guest's own namespace is the
    /// mirror of the container's.
    pub fn guest_spec(&self) -> Spec {
        let mut spec = self.spec.clone();
        spec.set_hooks(None);
        if let Some(nss) = spec
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut())
        {
            nss.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
        spec
    }

    /// The hostname the guest gets.
    pub fn hostname(&self, id: &str) -> String {
        self.spec
            .hostname()
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| id.chars().take(12).collect())
    }
}

/// The host-side hooks, in the order the OCI spec runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    CreateRuntime,
    Prestart,
    Poststart,
    Poststop,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateRuntime => "createRuntime",
            Self::Prestart => "prestart",
            Self::Poststart => "poststart",
            Self::Poststop => "poststop",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: serde_json::Value) -> Result<Bundle, BundleError> {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("config.json"), spec.to_string()).unwrap();
        Bundle::load(t.path())
    }

    fn spec(namespaces: serde_json::Value, hooks: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hooks": hooks,
            "linux": {"namespaces": namespaces}
        })
    }

    #[test]
    fn network_namespaces_are_planned_and_left_out_of_the_guest_spec() {
        let b = bundle(spec(
            serde_json::json!([{"type": "pid"}, {"type": "network"}]),
            serde_json::json!({"prestart": [{"path": "/bin/true"}]}),
        ))
        .unwrap();
        assert_eq!(b.net_plan(), NetPlan::New);
        assert_eq!(b.hooks(HookKind::Prestart).len(), 1);
        let g = b.guest_spec();
        assert!(g.hooks().is_none());
        let nss = g.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert_eq!(nss.len(), 1);
        assert_eq!(nss[0].typ(), LinuxNamespaceType::Pid);

        let b = bundle(spec(
            serde_json::json!([{"type": "network", "path": "/run/netns/x"}]),
            serde_json::json!({}),
        ))
        .unwrap();
        assert_eq!(b.net_plan(), NetPlan::Join("/run/netns/x".into()));
        let b = bundle(spec(serde_json::json!([]), serde_json::json!({}))).unwrap();
        assert_eq!(b.net_plan(), NetPlan::Host);
    }

    #[test]
    fn what_a_vm_cannot_do_is_refused_with_the_reason() {
        let e = bundle(spec(
            serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]),
            serde_json::json!({}),
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("ipc namespace at /proc/1/ns/ipc"),
            "{e}"
        );
        let e = bundle(spec(
            serde_json::json!([{"type": "network", "path": "/proc/7/ns/net"}]),
            serde_json::json!({}),
        ))
        .unwrap_err();
        assert!(matches!(e, BundleError::JoinsNamespace { .. }), "{e}");
        let e = bundle(spec(
            serde_json::json!([]),
            serde_json::json!({"startContainer": [{"path": "/x"}]}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("startContainer hooks"), "{e}");
        let t = tempfile::tempdir().unwrap();
        let e = Bundle::load(t.path()).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
