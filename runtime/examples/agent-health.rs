//! Waits for the agent of a booting VM, through the runtime's own agent
//! client, and prints its Health reply with the time since the VM started.
//! `tools/kvm-linux-boot-test.sh` measures process start to agent-ready with
//! it.
//!
//!   agent-health <vsock-socket> <start-ns> <limit-s>
//!
//! `<vsock-socket>` is the VM's hybrid vsock socket, `<start-ns>` the wall
//! clock when the VM process was started (`date +%s%N`). It tries every 2 ms
//! (a guest port nobody listens on yet resets the connection) until the
//! agent answers or `<limit-s>` seconds pass, then prints one line:
//!
//!   CONNECT 1024: OK; Health: status=SERVING agent=<version> protocol=<n>; <ms>
//!
//! where `<ms>` runs from `<start-ns>` to the first Health reply.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nutshell_protocol::DEFAULT_AGENT_VSOCK_PORT;
use nutshell_runtime::agent::{AgentAddress, AgentClient, DialOptions};
use nutshell_runtime::hypervisor::sanitize_line;

const USAGE: &str = "usage: agent-health <vsock-socket> <start-ns> <limit-s>";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent-health: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, start_ns, limit_s] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let start_ns: u128 = start_ns
        .parse()
        .map_err(|e| format!("<start-ns> {start_ns:?}: {e}"))?;
    let limit = limit_s
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("<limit-s> {limit_s:?} is not a number of seconds"))?;
    let opts = DialOptions {
        deadline: limit,
        first_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(2),
        ..DialOptions::default()
    };
    let address = AgentAddress::hybrid_vsock(socket);
    // connect() returns once the first Health reply came and was SERVING.
    let client = AgentClient::connect(&address, &opts, None)
        .await
        .map_err(|e| chain(&e))?;
    let ready_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos();
    let ms = ready_ns.saturating_sub(start_ns) as f64 / 1e6;
    // Asked again for the printout, after the clock stopped.
    let health = client.health().await.map_err(|e| chain(&e))?;
    Ok(format!(
        "CONNECT {DEFAULT_AGENT_VSOCK_PORT}: OK; Health: status={} agent={} protocol={}; {ms:.1}",
        sanitize_line(&health.status),
        sanitize_line(&health.agent_version),
        health.protocol_version
    ))
}

/// The error and its sources, as one line.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
