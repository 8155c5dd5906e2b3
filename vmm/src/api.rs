//! The control API: newline-delimited JSON on a Unix socket, one request
//! per line, one reply per request.
//!
//! ```text
//! {"op":"state"}     -> {"ok":true,"state":"running"}
//! {"op":"pause"}     -> {"ok":true,"state":"paused"}
//! {"op":"resume"}    -> {"ok":true,"state":"running"}
//! {"op":"shutdown"}  -> {"ok":true,"state":"stopping"}   (VM exits with status 3)
//! anything else      -> {"ok":false,"error":"..."}
//! ```

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::vmm::{VmState, VmmControl};

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

#[derive(Deserialize)]
struct Request {
    op: String,
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
    }
}

/// Answers one request line.
pub fn handle_line(control: &VmmControl, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req.op.as_str() {
        "state" => {}
        "pause" => control.pause(),
        "resume" => control.resume(),
        "shutdown" => control.shutdown(),
        other => return json!({"ok": false, "error": format!("unknown op {other:?}")}),
    }
    json!({"ok": true, "state": state_name(control.state())})
}

fn serve_client(control: &VmmControl, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    // A client may send at most 1 MiB over one connection.
    let mut reader = BufReader::new(std::io::Read::take(stream, 1 << 20));
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if line.len() > MAX_LINE {
            return;
        }
        let reply = handle_line(control, line.trim());
        if writeln!(out, "{reply}").is_err() {
            return;
        }
        line.clear();
    }
}

/// The API server thread.
pub struct ApiServer {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` and serves until the VM is stopping.
    pub fn start(path: &Path, control: VmmControl) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || loop {
                if control.state() == VmState::Stopping {
                    return;
                }
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        // One client at a time: the API is for one runtime.
                        serve_client(&control, s);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            })?;
        Ok(ApiServer {
            path: path.into(),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The thread sees the stopping state within 20 ms unless a client
        // holds it; do not wait for a client.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
