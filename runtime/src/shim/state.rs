//! The pod's state on the host, `/run/nutshell/<hash>/` ([`PodKey::dir`]),
//! and the clean-up that works from it alone.
//!
//! The shim records the VM's processes in `vm.json` as soon as the VM runs.
//! When the shim dies (`kill -9`, OOM) containerd runs `shim delete` for
//! each of its containers; that process has nothing but this directory to
//! go on: it kills the recorded processes (checking each one's start time,
//! so a recycled PID is never hit), unmounts what is mounted below the
//! directory and removes it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mounts::{remove_tree, unmount_below, MountError};

/// Root of every pod's state.
pub const RUN_DIR: &str = "/run/nutshell";
/// File naming the VM's processes.
const RECORD_FILE: &str = "vm.json";
/// File naming whose pod a state directory holds.
const OWNER_FILE: &str = "owner.json";
/// Hex digits of the hash that names a pod's directory: 128 bits.
const DIR_HASH_DIGITS: usize = 32;

/// Errors cleaning a pod up.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id cannot name a directory safely.
    #[error("{0:?} is not a valid container or sandbox id")]
    BadId(String),
    /// Writing or reading the record failed.
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Unmounting or removing failed.
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// Checks that `id` is a containerd-style identifier: it becomes a path
/// component, so nothing else may pass.
pub fn check_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId(id.to_string()))
    }
}

/// Whose a pod is. A container id is unique only within one namespace of
/// one containerd, so the pod is named by all three: the containerd it
/// serves (its gRPC address, the shim's `-address`), the namespace
/// (`-namespace`) and the pod id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodKey {
    pub address: String,
    pub namespace: String,
    pub pod: String,
}

impl PodKey {
    pub fn new(address: &str, namespace: &str, pod: &str) -> Self {
        Self {
            address: address.to_string(),
            namespace: namespace.to_string(),
            pod: pod.to_string(),
        }
    }

    /// The pod's state directory: `/run/nutshell/<h>`, `<h>` the first 32
    /// hex digits of SHA-256 over the address, namespace and pod id (each
    /// length-prefixed, so no two keys run together into one input).
    ///
    /// Why a hash rather than runc's readable `<namespace>/<id>`: the VM's
    /// Unix sockets live in this directory and a socket path holds at most
    /// 107 bytes, while a namespace may take 76 characters and an id 128;
    /// the address is itself a path. A fixed-length name keeps every
    /// socket path near 60 bytes whatever the ids, and 128 bits make a
    /// collision between two pods of one host unthinkable. `owner.json`
    /// inside ([`Self::save_owner`]) says whose the directory is.
    pub fn dir(&self) -> PathBuf {
        let mut h = Sha256::new();
        for part in [&self.address, &self.namespace, &self.pod] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Path::new(RUN_DIR).join(&hex[..DIR_HASH_DIGITS])
    }

    /// The pod's shared directory on the host.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir().join("shared")
    }

    /// Writes `owner.json` into the pod's directory, for whoever lists
    /// `/run/nutshell`.
    pub fn save_owner(&self) -> Result<(), StateError> {
        let path = self.dir().join(OWNER_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| StateError::Io {
            what: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&path, json).map_err(|source| StateError::Io {
            what: "write",
            path,
            source,
        })
    }
}

/// One recorded process of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub role: String,
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// What `vm.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub shim_pid: u32,
    pub processes: Vec<ProcessRecord>,
}

impl PodRecord {
    /// Writes the record atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(".vm.json.tmp");
        let io_err = |what, p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Io {
                what,
                path: p,
                source,
            }
        };
        let json = serde_json::to_vec(self).map_err(|e| StateError::Io {
            what: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }

    /// Reads the record of `dir`; `None` when there is none or it is
    /// unreadable (a crash while writing it).
    pub fn load(dir: &Path) -> Option<Self> {
        let bytes = fs::read(dir.join(RECORD_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// A process's start time, `None` when it is gone.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Records `(role, pid)` pairs with their start times.
pub fn record_processes(procs: &[(String, u32)]) -> Vec<ProcessRecord> {
    procs
        .iter()
        .filter_map(|(role, pid)| {
            process_start_time(*pid).map(|start_time| ProcessRecord {
                role: role.clone(),
                pid: *pid,
                start_time,
            })
        })
        .collect()
}

/// Kills the recorded processes that still are who they were (each leads
/// its process group, so the group goes), and waits up to `wait` for them
/// to disappear. Returns the ones still there.
pub fn kill_recorded(record: &PodRecord, wait: Duration) -> Vec<ProcessRecord> {
    let alive = |p: &ProcessRecord| process_start_time(p.pid) == Some(p.start_time);
    for p in record.processes.iter().filter(|p| alive(p)) {
        let Ok(pid) = i32::try_from(p.pid) else {
            continue;
        };
        tracing::info!(role = %p.role, pid = p.pid, "killing a leftover VM process");
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + wait;
    loop {
        // A zombie keeps its /proc entry until reaped; its state is 'Z'.
        let left: Vec<ProcessRecord> = record
            .processes
            .iter()
            .filter(|p| alive(p) && !is_zombie(p.pid))
            .cloned()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` has exited and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(false)
}

/// Holds the pod's directory exclusively while one `shim delete` cleans
/// it: containerd deletes a dead shim's sandbox and its containers at
/// once. `None` when the directory is gone already.
fn lock_dir(dir: &Path) -> Option<nix::fcntl::Flock<fs::File>> {
    let f = fs::File::open(dir).ok()?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
        Ok(l) => Some(l),
        Err((_, e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot lock the pod's directory");
            None
        }
    }
}

/// Everything of a pod, after its shim died: kill the VM's processes,
/// unmount, remove the pod's directory.
pub fn cleanup_pod(key: &PodKey) -> Result<(), StateError> {
    let dir = key.dir();
    let _lock = lock_dir(&dir);
    if let Some(record) = PodRecord::load(&dir) {
        let left = kill_recorded(&record, Duration::from_secs(5));
        if !left.is_empty() {
            tracing::warn!(?left, "VM processes survived SIGKILL");
        }
    }
    unmount_below(&dir)?;
    remove_tree(&dir)?;
    Ok(())
}

/// One container's part of a pod: its rootfs and volumes.
pub fn cleanup_container(key: &PodKey, cid: &str) -> Result<(), StateError> {
    check_id(cid)?;
    let _lock = lock_dir(&key.dir());
    let dir = key.shared_dir().join(cid);
    unmount_below(&dir)?;
    remove_tree(&dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\0y", &"a".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "pod-1_2.x", "0123456789abcdef"] {
            check_id(good).unwrap();
        }
    }

    #[test]
    fn pods_are_keyed_by_containerd_namespace_and_id() {
        let a = PodKey::new("/run/containerd/containerd.sock", "alpha", "same");
        let dirs = [
            a.dir(),
            PodKey::new(&a.address, "beta", "same").dir(),
            PodKey::new("/run/other/containerd.sock", "alpha", "same").dir(),
            PodKey::new(&a.address, "alpha", "other").dir(),
            // Length prefixes: moving a character between fields is a new key.
            PodKey::new(&a.address, "alphas", "ame").dir(),
        ];
        for (i, d) in dirs.iter().enumerate() {
            assert!(d.starts_with(RUN_DIR), "{d:?}");
            for e in &dirs[i + 1..] {
                assert_ne!(d, e);
            }
        }
        assert_eq!(a.dir(), a.clone().dir(), "one key, one directory");
        assert_eq!(a.shared_dir(), a.dir().join("shared"));
    }

    #[test]
    fn socket_paths_fit_for_the_longest_ids() {
        // sun_path holds 108 bytes with its NUL; the longest socket a VM
        // makes is the hybrid vsock's per-port one, `vsock.sock_<port>`.
        let key = PodKey::new(&"/a".repeat(200), &"n".repeat(76), &"i".repeat(128));
        let longest = key.dir().join("vsock.sock_4294967295");
        assert!(longest.as_os_str().len() < 108, "{longest:?}");
    }

    #[test]
    fn record_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let r = PodRecord {
            shim_pid: 42,
            processes: record_processes(&[("self".into(), std::process::id())]),
        };
        assert_eq!(r.processes.len(), 1, "our own process has a start time");
        r.save(d.path()).unwrap();
        assert_eq!(PodRecord::load(d.path()), Some(r));
        assert_eq!(PodRecord::load(&d.path().join("nope")), None);
    }

    #[test]
    fn a_recycled_pid_is_not_killed() {
        // A record whose start time does not match our own process: killing
        // it must leave us alive.
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        let r = PodRecord {
            shim_pid: 0,
            processes: vec![ProcessRecord {
                role: "vmm".into(),
                pid: me,
                start_time: start + 1,
            }],
        };
        let left = kill_recorded(&r, Duration::from_millis(50));
        assert!(left.is_empty());
    }

    #[test]
    fn recorded_processes_are_killed() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let r = PodRecord {
            shim_pid: 0,
            processes: record_processes(&[("vmm".into(), child.id())]),
        };
        let left = kill_recorded(&r, Duration::from_secs(5));
        assert!(left.is_empty(), "{left:?}");
        let st = child.wait().unwrap();
        assert!(!st.success());
    }
}
