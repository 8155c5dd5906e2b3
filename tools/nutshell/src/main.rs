//! `nutshell`: the command line for people and scripts.
//!
//! `nutshell check` says whether this host can run nutshell and with which
//! backend; its exit status is documented in [`check::ExitStatus`].

mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        #[arg(long, default_value = "/usr/share/nutshell")]
        guest_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    }
}
