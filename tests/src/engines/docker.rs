//! The private dockerd: its config, start and stop, and where it keeps the
//! runtime's state.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::{Engine, Runtime};
use crate::{start_daemon, terminate};

impl Engine {
    /// `docker -H unix://SOCKET`.
    pub(super) fn docker_argv(&self) -> Vec<OsString> {
        vec![
            "docker".into(),
            "-H".into(),
            format!("unix://{}", self.dir.join("docker.sock").display()).into(),
        ]
    }

    /// Writes dockerd's config, starts it in the namespace and waits until
    /// it answers.
    pub(super) fn start_dockerd(&mut self) -> io::Result<()> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let config = serde_json::json!({
            "data-root": d("data"),
            "exec-root": d("exec"),
            "pidfile": d("dockerd.pid"),
            "hosts": [format!("unix://{}", d("docker.sock"))],
            // Otherwise dockerd writes its trust key to /etc/docker.
            "deprecated-key-path": d("key.json"),
            "cgroup-parent": self.cgroup_parent,
            // dockerd can lower its own and its containerd's oom_score_adj
            // (--oom-score-adjust), which needs CAP_SYS_RESOURCE, missing
            // here (docs: environment.md, "Capabilities"). 0 is what
            // Debian's 20.10 uses by default (the containerd.toml it
            // writes says oom_score = 0): said outright, so no other
            // default applies.
            "oom-score-adjust": 0,
            "default-runtime": self.runtime.docker_name(),
            "runtimes": match self.runtime {
                Runtime::Runc => serde_json::json!({}),
                Runtime::Nutshell => serde_json::json!({
                    "nutshell": { "path": self.runtime_bin.display().to_string() }
                }),
            },
        });
        fs::write(self.dir.join("daemon.json"), config.to_string())?;
        // nsenter execs dockerd (no fork for a network namespace), so the
        // child is dockerd itself.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.path().display()))
            .arg("dockerd")
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .envs(self.runtime_env());
        let child = start_daemon(
            &mut cmd,
            "dockerd",
            &self.dir.join("dockerd.log"),
            Duration::from_secs(60),
            || {
                Ok(self.dir.join("docker.sock").exists()
                    && self.cmd(&["version"]).output()?.status.success())
            },
            || self.log_tail(40),
        )?;
        self.dockerd = Some(child);
        Ok(())
    }

    /// Stops dockerd with SIGTERM; its exit status when it stopped within
    /// 30 s, `None` when it had to be killed (or was not running).
    pub(super) fn stop_dockerd(&mut self) -> Option<ExitStatus> {
        terminate(self.dockerd.take()?, Duration::from_secs(30))
            .ok()
            .flatten()
    }

    /// The state roots dockerd gives the runtime (`<exec-root>/runtime-*/moby`).
    pub(super) fn docker_runtime_roots(&self) -> Vec<PathBuf> {
        fs::read_dir(self.dir.join("exec"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().as_bytes().starts_with(b"runtime-"))
                    .map(|e| e.path().join("moby"))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    }
}
