//! `nutshell pool`: the warm pool's process (`nutshell_runtime::pool`).
//! It runs in the foreground until SIGTERM or SIGINT, logging to stderr;
//! `tools/systemd/nutshell-pool.service` runs it as a service.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use nutshell_runtime::config::Config;
use tokio::signal::unix::{signal, SignalKind};

/// `nutshell pool`'s options.
#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    /// The nutshell config (default: `$NUTSHELL_CONFIG`, else
    /// /etc/nutshell/config.toml, else the embedded default). Its `[pool]`
    /// section says how many VMs of which size to keep, and its `[vm]`
    /// section how to boot them: give the pool the file the pods use.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn main(args: PoolArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nutshell pool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: PoolArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref()).context("cannot load the nutshell config")?;
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the pool must run as root: it starts VMs and serves a root-only socket");
    }
    if std::env::var_os("NUTSHELL_LOG").is_none() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                config.log.level.as_str(),
            ))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        nutshell_runtime::pool::server::serve(config, stop)
            .await
            .context("the pool failed")
    })
}
