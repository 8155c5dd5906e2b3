//! cgroup v2: the agent in a private cgroup2 hierarchy pauses, resumes,
//! reports stats for and removes a container's cgroup.

use std::path::PathBuf;
use std::time::Duration;

use nutshell_protocol::agent as pb;
use nutshell_tests::require;

use crate::agent::{container, ctx, sh, status_of, Agent};

#[tokio::test]
async fn cgroup_v2_pause_resume_stats_and_removal() {
    if !require(
        nutshell_tests::which("unshare").is_some(),
        "needs unshare (util-linux)",
    ) {
        return;
    }
    let Some(a) = Agent::start_with(true).await else {
        return;
    };
    let cg = PathBuf::from(format!(
        "/proc/{}/root/sys/fs/cgroup/nutshell/ticker",
        a.pid()
    ));
    a.run(
        "ticker",
        &sh(&a, "while true; do echo tick; sleep 0.05; done"),
    )
    .await;
    let init_pid = a.list_processes("ticker").await.processes[0].pid;
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == init_pid.to_string()),
        "init {init_pid} in {procs:?}"
    );
    assert!(a.read_until("ticker", "", "tick").await.contains("tick"));

    let req = container("ticker");
    a.client.pause_container(ctx(), &req).await.unwrap();
    assert!(std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 1"));
    // Drain what was written before the freeze; then nothing more comes.
    while tokio::time::timeout(
        Duration::from_millis(300),
        a.read_chunk("ticker", "", false),
    )
    .await
    .is_ok()
    {}
    assert!(
        tokio::time::timeout(
            Duration::from_millis(700),
            a.read_chunk("ticker", "", false)
        )
        .await
        .is_err(),
        "output while paused"
    );
    a.client.resume_container(ctx(), &req).await.unwrap();
    assert!(std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 0"));
    let after = tokio::time::timeout(Duration::from_secs(5), a.read_until("ticker", "", "tick"))
        .await
        .expect("output after resume");
    assert!(after.contains("tick"));

    let stats = a.client.stats_container(ctx(), &req).await.unwrap();
    assert!(stats.cpu.usage_usec > 0, "cpu.stat read: {:?}", stats.cpu);

    // A limit whose controller this hierarchy lacks is a clear error.
    let controllers = std::fs::read_to_string(cg.join("cgroup.controllers")).unwrap();
    if !controllers.contains("memory") {
        let upd = pb::UpdateContainerRequest {
            container_id: "ticker".into(),
            resources_json: br#"{"memory":{"limit":67108864}}"#.to_vec(),
            ..Default::default()
        };
        let (_, msg) = status_of(&a.client.update_container(ctx(), &upd).await.unwrap_err());
        assert!(msg.contains("memory.max"), "{msg}");
    }
    a.remove("ticker").await;
    assert!(!cg.exists(), "the container's cgroup is removed");
    // The agent keeps its (now empty) parent cgroup; this host's hierarchy
    // is shared, so the test takes it away.
    if let Some(parent) = cg.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}
