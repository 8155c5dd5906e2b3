//! Helpers shared by nutshell's integration tests (`tests/tests/*.rs`).
//!
//! Integration tests need things a plain `cargo test` may not have: root, a
//! built agent, the guest image, QEMU, containerd. A test asks for them with
//! [`require`]: where one is missing it either skips with a one-line reason
//! or, when `NUTSHELL_REQUIRE_ALL=1` (set by `tools/test.sh`, so by CI), it
//! fails. Nothing passes silently because the host lacks something.

pub mod containerd;
pub mod cri;
pub mod engines;
pub mod netns;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nutshell_runtime::hypervisor::GUEST_ASSETS_DIR;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether missing prerequisites must fail the test instead of skipping it.
pub fn require_all() -> bool {
    std::env::var("NUTSHELL_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Returns `true` when `ok`. Otherwise skips (prints `SKIP <test>: <reason>`
/// and returns `false`) or, under `NUTSHELL_REQUIRE_ALL=1`, panics.
///
/// ```ignore
/// if !require(is_root(), "needs root") { return; }
/// ```
pub fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    if require_all() {
        panic!("{test}: prerequisite missing and NUTSHELL_REQUIRE_ALL=1: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // /proc/self/status is the least code and needs no unsafe (geteuid).
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The static `nutshell-agent` binary: `$NUTSHELL_AGENT_BIN`, else the one
/// `tools/build-agent.sh` builds, else the workspace's debug build.
pub fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NUTSHELL_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let root = workspace_root();
    [
        "target/x86_64-unknown-linux-gnu/release/nutshell-agent",
        "target/debug/nutshell-agent",
    ]
    .iter()
    .map(|p| root.join(p))
    .find(|p| p.is_file())
}

/// The `nutshell-vmm` binary to test: `$NUTSHELL_VMM_BIN`, else the one
/// `cargo build` made (`target/{debug,release}/nutshell-vmm`).
pub fn vmm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NUTSHELL_VMM_BIN") {
        return Some(PathBuf::from(p));
    }
    let root = workspace_root();
    ["target/debug/nutshell-vmm", "target/release/nutshell-vmm"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
}

/// Every process whose command line mentions `needle`, as (pid, command
/// line with NULs as spaces).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(proc) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some((pid, cmd))
        })
        .collect()
}

/// Asserts the host holds nothing of a VM whose files lived below `dir`:
/// no process names a path below it (the VMM and its backends all do), no
/// mount lies below it, and its state directory `state` is gone.
pub fn assert_no_vm_left(dir: &Path, state: &Path) {
    let needle = format!("{}/", dir.display());
    assert_eq!(
        processes_mentioning(&needle),
        Vec::<(u32, String)>::new(),
        "processes left behind"
    );
    assert_eq!(
        nutshell_runtime::mounts::mounts_below(dir),
        Vec::<PathBuf>::new(),
        "mounts left behind"
    );
    assert!(
        !state.exists(),
        "{} left behind: {:?}",
        state.display(),
        fs::read_dir(state).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
}

/// Directory of the installed guest assets (`vmlinux`,
/// `initramfs.cpio.gz`): `$NUTSHELL_GUEST_DIR`, else [`GUEST_ASSETS_DIR`].
pub fn guest_dir() -> PathBuf {
    std::env::var_os("NUTSHELL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(GUEST_ASSETS_DIR))
}

/// Path of the static busybox used for test rootfs.
pub const BUSYBOX: &str = "/bin/busybox";

/// `tools/lib/test-images.sh`: the one recipe for the busybox rootfs and
/// the test images, shared with the scripts.
pub fn test_images_script() -> PathBuf {
    workspace_root().join("tools/lib/test-images.sh")
}

/// Fills `dir` with a minimal busybox root filesystem (`test-images.sh
/// rootfs`): `/bin/busybox` with a link per applet, the usual empty mount
/// points, and `/etc/passwd` and `/etc/group` with root and nobody.
pub fn busybox_rootfs(dir: &Path) -> io::Result<()> {
    run_ok(Command::new(test_images_script()).arg("rootfs").arg(dir)).map(drop)
}

/// Runs `cmd` to its end, returns its stdout, fails quoting its stderr.
pub fn run_ok(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds `tests/fixtures/vsock_probe.c` (a ttrpc client over vsock or a
/// Unix socket that says whether it was served) as a static binary at
/// `dest`, to copy into a busybox rootfs. An error says what is missing.
pub fn build_vsock_probe(dest: &Path) -> io::Result<()> {
    let src = workspace_root().join("tests/fixtures/vsock_probe.c");
    let cc = which("cc").ok_or_else(|| io::Error::other("needs a C compiler (cc)"))?;
    let out = Command::new(cc)
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(dest)
        .arg(&src)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "cc -static {} failed (needs the static libc, e.g. libc6-dev): {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Spawns the daemon `cmd` (named `name`) with its output appended to
/// `log`, and waits up to `timeout` until `answers` says it serves. When it
/// exits first or time runs out, it is stopped and the error quotes the
/// tail of its log (`log_tail`).
pub fn start_daemon(
    cmd: &mut Command,
    name: &str,
    log: &Path,
    timeout: Duration,
    mut answers: impl FnMut() -> io::Result<bool>,
    log_tail: impl Fn() -> String,
) -> io::Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let failure = loop {
        match answers() {
            Ok(true) => return Ok(child),
            Ok(false) => {}
            Err(e) => break e,
        }
        if let Some(status) = child.try_wait()? {
            break io::Error::other(format!("{name} exited with {status}"));
        }
        if Instant::now() > deadline {
            break io::Error::other(format!("{name} did not answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = terminate(child, Duration::from_secs(5));
    Err(io::Error::other(format!("{failure}; log:\n{}", log_tail())))
}

/// Stops `child` with SIGTERM: its exit status when it exits within
/// `grace`, else `None` once SIGKILL ended it.
pub fn terminate(mut child: Child, grace: Duration) -> io::Result<Option<ExitStatus>> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(None)
}

/// Asserts that `tools/lib/test-images.sh` has each of `lines` as a line:
/// the harness and the script name the same things.
pub fn assert_test_images_script_says(lines: &[String]) {
    let script = include_str!("../../tools/lib/test-images.sh");
    for line in lines {
        assert!(
            script.lines().any(|l| l == line),
            "tools/lib/test-images.sh must say {line}"
        );
    }
}

/// The nearest-rank `p`th percentile of `xs` in milliseconds (sorts
/// `xs`), for the benchmarks (`tests/examples/`).
pub fn percentile_ms(xs: &mut [Duration], p: usize) -> f64 {
    xs.sort_unstable();
    let i = (xs.len() * p).div_ceil(100).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64() * 1000.0
}

/// "N CPUs, load A B C": the machine a benchmark ran on.
pub fn host_summary() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{} CPUs, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_default_to_the_runtimes_guest_directory() {
        let line = format!("NUTSHELL_GUEST_DIR=${{NUTSHELL_GUEST_DIR:-{GUEST_ASSETS_DIR}}}");
        assert!(
            include_str!("../../tools/lib/paths.sh")
                .lines()
                .any(|l| l == line),
            "tools/lib/paths.sh must say {line}"
        );
    }

    #[test]
    fn busybox_rootfs_has_a_shell() {
        if !require(
            Path::new(BUSYBOX).is_file(),
            "needs /bin/busybox (busybox-static)",
        ) {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        busybox_rootfs(dir.path()).expect("rootfs");
        let sh = dir.path().join("bin/sh");
        assert_eq!(
            fs::read_link(&sh).expect("bin/sh is a link"),
            PathBuf::from("/bin/busybox")
        );
        assert!(dir.path().join("bin/busybox").is_file());
        assert!(fs::read_to_string(dir.path().join("etc/passwd"))
            .expect("passwd")
            .starts_with("root:x:0:0:"));
    }
}
