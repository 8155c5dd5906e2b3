//! The internal `init` mode.

/// Entry point of the re-executed agent.
pub fn main() -> ! {
    eprintln!("nutshell-agent: container init is not implemented yet");
    std::process::exit(1)
}
