//! OCI hooks, run on the host as runc runs them: `path` with `args` (its
//! `args[0]` as argv[0]) and exactly `env`, the container's state JSON on
//! stdin, killed after `timeout` seconds.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use crate::bundle::HookKind;

/// Most of a hook's output quoted in an error.
const OUTPUT_QUOTED: usize = 2048;

/// A hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot run the {kind} hook {path}")]
    Spawn {
        kind: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {kind} hook {path} {how}{output}")]
    Failed {
        kind: &'static str,
        path: String,
        how: String,
        output: String,
    },
}

/// Runs `hooks` in order; the first failure stops them.
pub fn run_all(kind: HookKind, hooks: &[Hook], state: &serde_json::Value) -> Result<(), HookError> {
    let stdin = state.to_string();
    for h in hooks {
        run_one(kind.name(), h, stdin.as_bytes())?;
    }
    Ok(())
}

fn run_one(kind: &'static str, hook: &Hook, stdin: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    let args = hook.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().clone().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!(kind, %path, "running hook");
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind,
        path: path.clone(),
        source,
    })?;
    // A hook that does not read its stdin must not block us: write from a
    // thread, and collect the output the same way.
    let writer = child.stdin.take().map(|mut w| {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out);
            out
        })
    })
    .collect();
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t.unsigned_abs()));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {} s", hook.timeout().unwrap_or(0)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("could not be waited for: {e}")),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let mut output = Vec::new();
    for r in readers {
        output.extend(r.join().unwrap_or_default());
    }
    let how = match status {
        Ok(s) if s.success() => return Ok(()),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (_, Some(sig)) => format!("was killed by signal {sig}"),
            _ => format!("failed: {s}"),
        },
        Err(how) => how,
    };
    let text = String::from_utf8_lossy(&output);
    let text = text.trim();
    let output = if text.is_empty() {
        String::new()
    } else {
        let cut: String = text.chars().take(OUTPUT_QUOTED).collect();
        format!(": {cut}")
    };
    Err(HookError::Failed {
        kind,
        path,
        how,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> Hook {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn hooks_get_the_state_their_env_and_args() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let h = hook(serde_json::json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {0}; echo \"$0 $1 $X\" >> {0}", out.display()), "zero", "one"],
            "env": ["X=yes"],
        }));
        run_all(HookKind::Prestart, &[h], &serde_json::json!({"id": "c1"})).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "{\"id\":\"c1\"}zero one yes\n");
    }

    #[test]
    fn a_failing_or_hanging_hook_is_an_error_that_says_so() {
        let fail = hook(serde_json::json!({
            "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"],
        }));
        let e = run_all(HookKind::Poststart, &[fail], &serde_json::json!({})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the poststart hook /bin/sh exited with status 3: broken"
        );
        let hang = hook(serde_json::json!({
            "path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1,
        }));
        let started = Instant::now();
        let e = run_all(HookKind::Prestart, &[hang], &serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("timed out after 1 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let missing = hook(serde_json::json!({"path": "/nonexistent/hook"}));
        let e = run_all(HookKind::Poststop, &[missing], &serde_json::json!({})).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot run the poststop hook /nonexistent/hook"),
            "{e}"
        );
    }
}
