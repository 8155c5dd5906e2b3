//! Copying the container's stdout and stderr to ours as it arrives, and
//! `--timing`'s lines.

use std::io::Write;
use std::time::Instant;

use nutshell_runtime::agent::{AgentClient, AgentError};
use tokio::io::AsyncWriteExt;

/// Largest chunk asked of the agent per read.
const CHUNK: u32 = 64 * 1024;

/// Which of the container's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Copies one output of the container's init process to ours until EOF.
/// Each chunk is written and flushed as it comes, so a long-running command
/// is followed live. When our side is closed (`| head`), the rest is read
/// and dropped, so the container never blocks on a full pipe.
pub async fn copy(agent: AgentClient, container: String, stream: Stream) -> Result<(), AgentError> {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut open = true;
    loop {
        let r = match stream {
            Stream::Stdout => agent.read_stdout(&container, "", CHUNK).await?,
            Stream::Stderr => agent.read_stderr(&container, "", CHUNK).await?,
        };
        if open && !r.data.is_empty() {
            let out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send) = match stream {
                Stream::Stdout => &mut stdout,
                Stream::Stderr => &mut stderr,
            };
            if out.write_all(&r.data).await.is_err() || out.flush().await.is_err() {
                open = false;
            }
        }
        if r.eof {
            return Ok(());
        }
    }
}

/// `--timing`: one line on stderr per milestone, in milliseconds since the
/// VM's launch began, as each happens:
/// `timing: <milestone> <ms> ms`.
#[derive(Debug)]
pub struct Timing {
    enabled: bool,
    start: Instant,
}

impl Timing {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            start: Instant::now(),
        }
    }

    /// Restarts the clock (just before the VM is launched).
    pub fn restart(&mut self) {
        self.start = Instant::now();
    }

    /// Prints `milestone`, reached at `at`.
    pub fn mark_at(&self, milestone: &str, at: Instant) {
        if self.enabled {
            let ms = at.saturating_duration_since(self.start).as_millis();
            // One write per line: container output may interleave, but never
            // inside a line of ours.
            let line = format!("timing: {milestone} {ms} ms\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    /// Prints `milestone`, reached now.
    pub fn mark(&self, milestone: &str) {
        self.mark_at(milestone, Instant::now());
    }
}
