//! What a container can reach of the agent: the probe the guest test runs
//! in containers is served by a real agent (so its "refused" there means
//! something), and a container never shares the agent's pid namespace.

use serde_json::json;

use crate::agent::{sh, Agent};

/// The probe, built static into the agent's rootfs; `None` (after a SKIP
/// line) where there is no C toolchain.
fn probe(a: &Agent) -> Option<std::path::PathBuf> {
    let dest = a.rootfs().join("bin/vsock_probe");
    let built = nutshell_tests::build_vsock_probe(&dest);
    if !nutshell_tests::require(built.is_ok(), &format!("{:?}", built.err())) {
        return None;
    }
    Some(dest)
}

#[tokio::test]
async fn the_probe_is_served_by_a_listening_agent() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let Some(probe) = probe(&a) else { return };
    let out = std::process::Command::new(&probe)
        .arg("unix")
        .arg(&a.sock)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "socket ok\nserved\n",
        "{out:?}"
    );
    assert!(out.status.success());
    // And a socket nobody listens on is told apart from one that serves.
    let out = std::process::Command::new(&probe)
        .arg("unix")
        .arg(a.dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "socket ok\nrefused ENOENT\n"
    );
    a.health().await;
}

#[tokio::test]
async fn a_container_without_a_pid_namespace_gets_its_own() {
    let Some(a) = Agent::start().await else {
        return;
    };
    // A host-PID spec: with the agent's pid namespace the container's shell
    // would not be pid 1 and would see the agent.
    let mut s = sh(
        &a,
        &format!(
            "echo $$; test -e /proc/{}/fd && echo agent-visible; ls /proc | grep -c '^[0-9]'",
            a.pid()
        ),
    );
    s["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "uts" }]);
    let (exit, out, err) = a.run_to_end("hostpid", &s).await;
    assert_eq!(exit.exit_status, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    // sh, and ls and grep of the pipeline.
    assert_eq!(lines.first(), Some(&"1"), "{out:?}");
    assert!(!out.contains("agent-visible"), "{out:?}");
    let procs: u32 = lines.last().and_then(|n| n.parse().ok()).unwrap();
    assert!(procs <= 3, "{out:?}");
}
