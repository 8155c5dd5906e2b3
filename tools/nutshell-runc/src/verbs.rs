//! The verbs after `create`: each is a new process that finds the container
//! under `--root`, checks the OCI lifecycle, and talks to the container's
//! agent or its stand-in.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nutshell_protocol::agent::StatsContainerResponse;
use nutshell_runtime::network::{self, NetworkRecord};
use nutshell_runtime::shim::pod::chain;
use nutshell_runtime::shim::state::cleanup_pod;
use oci_spec::runtime::LinuxResources;

use crate::bundle::{Bundle, HookKind};
use crate::hooks;
use crate::host_cgroup;
use crate::standin::{dial, runtime};
use crate::state::{Record, Root, StateError, Status};

/// How long `delete --force` waits for a killed stand-in to go.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// `start`: the created container's process runs.
pub fn start(root: &Root, id: &str) -> Result<()> {
    let locked = root.lock(id)?;
    let mut rec = locked.load()?;
    let status = rec.status();
    if status != Status::Created {
        bail!("cannot start container {id}: it is {status}, and only a created container starts");
    }
    runtime()?.block_on(async {
        dial(&rec)
            .await?
            .start_container(id)
            .await
            .map_err(|e| anyhow!("the guest did not start container {id}: {}", chain(&e)))
    })?;
    rec.status = Status::Running;
    locked.save(&rec)?;
    drop(locked);
    if let Ok(bundle) = Bundle::load(&rec.bundle) {
        hooks::run_all(
            HookKind::Poststart,
            &bundle.hooks(HookKind::Poststart),
            &rec.oci_state(),
        )?;
    }
    Ok(())
}

/// `state`: the OCI state document.
pub fn state(root: &Root, id: &str) -> Result<()> {
    let rec = root.load(id)?;
    println!("{}", serde_json::to_string_pretty(&rec.oci_state())?);
    Ok(())
}

/// Parses a signal as runc does: a name with or without `SIG`, or a number.
pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| anyhow!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| anyhow!("unknown signal {s:?} (a name like TERM or SIGKILL, or a number)"))
}

/// `kill`: a signal to the container's process (with `all`, to every
/// process of the container).
pub fn kill_container(root: &Root, id: &str, sig: Signal, all: bool) -> Result<()> {
    let rec = root.load(id)?;
    match rec.status() {
        Status::Stopped => bail!("cannot kill container {id}: it is not running (stopped)"),
        // Not started yet: the stand-in holds the place of the process and
        // ends by the signal, as runc's waiting init would.
        Status::Creating | Status::Created => {
            kill(Pid::from_raw(pid_i32(rec.pid)?), sig)
                .with_context(|| format!("cannot signal the stand-in of container {id}"))?;
            Ok(())
        }
        Status::Running | Status::Paused => runtime()?.block_on(async {
            dial(&rec)
                .await?
                .signal_process(id, "", sig as u32, all)
                .await
                .map_err(|e| anyhow!("the guest did not signal container {id}: {}", chain(&e)))
        }),
    }
}

fn pid_i32(pid: u32) -> Result<i32> {
    i32::try_from(pid).map_err(|_| anyhow!("recorded pid {pid} is out of range"))
}

/// `delete`: what the container left on the host goes. A container that
/// still runs is refused, unless `force`, which kills it first.
pub fn delete(root: &Root, id: &str, force: bool) -> Result<()> {
    let locked = match root.lock(id) {
        Ok(l) => l,
        Err(StateError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let rec = match locked.load() {
        Ok(r) => Some(r),
        Err(_) if force => None,
        Err(e) => return Err(e.into()),
    };
    let mut bundle = None;
    if let Some(rec) = &rec {
        let status = rec.status();
        if status != Status::Stopped && !force {
            bail!("cannot delete container {id}: it is {status}; stop it first, or use --force");
        }
        if rec.stand_in_alive() {
            kill_stand_in(rec)?;
        }
        bundle = Bundle::load(&rec.bundle).ok();
    }
    clean_up(root, id, rec.as_ref().map(|r| (r, bundle.as_ref())));
    if let Some(rec) = &rec {
        host_cgroup::remove(&rec.host_cgroups);
    }
    locked.remove()?;
    Ok(())
}

fn kill_stand_in(rec: &Record) -> Result<()> {
    let _ = kill(Pid::from_raw(pid_i32(rec.pid)?), Signal::SIGKILL);
    let deadline = Instant::now() + KILL_WAIT;
    while rec.stand_in_alive() {
        if Instant::now() > deadline {
            bail!(
                "the stand-in {} of container {} survived SIGKILL for {KILL_WAIT:?}",
                rec.pid,
                rec.id
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes the container's VM leftovers (processes, mounts, the pod
/// directory, the network plumbing), then runs the poststop hooks. Takes no
/// lock: the caller holds the container's. Failures are logged, never
/// fatal: clean-up goes on regardless.
pub fn clean_up(root: &Root, id: &str, done: Option<(&Record, Option<&Bundle>)>) {
    let key = root.pod_key(id);
    let net = NetworkRecord::load(&key.dir()).unwrap_or_else(|e| {
        tracing::warn!(error = %chain(&e), "the network plumbing cannot be taken away");
        None
    });
    if let Err(e) = cleanup_pod(&key) {
        tracing::warn!(error = %chain(&e), "cannot clean the container's VM directory");
    }
    if let Some(net) = net {
        let r = runtime().map(|rt| rt.block_on(network::unplumb(&net)));
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %chain(&e), "cannot take the network plumbing away");
        }
    }
    if let Some((rec, Some(bundle))) = done {
        let mut state = rec.oci_state();
        state["status"] = "stopped".into();
        let r = hooks::run_all(
            HookKind::Poststop,
            &bundle.hooks(HookKind::Poststop),
            &state,
        );
        if let Err(e) = r {
            tracing::warn!(error = %chain(&e), "poststop hook");
        }
    }
}

/// `pause` and `resume`: the container's cgroup in the guest is frozen or
/// thawed.
pub fn pause(root: &Root, id: &str, pause: bool) -> Result<()> {
    let locked = root.lock(id)?;
    let mut rec = locked.load()?;
    let (from, to, verb) = if pause {
        (Status::Running, Status::Paused, "pause")
    } else {
        (Status::Paused, Status::Running, "resume")
    };
    let status = rec.status();
    if status != from {
        bail!("cannot {verb} container {id}: it is {status}, not {from}");
    }
    runtime()?.block_on(async {
        let agent = dial(&rec).await?;
        let r = if pause {
            agent.pause_container(id).await
        } else {
            agent.resume_container(id).await
        };
        r.map_err(|e| anyhow!("the guest did not {verb} container {id}: {}", chain(&e)))
    })?;
    rec.status = to;
    locked.save(&rec)?;
    Ok(())
}

/// `update --resources FILE|-`: new cgroup limits in the guest.
pub fn update(root: &Root, id: &str, resources: &Path) -> Result<()> {
    let mut text = Vec::new();
    if resources == Path::new("-") {
        std::io::stdin().read_to_end(&mut text)?;
    } else {
        text = std::fs::read(resources)
            .with_context(|| format!("cannot read {}", resources.display()))?;
    }
    serde_json::from_slice::<LinuxResources>(&text)
        .context("--resources is not an OCI LinuxResources JSON object")?;
    let rec = running(root, id, "update")?;
    runtime()?.block_on(async {
        dial(&rec)
            .await?
            .update_container(id, text)
            .await
            .map_err(|e| anyhow!("the guest did not update container {id}: {}", chain(&e)))
    })
}

fn running(root: &Root, id: &str, verb: &str) -> Result<Record> {
    let rec = root.load(id)?;
    match rec.status() {
        Status::Running | Status::Paused => Ok(rec),
        s => bail!("cannot {verb} container {id}: it is {s}, not running"),
    }
}

/// `ps`: with `json`, the host pids that stand for the container (its
/// stand-in: the guest's pids mean nothing on the host, and `docker top`
/// looks them up there); as a table, the guest's own processes.
pub fn ps(root: &Root, id: &str, json: bool) -> Result<()> {
    let rec = root.load(id)?;
    if json {
        let pids: Vec<u32> = if rec.status() == Status::Stopped {
            Vec::new()
        } else {
            vec![rec.pid]
        };
        println!("{}", serde_json::to_string(&pids)?);
        return Ok(());
    }
    let rec = running(root, id, "list the processes of")?;
    let list = runtime()?.block_on(async {
        dial(&rec)
            .await?
            .list_processes(id)
            .await
            .map_err(|e| anyhow!("the guest did not list the processes: {}", chain(&e)))
    })?;
    println!("{:>8}  EXEC", "PID");
    for p in list.processes {
        let exec = if p.exec_id.is_empty() {
            "-"
        } else {
            &p.exec_id
        };
        println!("{:>8}  {exec}", p.pid);
    }
    Ok(())
}

/// `list`: every container under the root.
pub fn list(root: &Root, json: bool, quiet: bool) -> Result<()> {
    let recs: Vec<Record> = root
        .ids()?
        .iter()
        .filter_map(|id| root.load(id).ok())
        .collect();
    if quiet {
        for r in &recs {
            println!("{}", r.id);
        }
    } else if json {
        let states: Vec<_> = recs.iter().map(Record::oci_state).collect();
        println!("{}", serde_json::to_string(&states)?);
    } else {
        println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
        for r in &recs {
            let s = r.oci_state();
            println!(
                "{}\t{}\t{}\t{}\t{}\troot",
                r.id,
                s["pid"],
                r.status(),
                r.bundle.display(),
                r.created
            );
        }
    }
    Ok(())
}

/// `events`: with `stats`, one stats record; otherwise one every
/// `interval` until the container stops.
pub fn events(root: &Root, id: &str, stats: bool, interval: Duration) -> Result<()> {
    let rt = runtime()?;
    let rec = running(root, id, "read the stats of")?;
    rt.block_on(async {
        let agent = dial(&rec).await?;
        loop {
            let s = agent
                .stats_container(id)
                .await
                .map_err(|e| anyhow!("the guest did not give stats: {}", chain(&e)))?;
            println!("{}", stats_event(id, &s));
            if stats {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
            if !matches!(root.load(id).map(|r| r.status()), Ok(Status::Running)) {
                return Ok(());
            }
        }
    })
}

/// runc's stats event (`types.Event` with `types.Stats`), from the guest's
/// cgroup v2 figures.
fn stats_event(id: &str, s: &StatsContainerResponse) -> serde_json::Value {
    let cpu = s.cpu.as_ref();
    let mem = s.memory.as_ref();
    let pids = s.pids.as_ref();
    let usec_to_ns = |v: u64| v.saturating_mul(1000);
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": usec_to_ns(cpu.map_or(0, |c| c.usage_usec)),
                    "kernel": usec_to_ns(cpu.map_or(0, |c| c.system_usec)),
                    "user": usec_to_ns(cpu.map_or(0, |c| c.user_usec)),
                },
                "throttling": {
                    "periods": cpu.map_or(0, |c| c.nr_periods),
                    "throttledPeriods": cpu.map_or(0, |c| c.nr_throttled),
                    "throttledTime": usec_to_ns(cpu.map_or(0, |c| c.throttled_usec)),
                },
            },
            "memory": {
                "usage": {
                    "usage": mem.map_or(0, |m| m.usage),
                    "limit": mem.map_or(0, |m| m.usage_limit),
                },
                "swap": {
                    "usage": mem.map_or(0, |m| m.swap_usage),
                    "limit": mem.map_or(0, |m| m.swap_limit),
                },
                "raw": {
                    "anon": mem.map_or(0, |m| m.anon),
                    "file": mem.map_or(0, |m| m.file),
                    "inactive_file": mem.map_or(0, |m| m.inactive_file),
                },
            },
            "pids": {
                "current": pids.map_or(0, |p| p.current),
                "limit": pids.map_or(0, |p| p.limit),
            },
        },
    })
}

/// `features`: what this runtime supports, in the OCI features format.
pub fn features() -> Result<()> {
    let f = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec::runtime::Spec::default().version(),
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "private", "rprivate", "slave", "rslave", "shared", "rshared"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
        "annotations": {
            "io.github.nutshell.runtime": "a microVM per container",
        },
    });
    println!("{}", serde_json::to_string_pretty(&f)?);
    Ok(())
}

/// The state directory of `--root` when none is given.
pub fn default_root() -> PathBuf {
    PathBuf::from("/run/nutshell-runc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_as_runc_parses_them() {
        for (s, want) in [
            ("TERM", Signal::SIGTERM),
            ("SIGKILL", Signal::SIGKILL),
            ("kill", Signal::SIGKILL),
            ("9", Signal::SIGKILL),
            ("15", Signal::SIGTERM),
            ("usr1", Signal::SIGUSR1),
        ] {
            assert_eq!(parse_signal(s).unwrap(), want, "{s}");
        }
        for bad in ["", "NOPE", "0", "999", "-1"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stats_map_microseconds_to_runc_nanoseconds() {
        let s = StatsContainerResponse {
            cpu: Some(nutshell_protocol::agent::CpuStats {
                usage_usec: 7,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let e = stats_event("c", &s);
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 7000);
        assert_eq!(e["type"], "stats");
    }
}
