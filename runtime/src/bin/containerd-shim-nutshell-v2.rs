//! `containerd-shim-nutshell-v2`: containerd's shim v2 for nutshell pods.
//!
//! containerd runs it three ways: `start` (print the pod's shim address),
//! `delete` (clean up after a dead shim), and without an action as the
//! long-lived task server. The server logs with `tracing` into the `log`
//! FIFO of its bundle, which containerd copies into its own log; `start`
//! and `delete` log to stderr, which containerd reports on failure.

use std::fs::OpenOptions;
use std::sync::Mutex;

use containerd_shim::Config as ShimConfig;
use nutshell_runtime::config::Config;
use nutshell_runtime::shim::service::NutshellShim;
use nutshell_runtime::shim::RUNTIME_ID;
use tracing_subscriber::EnvFilter;

fn init_logging(serving: bool, debug: bool) {
    // RUST_LOG wins; else `-debug`; else the config's log.level.
    let level = if debug {
        "debug".to_string()
    } else {
        Config::load(None)
            .map(|c| c.log.level.as_str().to_string())
            .unwrap_or_else(|_| "info".into())
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    // containerd opens the reading end of the `log` FIFO before it starts
    // the server, so this open does not block.
    let fifo = if serving {
        OpenOptions::new().write(true).open("log").ok()
    } else {
        None
    };
    let _ = match fifo {
        Some(f) => builder.with_writer(Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flags = containerd_shim::parse(&args[1..]).unwrap_or_default();
    if flags.version {
        println!("{}: {} {}", args[0], RUNTIME_ID, env!("CARGO_PKG_VERSION"));
        return;
    }
    init_logging(flags.action.is_empty(), flags.debug);
    let config = ShimConfig {
        // Logging is ours (tracing), set up above.
        no_setup_logger: true,
        // The crate's SIGCHLD reaper calls waitpid(-1), which would steal the
        // exit statuses of the VM processes the runtime supervises through
        // tokio. Orphans go to init instead of this process.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<NutshellShim>(RUNTIME_ID, Some(config)).await;
    // The crate removes the socket named in the bundle's `address` file,
    // which containerd may already have deleted with the bundle: remove our
    // own socket by the name we were given.
    if flags.action.is_empty() && !flags.socket.is_empty() {
        nutshell_runtime::shim::service::remove_dead_socket(&flags.socket);
    }
}
