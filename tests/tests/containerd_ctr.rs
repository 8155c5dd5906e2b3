//! End to end through a private containerd and `ctr`: each container runs in
//! its own microVM (QEMU/TCG here) through `containerd-shim-nutshell-v2`.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use nutshell_tests::containerd::{
    guest_kernel_release, output_with_timeout, start_test, test_nutshell_config, Containerd,
    BUSYBOX_IMAGE, NAMESPACE, NUTSHELL_RUNTIME,
};
use nutshell_tests::{require, which};

/// How long a test gives nutshell to clean up before checking.
const SETTLE: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ctr_run_prints_the_guest_kernel_and_passes_exit_codes() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    let out = c.run_nutshell("uname1", &[], &["uname", "-r"]).unwrap();
    assert!(
        out.status.success(),
        "ctr run failed: {}\n{}\nlog:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        c.log_tail(80)
    );
    let guest = text(&out.stdout).trim().to_string();
    let expected = guest_kernel_release().expect("vmlinux has a version banner");
    assert_eq!(guest, expected, "uname -r in the pod is the guest kernel's");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(guest, host.trim(), "the host kernel must not show through");

    let out = c
        .run_nutshell(
            "exit7",
            &[],
            &["sh", "-c", "echo out; echo err >&2; exit 7"],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "out");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn ctr_run_relays_piped_stdin_a_terminal_and_a_log_file() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    // Piped stdin.
    let mut child = c
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            NUTSHELL_RUNTIME,
            BUSYBOX_IMAGE,
            "stdin1",
            "sh",
            "-c",
            "read l; echo got:$l",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"x\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "got:x");

    // A terminal: ctr -t needs one on its own stdin, which script(1) gives.
    if require(which("script").is_some(), "needs script(1) (bsdutils)") {
        let ctr = format!(
            "ctr --address {} -n nutshell-test run --rm -t --runtime {NUTSHELL_RUNTIME} {BUSYBOX_IMAGE} tty1 sh -c 'tty; stty size'",
            c.socket.display()
        );
        let out = output_with_timeout(
            std::process::Command::new("script")
                .args(["-qec", &ctr, "/dev/null"])
                .stdin(Stdio::null()),
            Duration::from_secs(180),
        )
        .unwrap();
        let s = text(&out.stdout);
        assert!(out.status.success(), "{s}\n{}", text(&out.stderr));
        assert!(
            s.contains("/dev/pts/"),
            "tty prints a pty in the guest: {s:?}"
        );
    }

    // file:// log URI.
    let log = c.dir().join("ctr.log");
    let uri = format!("file://{}", log.display());
    let out = c
        .run_nutshell(
            "logfile1",
            &["--log-uri", &uri],
            &["sh", "-c", "echo to-the-log"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("to-the-log"), "{logged:?}");

    // binary:// log URI: a logging program reads stdout on fd 3 and stderr
    // on fd 4, and closes fd 5 once it is ready.
    let logger = c.dir().join("logger.sh");
    let out_file = c.dir().join("binary.log");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\ncat <&3 > {out}.out &\ncat <&4 > {out}.err\nwait\necho \"$1=$2\" >> {out}.out\n",
            out = out_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?mode=test", logger.display());
    let out = c
        .run_nutshell(
            "logbin1",
            &["--log-uri", &uri],
            &["sh", "-c", "echo via-binary; echo err-via-binary >&2"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut logged = String::new();
    for _ in 0..50 {
        logged = std::fs::read_to_string(format!("{}.out", out_file.display())).unwrap_or_default();
        if logged.contains("mode=test") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        logged.contains("via-binary") && logged.contains("mode=test"),
        "{logged:?}"
    );
    let errs = std::fs::read_to_string(format!("{}.err", out_file.display())).unwrap_or_default();
    assert!(errs.contains("err-via-binary"), "{errs:?}");
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn ctr_task_exec_ps_metrics_pause_resume_and_kill() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    // PID 1 ignores SIGTERM unless it traps it; /trapped says the trap is
    // in place (a TCG guest may take a while to get there).
    c.run_detached(
        "busy1",
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; touch /trapped; while true; do sleep 1; done",
        ],
    );
    // Connect's task pid is the VMM's: QEMU here, not a vhost-user backend
    // that started before it.
    let pid = c
        .shim_task_pid(NAMESPACE, "busy1")
        .expect("the shim answers Connect");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(comm.starts_with("qemu-system"), "pid {pid} is {comm:?}");

    let out = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "busy1",
            "sh",
            "-c",
            "echo hi; exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "hi");

    // Piped stdin of an exec reaches EOF (ctr closes it, with CloseIO), so
    // cat ends.
    let mut child = c
        .ctr(&["task", "exec", "--exec-id", "cat1", "busy1", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped-in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "piped-in");

    let ps = c.ctr_ok(&["task", "ps", "busy1"]).unwrap();
    let pids: Vec<&str> = ps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!pids.is_empty(), "ctr task ps lists processes: {ps}");

    let metrics = c.ctr_ok(&["task", "metrics", "busy1"]).unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next().and_then(|v| v.parse().ok()))?
            })
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert!(value("memory.usage") > 0, "{metrics}");
    assert!(value("cpu.usage_usec") > 0, "{metrics}");

    c.ctr_ok(&["task", "pause", "busy1"]).unwrap();
    let ls = c.ctr_ok(&["task", "ls"]).unwrap();
    assert!(ls.contains("PAUSED"), "{ls}");
    c.ctr_ok(&["task", "resume", "busy1"]).unwrap();
    let ls = c.ctr_ok(&["task", "ls"]).unwrap();
    assert!(ls.contains("RUNNING"), "{ls}");

    for _ in 0..100 {
        let st = c
            .ctr(&[
                "task",
                "exec",
                "--exec-id",
                "chk",
                "busy1",
                "test",
                "-e",
                "/trapped",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if st.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ctr_ok(&["task", "kill", "-s", "SIGTERM", "busy1"])
        .unwrap();
    let out = wait_stopped_and_delete(&c, "busy1");
    assert_eq!(out, Some(143), "SIGTERM ran the trap");
    c.ctr_ok(&["containers", "rm", "busy1"]).unwrap();

    c.run_detached("busy2", &["sleep", "1000"]);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "busy2"])
        .unwrap();
    assert_eq!(wait_stopped_and_delete(&c, "busy2"), Some(137));
    c.ctr_ok(&["containers", "rm", "busy2"]).unwrap();
    c.assert_left_nothing(&before, SETTLE);
}

/// Waits for the task to stop, deletes it and returns its exit status.
fn wait_stopped_and_delete(c: &Containerd, id: &str) -> Option<i32> {
    for _ in 0..300 {
        if c.task_status(id).as_deref() == Some("STOPPED") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.delete_task(id)
}

#[test]
fn hundred_mib_of_stdout_arrive_intact() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    let out = output_with_timeout(
        c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            NUTSHELL_RUNTIME,
            BUSYBOX_IMAGE,
            "big1",
            "sh",
            "-c",
            // tee copies the stream to fd 3, the container's stdout, and
            // hashes it on stderr.
            "dd if=/dev/urandom bs=1048576 count=100 2>/dev/null | { tee /proc/self/fd/3 | sha256sum >&2; } 3>&1",
        ])
        .stdin(Stdio::null()),
        Duration::from_secs(600),
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 100 << 20, "every byte arrives");
    let guest_sum = text(&out.stderr);
    let guest_sum = guest_sum.split_whitespace().next().unwrap_or_default();
    let tmp = c.dir().join("big.out");
    std::fs::write(&tmp, &out.stdout).unwrap();
    let host = std::process::Command::new("sha256sum")
        .arg(&tmp)
        .output()
        .unwrap();
    let host_sum = text(&host.stdout);
    let host_sum = host_sum.split_whitespace().next().unwrap_or_default();
    assert_eq!(host_sum, guest_sum, "the bytes are the guest's bytes");
    std::fs::remove_file(&tmp).unwrap();
    c.assert_left_nothing(&before, SETTLE);
}
