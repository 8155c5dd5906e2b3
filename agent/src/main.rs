//! The `nutshell-agent` binary. Modes:
//! - PID 1 of a guest: set the guest up and serve on vsock;
//! - `--listen unix:///path | vsock://cid:port`: serve on a host;
//! - `__nutshell_init`: internal, the init of one container process.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nutshell_agent::{container, listen, pid1, server, INIT_ARG};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(INIT_ARG) {
        // Never returns: execs the container process or exits.
        container::init::main();
    }
    let is_pid1 = std::process::id() == 1;
    if is_pid1 {
        pid1::console_logging();
    } else {
        init_logging();
    }
    let result = run(&args, is_pid1);
    if let Err(e) = &result {
        tracing::error!("nutshell-agent: fatal: {e:#}");
    }
    if is_pid1 {
        // PID 1 must not exit: the kernel would panic. Power the guest off.
        pid1::power_off();
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NUTSHELL_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn usage() -> &'static str {
    "usage: nutshell-agent --listen unix:///path/agent.sock | vsock://CID:PORT\n\
     (as PID 1 of a guest it takes no arguments and listens on vsock)"
}

fn run(args: &[String], is_pid1: bool) -> Result<()> {
    let listen = if is_pid1 {
        pid1::setup().context("setting the guest up as PID 1")?;
        let port = pid1::agent_port_from_cmdline();
        format!("vsock://-1:{port}")
    } else {
        match args.get(1).map(String::as_str) {
            Some("--listen") => args.get(2).cloned().context(usage())?,
            Some("--version") => {
                println!("nutshell-agent {}", nutshell_agent::AGENT_VERSION);
                return Ok(());
            }
            _ => bail!(usage()),
        }
    };
    if !is_pid1 {
        pid1::become_subreaper().context("becoming a child subreaper")?;
    }
    // Not dumpable: /proc/<agent>/ (its fds, the containers' stdio pipes
    // among them; its memory; its namespaces) then needs CAP_SYS_PTRACE even
    // from root, which a container that sees the agent's pid lacks. The
    // container inits are fresh execs and dumpable again.
    nix::sys::prctl::set_dumpable(false).context("making the agent non-dumpable")?;
    if !(listen.starts_with("unix://") || listen.starts_with("vsock://")) {
        bail!("listen address {listen:?} is neither unix:// nor vsock://");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let (service, mut shutdown) = server::AgentService::new(is_pid1)?;
        let service = Arc::new(service);
        if let Some(path) = listen.strip_prefix("unix://") {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
        }
        let listener = listen::bind(&listen).with_context(|| format!("listening on {listen}"))?;
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(listener)
            .register_service(nutshell_protocol::agent_ttrpc::create_agent(
                service.clone(),
            ));
        server.start().await.context("starting the ttrpc server")?;
        tracing::info!(
            listen = %listen,
            version = nutshell_agent::AGENT_VERSION,
            "{}",
            nutshell_protocol::AGENT_SERVING_LOG
        );
        let reason = tokio::select! {
            r = shutdown.recv() => r.unwrap_or_else(|| "shutdown channel closed".to_string()),
            r = terminate_signal(is_pid1) => r,
        };
        tracing::info!(%reason, "agent stopping");
        service.engine().destroy_all().await;
        // As PID 1 the guest restarts (and so ends) right after this: the
        // DestroySandbox reply left before the shutdown signal, and waiting
        // for the runtime to close its connection only delays the VM's end
        // (by the whole timeout, since the runtime waits for that end).
        if !is_pid1 {
            // The ttrpc server has its own shutdown timeout; a stuck client
            // must not keep a host-mode agent from exiting.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// SIGTERM/SIGINT end a host-mode agent; PID 1 ignores them (the kernel
/// does not deliver unhandled signals to init anyway).
async fn terminate_signal(is_pid1: bool) -> String {
    use tokio::signal::unix::{signal, SignalKind};
    if is_pid1 {
        return std::future::pending().await;
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM".to_string(),
        _ = int.recv() => "SIGINT".to_string(),
    }
}
