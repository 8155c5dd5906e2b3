//! A container's state under `--root`: `<root>/<id>/state.json`.
//!
//! Every verb is a new process, so this file is the only memory between
//! them. Each change is a read-modify-write under an exclusive `flock` of
//! `<root>/<id>` and lands by rename, so a reader never sees half a file.
//! Liveness is not trusted to the file: a container recorded as created,
//! running or paused whose stand-in process is gone (or is not the process
//! recorded, by start time) is stopped.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use nutshell_runtime::shim::state::{check_id, is_zombie, process_start_time, PodKey};
use serde::{Deserialize, Serialize};

/// The file each container's state lives in.
const STATE_FILE: &str = "state.json";
/// The containerd-style namespace of every nutshell-runc pod key.
const KEY_NAMESPACE: &str = "oci";

/// Errors reading or changing a container's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("{0:?} is not a valid container id (letters, digits, '.', '_' and '-', at most 128, not starting with '.')")]
    BadId(String),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the state of container {id} in {path} is unreadable; `delete --force {id}` removes it"
    )]
    Corrupt {
        id: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The OCI lifecycle states, plus runc's `paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

/// How the container's process ended, as its stand-in saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, or 128 + the signal.
    pub status: i32,
    /// The signal that killed it, 0 when it exited.
    pub signal: i32,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    /// The bundle's `root.path`, absolute.
    pub rootfs: PathBuf,
    /// RFC 3339, as runc writes it.
    pub created: String,
    pub status: Status,
    /// The stand-in: the host process that stands for the container's init.
    pub pid: u32,
    /// Its start time (clock ticks since boot), so a recycled pid is never
    /// taken for it.
    pub pid_start: u64,
    pub annotations: BTreeMap<String, String>,
    /// The VM's agent (hybrid vsock Unix socket), once the VM runs.
    pub agent_socket: Option<PathBuf>,
    pub exit: Option<Exit>,
    /// The host cgroups the stand-in (and so the VM) was put in.
    #[serde(default)]
    pub host_cgroups: Vec<PathBuf>,
}

impl Record {
    /// The status with liveness applied: a stand-in that is gone means the
    /// container stopped.
    pub fn status(&self) -> Status {
        match self.status {
            Status::Created | Status::Running | Status::Paused if !self.stand_in_alive() => {
                Status::Stopped
            }
            s => s,
        }
    }

    /// Whether the recorded stand-in still runs (a zombie has ended).
    pub fn stand_in_alive(&self) -> bool {
        self.pid != 0
            && process_start_time(self.pid) == Some(self.pid_start)
            && !is_zombie(self.pid)
    }

    /// The OCI state document (`state`, and hooks' stdin).
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.status();
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": oci_spec::runtime::Spec::default().version(),
            "id": self.id,
            "pid": pid,
            "status": status.to_string(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.annotations,
        })
    }
}

/// The current time as runc writes it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// The `--root` directory: every container of one runtime root.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// Creates `dir` (0700) when missing. Relative roots are made absolute,
    /// since the pod key names the root and must not depend on the cwd.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                what: "create the runtime root",
                path: dir.to_path_buf(),
                source,
            })?;
        let dir = fs::canonicalize(dir).map_err(|source| StateError::Io {
            what: "resolve the runtime root",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// The container's directory; `id` is checked first.
    pub fn container_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        check_id(id).map_err(|_| StateError::BadId(id.to_string()))?;
        Ok(self.dir.join(id))
    }

    /// Whose pod a container is, for the runtime library: two roots never
    /// share a pod directory, since the root is part of the key.
    pub fn pod_key(&self, id: &str) -> PodKey {
        PodKey::new(
            &format!("nutshell-runc:{}", self.dir.display()),
            KEY_NAMESPACE,
            id,
        )
    }

    /// Makes the directory of a new container and holds its lock.
    pub fn create(&self, id: &str) -> Result<Locked, StateError> {
        let dir = self.container_dir(id)?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_string()))
            }
            Err(source) => {
                return Err(StateError::Io {
                    what: "create",
                    path: dir,
                    source,
                })
            }
        }
        lock(id, dir)
    }

    /// Locks an existing container's directory.
    pub fn lock(&self, id: &str) -> Result<Locked, StateError> {
        let dir = self.container_dir(id)?;
        lock(id, dir)
    }

    /// Reads a container's record without locking (readers see whole files).
    pub fn load(&self, id: &str) -> Result<Record, StateError> {
        load(id, &self.container_dir(id)?)
    }

    /// The ids of every container under the root, sorted.
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StateError::Io {
            what: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join(STATE_FILE).is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| check_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

fn lock(id: &str, dir: PathBuf) -> Result<Locked, StateError> {
    let f = match fs::File::open(&dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NotFound(id.to_string()))
        }
        Err(source) => {
            return Err(StateError::Io {
                what: "open",
                path: dir,
                source,
            })
        }
    };
    let flock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| StateError::Io {
        what: "lock",
        path: dir.clone(),
        source: e.into(),
    })?;
    Ok(Locked {
        id: id.to_string(),
        dir,
        _flock: flock,
    })
}

fn load(id: &str, dir: &Path) -> Result<Record, StateError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NotFound(id.to_string()))
        }
        Err(source) => {
            return Err(StateError::Io {
                what: "read",
                path,
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        id: id.to_string(),
        path,
        source,
    })
}

/// A container's directory, held exclusively until dropped.
#[derive(Debug)]
pub struct Locked {
    id: String,
    dir: PathBuf,
    _flock: Flock<fs::File>,
}

impl Locked {
    pub fn load(&self) -> Result<Record, StateError> {
        load(&self.id, &self.dir)
    }

    /// Writes the record atomically (a temporary file, then rename).
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StateError::Io {
            what: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| StateError::Io {
                what: "write",
                path,
                source,
            })
    }

    /// Removes the container's directory (the lock goes with it).
    pub fn remove(self) -> Result<(), StateError> {
        fs::remove_dir_all(&self.dir).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(StateError::Io {
                what: "remove",
                path: self.dir.clone(),
                source: e,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: Status, pid: u32, pid_start: u64) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: now_rfc3339(),
            status,
            pid,
            pid_start,
            annotations: BTreeMap::new(),
            agent_socket: None,
            exit: None,
            host_cgroups: Vec::new(),
        }
    }

    #[test]
    fn a_container_whose_stand_in_is_gone_is_stopped() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert_eq!(
            record("a", Status::Running, me, start).status(),
            Status::Running
        );
        // Same pid, another start time: a recycled pid is not the stand-in.
        assert_eq!(
            record("a", Status::Running, me, start + 1).status(),
            Status::Stopped
        );
        assert_eq!(record("a", Status::Created, 0, 0).status(), Status::Stopped);
        // Creating is reported as it is: create holds it only briefly.
        assert_eq!(
            record("a", Status::Creating, 0, 0).status(),
            Status::Creating
        );
        let stopped = record("a", Status::Running, me, start + 1).oci_state();
        assert_eq!(stopped["pid"], 0);
        assert_eq!(stopped["status"], "stopped");
    }

    #[test]
    fn state_lives_under_the_root_and_roots_do_not_collide() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (
            Root::open(&t.path().join("a")).unwrap(),
            Root::open(&t.path().join("b")).unwrap(),
        );
        assert_ne!(a.pod_key("x").dir(), b.pod_key("x").dir());
        let l = a.create("x").unwrap();
        l.save(&record("x", Status::Creating, 1, 2)).unwrap();
        drop(l);
        assert!(matches!(a.create("x"), Err(StateError::Exists(_))));
        assert!(matches!(b.load("x"), Err(StateError::NotFound(_))));
        assert_eq!(a.load("x").unwrap().pid_start, 2);
        assert_eq!(a.ids().unwrap(), vec!["x".to_string()]);
        assert!(matches!(a.lock("../x"), Err(StateError::BadId(_))));
        a.lock("x").unwrap().remove().unwrap();
        assert!(a.ids().unwrap().is_empty());
    }
}
