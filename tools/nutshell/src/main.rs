//! `nutshell`: the command line for people and scripts.
//!
//! `nutshell check` says whether this host can run nutshell and with which
//! backend; its exit status is documented in [`check::ExitStatus`].
//! `nutshell run` runs one container in its own microVM, without
//! containerd; see [`run`]. `nutshell pool` keeps warm VMs for pods to
//! claim; see [`pool`].

mod check;
mod pool;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nutshell_runtime::hypervisor::GUEST_ASSETS_DIR;

#[derive(Parser, Debug)]
#[command(name = "nutshell", version, about = "VM-isolated containers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check whether this host can run nutshell, and with which backend.
    ///
    /// Exit status: 0 ready with the own VMM (KVM runs Linux), 3 ready with
    /// QEMU/TCG only, 4 not ready (something required is missing), 1 the
    /// check itself failed, 2 bad usage.
    Check {
        /// Print only the backend name (`vmm`, `qemu` or `none`).
        #[arg(long)]
        backend_only: bool,
        /// Where the guest assets live.
        #[arg(long, default_value = GUEST_ASSETS_DIR)]
        guest_dir: PathBuf,
    },
    /// Run one command in a container in its own microVM (no containerd).
    ///
    /// Exit status: the container's (128 + signal when a signal ended it),
    /// 125 when nutshell itself failed, 127 when the rootfs lacks the
    /// command.
    Run(run::RunArgs),
    /// Keep warm VMs, booted and with their agents ready, for pods to
    /// claim instead of booting (until SIGTERM or SIGINT).
    Pool(pool::PoolArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Check {
            backend_only,
            guest_dir,
        } => {
            let report = check::run(&check::Options { guest_dir });
            if backend_only {
                println!("{}", report.backend.name());
            } else {
                for v in &report.verdicts {
                    println!("{v}");
                }
                println!("{}", report.backend_line());
            }
            ExitCode::from(report.exit_status() as u8)
        }
        Command::Run(args) => run::main(args),
        Command::Pool(args) => pool::main(args),
    }
}

/// The runtime's logs go to stderr when `NUTSHELL_LOG` asks for them
/// (`NUTSHELL_LOG=debug`); otherwise only our own messages are printed.
fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("NUTSHELL_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
