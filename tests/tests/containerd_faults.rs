//! Faults around the nutshell shim, through a private containerd: a missing
//! guest kernel, a bad config value, the own VMM where KVM cannot run
//! Linux, a guest that dies at boot, an agent that serves but cannot be
//! reached, a killed VM, a killed shim, a containerd restart, and
//! repeated create/delete cycles. Each must end with nothing left behind.

use std::process::Stdio;
use std::time::Duration;

use nutshell_runtime::hypervisor::select::{kvm_verdict, KvmVerdict};
use nutshell_tests::containerd::{
    start_test, test_nutshell_config, test_nutshell_config_dialing, Containerd, NAMESPACE,
};

/// How long a test gives nutshell to clean up before checking.
const SETTLE: Duration = Duration::from_secs(30);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits up to `limit` until `ok(status of task id)` holds (`None`: the
/// task is not listed).
fn wait_task(c: &Containerd, id: &str, limit: Duration, ok: impl Fn(Option<&str>) -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if ok(c.task_status(id).as_deref()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn wait_status(c: &Containerd, id: &str, want: &str, limit: Duration) -> bool {
    wait_task(c, id, limit, |s| s == Some(want))
}

/// The pid a pod's `vm.json` records for `field` ("shim_pid") or for the
/// process whose role mentions `role`.
fn recorded_pid(c: &Containerd, pod: &str, role: &str) -> u32 {
    let path = c.pod_dir(NAMESPACE, pod).join("vm.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("vm.json exists")).unwrap();
    if role == "shim" {
        return json["shim_pid"].as_u64().unwrap() as u32;
    }
    json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"].as_str().unwrap_or_default().contains(role))
        .and_then(|p| p["pid"].as_u64())
        .unwrap_or_else(|| panic!("no {role} in {json}")) as u32
}

fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_missing_kernel_or_a_bad_config_value_is_a_clear_error() {
    let cfg = test_nutshell_config("").replace(
        &format!(
            "kernel = \"{}\"",
            nutshell_tests::guest_dir().join("vmlinux").display()
        ),
        "kernel = \"/nonexistent/vmlinux\"",
    );
    assert!(cfg.contains("/nonexistent/vmlinux"));
    let Some((_g, c, before)) = start_test(&cfg) else {
        return;
    };
    let out = c.run_nutshell("nokernel", &[], &["true"]).unwrap();
    assert!(!out.status.success());
    let msg = text(&out.stderr);
    eprintln!("ctr run said: {msg}");
    assert!(
        msg.contains("/nonexistent/vmlinux") && msg.contains("vm.kernel"),
        "the error names the path and the key: {msg}"
    );

    // A bad value: the shim reads the config at each pod's creation.
    std::fs::write(&c.nutshell_config, "[vm]\nvcpus = \"two\"\n").unwrap();
    let out = c.run_nutshell("badvalue", &[], &["true"]).unwrap();
    assert!(!out.status.success());
    let msg = text(&out.stderr);
    assert!(
        msg.contains("`vm.vcpus`") && msg.contains(&c.nutshell_config.display().to_string()),
        "the error names the key and the file: {msg}"
    );

    // The own VMM: where this host's KVM cannot run Linux it is refused
    // before anything starts, with the probe's reason and the way out.
    std::fs::write(
        &c.nutshell_config,
        test_nutshell_config("").replace("backend = \"qemu\"", "backend = \"vmm\""),
    )
    .unwrap();
    let verdict = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(kvm_verdict());
    let out = c
        .run_nutshell("ownvmm", &[], &["echo", "in the own VMM"])
        .unwrap();
    let msg = text(&out.stderr);
    eprintln!("KVM verdict {verdict:?}; ctr run said: {msg}");
    match verdict {
        KvmVerdict::CanRunLinux => {
            assert!(out.status.success(), "{msg}");
            assert_eq!(text(&out.stdout).trim(), "in the own VMM");
        }
        KvmVerdict::Cannot(detail) => {
            assert!(!out.status.success());
            assert!(
                msg.contains("vm.backend = \"vmm\"")
                    && msg.contains(&c.nutshell_config.display().to_string())
                    && msg.contains(&detail)
                    && msg.contains("use the qemu backend"),
                "the error names the key, the file, the reason and the way out: {msg}"
            );
        }
    }
    c.remove_everything();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn a_guest_that_dies_at_boot_is_quoted_in_the_error() {
    // No init in the initramfs: the guest kernel panics, and the error that
    // reaches `ctr run` quotes the console.
    let Some((_g, c, before)) = start_test(&test_nutshell_config(
        "kernel_params = \"rdinit=/nonexistent\"",
    )) else {
        return;
    };
    let out = c.run_nutshell("deadboot", &[], &["true"]).unwrap();
    assert!(!out.status.success());
    let msg = text(&out.stderr);
    eprintln!("ctr run said: {msg}");
    assert!(
        msg.contains("last console lines") && msg.contains("Kernel panic"),
        "the error quotes the guest console: {msg}"
    );
    c.remove_everything();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn an_agent_that_serves_but_cannot_be_reached_is_given_up_early() {
    // The agent listens on another vsock port than the runtime dials: it
    // logs that it serves, but no CONNECT reaches it, as with a wedged
    // vsock backend. The first VM is given up a grace after that line, not
    // at the 20 s dial deadline, and a second VM is launched; it fails the
    // same way, at the deadline.
    let Some((_g, c, before)) = start_test(&test_nutshell_config_dialing(
        "kernel_params = \"nutshell.agent_port=2000\"",
        Duration::from_secs(20),
    )) else {
        return;
    };
    let out = c.run_nutshell("unreachable", &[], &["true"]).unwrap();
    assert!(!out.status.success());
    let msg = text(&out.stderr);
    assert!(msg.contains("not reachable"), "ctr run said: {msg}");
    let log = c.log_tail(usize::MAX);
    let first = log
        .lines()
        .find(|l| l.contains("started once more"))
        .unwrap_or_else(|| panic!("no relaunch in the log:\n{}", c.log_tail(60)));
    assert!(
        first.contains("logged that it serves, but no connection reached it"),
        "the first VM was given up for its silence after serving: {first}"
    );
    c.remove_everything();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn killing_the_vm_ends_the_task_and_delete_cleans_up() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    c.run_detached("vmkill", &["sleep", "1000"]);
    kill9(recorded_pid(&c, "vmkill", "VMM"));
    assert!(
        wait_status(&c, "vmkill", "STOPPED", Duration::from_secs(30)),
        "the task stops when its VM dies"
    );
    let status = c.delete_task("vmkill");
    assert!(
        matches!(status, Some(s) if s != 0),
        "the exit status is non-zero: {status:?}"
    );
    c.ctr_ok(&["containers", "rm", "vmkill"]).unwrap();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn killing_the_shim_leaves_nothing_behind() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    c.run_detached("shimkill", &["sleep", "1000"]);
    kill9(recorded_pid(&c, "shimkill", "shim"));
    assert!(
        // containerd runs `shim delete` and drops the task (or, racing,
        // shows it stopped).
        wait_task(&c, "shimkill", Duration::from_secs(30), |s| s
            != Some("RUNNING")),
        "containerd notices the dead shim"
    );
    let _ = c.ctr(&["task", "delete", "shimkill"]).output().unwrap();
    c.ctr_ok(&["containers", "rm", "shimkill"]).unwrap();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn a_pod_survives_a_containerd_restart() {
    let Some((_g, mut c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    c.run_detached("restart1", &["sh", "-c", "while true; do sleep 1; done"]);
    let vmm = recorded_pid(&c, "restart1", "VMM");
    c.restart().unwrap();
    assert!(
        wait_status(&c, "restart1", "RUNNING", Duration::from_secs(30)),
        "containerd finds the running task again"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{vmm}")).exists(),
        "the VM kept running"
    );
    let out = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            "restart1",
            "echo",
            "still-here",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "still-here");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "restart1"])
        .unwrap();
    assert!(wait_status(
        &c,
        "restart1",
        "STOPPED",
        Duration::from_secs(30)
    ));
    let _ = c.ctr(&["task", "delete", "restart1"]).output().unwrap();
    c.ctr_ok(&["containers", "rm", "restart1"]).unwrap();
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn twenty_create_delete_cycles_leak_nothing() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    let sockets_before = socket_count("/run/containerd/s");
    for i in 0..20 {
        let id = format!("cycle{i}");
        let out = c.run_nutshell(&id, &[], &["true"]).unwrap();
        assert!(
            out.status.success(),
            "cycle {i}: {}\n{}",
            text(&out.stderr),
            c.log_tail(40)
        );
    }
    c.assert_left_nothing(&before, SETTLE);
    assert_eq!(
        socket_count("/run/containerd/s"),
        sockets_before,
        "shim sockets are removed"
    );
}

fn socket_count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
