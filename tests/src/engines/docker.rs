//! The private dockerd: its config, start and stop, and where it keeps the
//! runtime's state.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Engine, Runtime};

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
            // dockerd sets its own and its containerd's oom_score_adj to
            // -500 by default; lowering it needs CAP_SYS_RESOURCE, which
            // processes here lack (docs: environment.md, "Capabilities").
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
        let log = fs::File::create(self.dir.join("dockerd.log"))?;
        // nsenter execs dockerd (no fork for a network namespace), so the
        // child is dockerd itself.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .arg("dockerd")
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .envs(self.runtime_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.dockerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.dir.join("docker.sock").exists()
                && self.cmd(&["version"]).output()?.status.success()
            {
                return Ok(());
            }
            if let Some(status) = self
                .dockerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "dockerd exited with {status}; log:\n{}",
                    self.log_tail(40)
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "dockerd did not answer within 60 s; log:\n{}",
                    self.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops dockerd with SIGTERM; its exit status when it stopped within
    /// 30 s, `None` when it had to be killed (or was not running).
    pub(super) fn stop_dockerd(&mut self) -> Option<ExitStatus> {
        let mut child = self.dockerd.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
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
