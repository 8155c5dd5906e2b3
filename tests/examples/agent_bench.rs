//! Benchmark of nutshell-agent on this host (printed, not asserted):
//! create+start+wait of `true` (p50/p99), idle RSS, binary size.
//!
//! `cargo run --release -p nutshell-tests --example agent_bench [RUNS]`
//! (as root; `tools/bench/agent.sh` builds the static agent and runs it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nutshell_protocol::agent as pb;
use nutshell_protocol::agent_ttrpc::AgentClient;
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn spec(rootfs: &Path) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "process": { "args": ["true"], "cwd": "/", "user": { "uid": 0, "gid": 0 }, "env": ["PATH=/bin"] },
        "root": { "path": rootfs },
        "hostname": "bench",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance", "ptmxmode=0666"] }
        ],
        "linux": { "namespaces": [{ "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }] }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let bin = nutshell_tests::agent_binary()
        .ok_or("no nutshell-agent binary: run tools/build-agent.sh")?;
    let dir = tempfile::tempdir()?;
    let rootfs = dir.path().join("rootfs");
    nutshell_tests::busybox_rootfs(&rootfs)?;
    let sock = dir.path().join("agent.sock");
    let mut child = Command::new(&bin)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .env("NUTSHELL_AGENT_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    let client = loop {
        if let Ok(c) = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display())).await
        {
            break AgentClient::new(c);
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            return Err("the agent did not listen within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let ctx = || ttrpc::context::with_timeout(30_000_000_000);
    client.health(ctx(), &pb::HealthRequest::new()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(child.id());

    let spec_json = serde_json::to_vec(&spec(&rootfs))?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let id = format!("b{i}");
        let t = Instant::now();
        let req = pb::CreateContainerRequest {
            container_id: id.clone(),
            spec_json: spec_json.clone(),
            ..Default::default()
        };
        client.create_container(ctx(), &req).await?;
        client
            .start_container(
                ctx(),
                &pb::StartContainerRequest {
                    container_id: id.clone(),
                    ..Default::default()
                },
            )
            .await?;
        let exit = client
            .wait_process(
                ctx(),
                &pb::WaitProcessRequest {
                    container_id: id.clone(),
                    ..Default::default()
                },
            )
            .await?;
        let dt = t.elapsed();
        if exit.exit_status != 0 {
            return Err(format!("run {i}: `true` exited {}", exit.exit_status).into());
        }
        client
            .remove_container(
                ctx(),
                &pb::RemoveContainerRequest {
                    container_id: id,
                    ..Default::default()
                },
            )
            .await?;
        // The first runs warm caches up.
        if i >= 5 {
            times.push(dt);
        }
    }
    let busy_rss = rss_kib(child.id());
    times.sort();
    let size = std::fs::metadata(&bin)?.len();
    println!("agent binary: {}", bin.display());
    println!("create+start+wait of `true`, {runs} runs: p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms, max {:.2} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3);
    println!(
        "agent RSS: idle {:.2} MiB, after the runs {:.2} MiB",
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
    println!(
        "binary size: {:.2} MiB ({size} bytes)",
        size as f64 / (1024.0 * 1024.0)
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
