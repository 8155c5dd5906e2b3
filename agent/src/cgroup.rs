//! cgroup v2 for containers: one cgroup per container under
//! `/sys/fs/cgroup/nutshell/`, resources, freezer, stats and OOM counts.
//!
//! Only cgroup v2 is supported (the guest kernel is pure v2). Where no v2
//! hierarchy is mounted (cgroup v1 hosts), containers run without a cgroup
//! and every request that needs one fails with [`unavailable`].

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nutshell_protocol::agent as pb;
use oci_spec::runtime::LinuxResources;

use crate::error::AgentError;

/// Where the agent mounts (and expects) the cgroup v2 hierarchy.
pub const ROOT: &str = "/sys/fs/cgroup";

/// Whether a cgroup v2 hierarchy is mounted at /sys/fs/cgroup.
pub fn available() -> bool {
    nix::sys::statfs::statfs(ROOT)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The error for requests that need cgroup v2 where it is missing.
pub fn unavailable(what: &str) -> AgentError {
    AgentError::FailedPrecondition(format!(
        "{what} needs cgroup v2, which is unavailable here (no cgroup2 file system at {ROOT}; \
         the nutshell guest has one, a cgroup v1 host does not)"
    ))
}

/// Whether the resources ask for anything a cgroup would enforce. Device
/// rules are not counted: device access is decided by the nodes in /dev.
pub fn resources_need_cgroup(r: &LinuxResources) -> bool {
    r.cpu().as_ref().is_some_and(|c| {
        c.shares().is_some()
            || c.quota().is_some()
            || c.cpus().is_some()
            || c.mems().is_some()
            || c.period().is_some()
    }) || r
        .memory()
        .as_ref()
        .is_some_and(|m| m.limit().is_some() || m.reservation().is_some() || m.swap().is_some())
        || r.pids().as_ref().is_some()
        || r.block_io().as_ref().is_some_and(|b| b.weight().is_some())
        || r.unified().as_ref().is_some_and(|u| !u.is_empty())
        || r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), AgentError> {
    fs::write(dir.join(file), value).map_err(|e| {
        AgentError::internal(format!(
            "writing {value:?} to {}: {e}",
            dir.join(file).display()
        ))
    })
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// Creates the parent of the containers' cgroups and enables its
/// controllers, once per agent. PID 1 calls it at boot: enabling
/// controllers costs the first container ~40 ms under TCG otherwise, and a
/// warm VM boots long before its first container comes.
pub fn prepare_parent() -> Result<&'static Path, AgentError> {
    static PARENT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = PARENT.get() {
        return Ok(p);
    }
    let parent = Path::new(ROOT).join("nutshell");
    match fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(AgentError::internal(format!(
                "creating {}: {e}",
                parent.display()
            )))
        }
    }
    crate::pid1::enable_cgroup_controllers(&parent);
    Ok(PARENT.get_or_init(|| parent))
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/nutshell/<id>`, enabling the controllers for
    /// it on the way.
    pub fn create(id: &str) -> Result<Self, AgentError> {
        let parent = prepare_parent()?;
        let path = parent.join(id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            // Left by a create whose caller gave up mid-way: reuse it
            // when empty (a busy one is refused by the id check first).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !Self::at(&path).procs().is_empty() {
                    return Err(AgentError::FailedPrecondition(format!(
                        "cgroup {} is still in use",
                        path.display()
                    )));
                }
            }
            Err(e) => {
                return Err(AgentError::internal(format!(
                    "creating {}: {e}",
                    path.display()
                )))
            }
        }
        Ok(Self { path })
    }

    /// A handle on an existing cgroup directory (for watchers).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process in.
    pub fn add(&self, pid: i32) -> Result<(), AgentError> {
        write(&self.path, "cgroup.procs", &pid.to_string())
    }

    /// Applies OCI resources, converted to their v2 files.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), AgentError> {
        if r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()) {
            return Err(AgentError::invalid(
                "linux.resources.hugepageLimits is not supported",
            ));
        }
        if let Some(cpu) = r.cpu() {
            if let Some(shares) = cpu.shares() {
                // runc's conversion of cpu shares [2, 262144] to weight [1, 10000].
                let weight = if shares == 0 {
                    100
                } else {
                    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
                };
                write(&self.path, "cpu.weight", &weight.to_string())?;
            }
            if cpu.quota().is_some() || cpu.period().is_some() {
                let quota = cpu
                    .quota()
                    .filter(|q| *q > 0)
                    .map(|q| q.to_string())
                    .unwrap_or_else(|| "max".into());
                write(
                    &self.path,
                    "cpu.max",
                    &format!("{quota} {}", cpu.period().unwrap_or(100_000)),
                )?;
            }
            if let Some(cpus) = cpu.cpus() {
                write(&self.path, "cpuset.cpus", cpus)?;
            }
            if let Some(mems) = cpu.mems() {
                write(&self.path, "cpuset.mems", mems)?;
            }
        }
        if let Some(mem) = r.memory() {
            if let Some(l) = mem.limit() {
                write(&self.path, "memory.max", &limit(l))?;
            }
            if let Some(l) = mem.reservation() {
                write(&self.path, "memory.low", &limit(l))?;
            }
            if let Some(swap) = mem.swap() {
                // OCI's swap is memory+swap; v2's swap.max is swap alone.
                let v = match (swap, mem.limit()) {
                    (s, _) if s < 0 => "max".to_string(),
                    (s, Some(l)) if l >= 0 => (s - l).max(0).to_string(),
                    (s, _) => s.to_string(),
                };
                write(&self.path, "memory.swap.max", &v)?;
            }
        }
        if let Some(p) = r.pids() {
            write(
                &self.path,
                "pids.max",
                &limit(if p.limit() <= 0 { -1 } else { p.limit() }),
            )?;
        }
        if let Some(w) = r.block_io().as_ref().and_then(|b| b.weight()) {
            // blkio weight [10, 1000] to io.weight [1, 10000].
            let weight = 1 + (u32::from(w).clamp(10, 1000) - 10) * 9999 / 990;
            write(&self.path, "io.weight", &format!("default {weight}"))?;
        }
        for (key, value) in r.unified().iter().flatten() {
            if key.contains('/') || key.starts_with('.') {
                return Err(AgentError::invalid(format!(
                    "linux.resources.unified key {key:?} is invalid"
                )));
            }
            write(&self.path, key, value)?;
        }
        Ok(())
    }

    /// Freezes or thaws, waiting (bounded) until the kernel reports it done.
    pub async fn freeze(&self, frozen: bool) -> Result<(), AgentError> {
        write(&self.path, "cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..500 {
            if fs::read_to_string(self.path.join("cgroup.events"))
                .is_ok_and(|e| e.lines().any(|l| l == want))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(AgentError::internal(format!(
            "{} did not reach \"{want}\" within 5 s",
            self.path.display()
        )))
    }

    /// The pids in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The oom_kill count from memory.events.
    pub fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        flat_keyed(&text, "oom_kill")
    }

    /// Reads cpu, memory, pids and io statistics.
    pub fn stats(&self) -> pb::StatsContainerResponse {
        let read = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let single = |f: &str| {
            let t = read(f);
            let t = t.trim();
            if t == "max" {
                u64::MAX
            } else {
                t.parse().unwrap_or(0)
            }
        };
        let cpu = read("cpu.stat");
        let mem = read("memory.stat");
        let events = read("memory.events");
        let mut out = pb::StatsContainerResponse::new();
        out.cpu = Some(pb::CpuStats {
            usage_usec: flat_keyed(&cpu, "usage_usec"),
            user_usec: flat_keyed(&cpu, "user_usec"),
            system_usec: flat_keyed(&cpu, "system_usec"),
            nr_periods: flat_keyed(&cpu, "nr_periods"),
            nr_throttled: flat_keyed(&cpu, "nr_throttled"),
            throttled_usec: flat_keyed(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into();
        let k = |key: &str| flat_keyed(&mem, key);
        out.memory = Some(pb::MemoryStats {
            usage: single("memory.current"),
            usage_limit: single("memory.max"),
            swap_usage: single("memory.swap.current"),
            swap_limit: single("memory.swap.max"),
            anon: k("anon"),
            file: k("file"),
            kernel_stack: k("kernel_stack"),
            slab: k("slab"),
            sock: k("sock"),
            shmem: k("shmem"),
            file_mapped: k("file_mapped"),
            file_dirty: k("file_dirty"),
            file_writeback: k("file_writeback"),
            active_anon: k("active_anon"),
            inactive_anon: k("inactive_anon"),
            active_file: k("active_file"),
            inactive_file: k("inactive_file"),
            unevictable: k("unevictable"),
            pgfault: k("pgfault"),
            pgmajfault: k("pgmajfault"),
            ..Default::default()
        })
        .into();
        out.memory_events = Some(pb::MemoryEvents {
            low: flat_keyed(&events, "low"),
            high: flat_keyed(&events, "high"),
            max: flat_keyed(&events, "max"),
            oom: flat_keyed(&events, "oom"),
            oom_kill: flat_keyed(&events, "oom_kill"),
            ..Default::default()
        })
        .into();
        out.pids = Some(pb::PidsStats {
            current: single("pids.current"),
            limit: single("pids.max"),
            ..Default::default()
        })
        .into();
        out.io = Some(pb::IoStats {
            usage: parse_io_stat(&read("io.stat")),
            ..Default::default()
        })
        .into();
        out
    }

    /// Removes the (empty) cgroup, retrying while the kernel finishes the
    /// last exits.
    pub async fn remove(&self) -> Result<(), AgentError> {
        for _ in 0..100 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Err(AgentError::internal(format!(
            "removing {} failed: it is still busy",
            self.path.display()
        )))
    }
}

/// A value of a flat-keyed cgroup file ("key value" lines).
fn flat_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Parses io.stat lines: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..`.
fn parse_io_stat(text: &str) -> Vec<pb::IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (maj, min) = parts.next()?.split_once(':')?;
            let mut e = pb::IoEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for kv in parts {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_and_io_stat_parse() {
        assert_eq!(
            flat_keyed("usage_usec 120\nuser_usec 100\n", "user_usec"),
            100
        );
        assert_eq!(flat_keyed("low 0\noom_kill 2\n", "oom_kill"), 2);
        assert_eq!(flat_keyed("", "x"), 0);
        let io = parse_io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(io.len(), 1);
        assert_eq!(
            (
                io[0].major,
                io[0].minor,
                io[0].rbytes,
                io[0].wbytes,
                io[0].rios,
                io[0].wios
            ),
            (254, 0, 4096, 8192, 1, 2)
        );
    }

    #[test]
    fn which_resources_need_a_cgroup() {
        let none: LinuxResources =
            serde_json::from_str(r#"{"devices":[{"allow":false,"access":"rwm"}]}"#).expect("parse");
        assert!(!resources_need_cgroup(&none));
        let mem: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).expect("parse");
        assert!(resources_need_cgroup(&mem));
        assert!(unavailable("pausing").to_string().contains("cgroup v2"));
    }
}
