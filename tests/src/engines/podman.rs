//! The private Podman: its global options and its config.

use std::ffi::OsString;
use std::fs;
use std::io;

use super::Engine;
use crate::netns::bridge_network_conflist;

impl Engine {
    /// `nsenter --net=NETNS podman` and the options that make it private.
    pub(super) fn podman_argv(&self) -> Vec<OsString> {
        let d = |p: &str| self.dir.join(p).into_os_string();
        let mut v: Vec<OsString> = vec![
            "nsenter".into(),
            format!("--net={}", self.netns.path().display()).into(),
            "podman".into(),
        ];
        for (flag, value) in [
            ("--root", d("root")),
            ("--runroot", d("runroot")),
            ("--tmpdir", d("tmp")),
            ("--network-config-dir", d("cni")),
            ("--runtime", self.runtime_bin.clone().into_os_string()),
            // The machine is cgroup v1 without systemd as manager.
            ("--cgroup-manager", "cgroupfs".into()),
            // Not the machine's journal.
            ("--events-backend", "file".into()),
            ("--storage-driver", "overlay".into()),
        ] {
            v.push(flag.into());
            v.push(value);
        }
        v
    }

    /// Podman's `containers.conf` and its CNI config for the default
    /// network `podman`.
    pub(super) fn write_podman_config(&self) -> io::Result<()> {
        // Podman asks for RLIMIT_NOFILE 1048576 and a large RLIMIT_NPROC in
        // every container, and sets its own NPROC to 32768 first (strace
        // shows setrlimit(RLIMIT_NPROC, 32768) before anything else). Without
        // CAP_SYS_RESOURCE (docs: environment.md, "Capabilities") nothing
        // can raise a hard limit, so runc's init fails with "error setting
        // rlimit type 7: operation not permitted". The defaults here are
        // the limits podman's children can have: its own.
        let nofile = hard_limit("Max open files").unwrap_or(1024);
        let nproc = hard_limit("Max processes")
            .unwrap_or(PODMAN_NPROC)
            .min(PODMAN_NPROC);
        // conmon starts the runtime with only these variables.
        let mut env = vec![format!(
            "PATH={}",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        )];
        env.extend(
            self.runtime_env()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        let env = env
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            self.dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \
                 \"nproc={nproc}:{nproc}\"]\n\n[engine]\nconmon_env_vars = [{env}]\n"
            ),
        )?;
        fs::create_dir_all(self.dir.join("cni"))?;
        // Podman 4.3's own default network keeps its IPAM state in the
        // machine's /var/lib/cni/networks: this one, under the same name,
        // keeps it here.
        fs::write(
            self.dir.join("cni/podman.conflist"),
            bridge_network_conflist(
                "podman",
                "cni-podman0",
                PODMAN_SUBNET,
                PODMAN_GATEWAY,
                &self.dir.join("cni-ipam"),
            ),
        )
    }
}

/// Podman's own RLIMIT_NPROC (see [`Engine::write_podman_config`]).
const PODMAN_NPROC: u64 = 32768;
/// The subnet of Podman's default network in the test's namespace.
pub const PODMAN_SUBNET: &str = "10.89.0.0/24";
/// Its gateway, on the bridge in the test's namespace.
pub const PODMAN_GATEWAY: &str = "10.89.0.1";

/// This process's hard limit `what` (a row of /proc/self/limits).
fn hard_limit(what: &str) -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let row = limits.lines().find(|l| l.starts_with(what))?;
    row[what.len()..].split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_limits_read_from_proc() {
        assert!(hard_limit("Max open files").is_some_and(|n| n > 0));
        assert_eq!(hard_limit("No such limit"), None);
    }
}
