//! A container's life: output and exit codes, signals, exec processes in
//! its PID namespace, and a hundred create-start-wait-remove cycles that
//! leave nothing behind.

use std::path::Path;

use nutshell_protocol::agent as pb;

use crate::agent::{ctx, sh, spec, status_of, Agent};
use crate::procfs::{count_fds, count_mounts, descendants, settled_fds};

#[tokio::test]
async fn echo_is_captured_and_exit_codes_come_back() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let (exit, out, err) = a
        .run_to_end("echo", &sh(&a, "echo hello; echo oops >&2"))
        .await;
    assert_eq!((exit.exit_status, exit.signal), (0, 0));
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert!(exit.exited_at_sec > 1_600_000_000);
    let (exit, _, _) = a.run_to_end("exit3", &sh(&a, "exit 3")).await;
    assert_eq!((exit.exit_status, exit.signal), (3, 0));
}

#[tokio::test]
async fn sigkill_gives_the_signal_status() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("kill", &spec(&a.rootfs(), &["sleep", "100"])).await;
    a.signal("kill", "", 9).await;
    let exit = a.wait("kill", "").await;
    assert_eq!((exit.exit_status, exit.signal), (137, 9));
    a.remove("kill").await;
}

#[tokio::test]
async fn signals_reach_the_process() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run(
        "trap",
        &sh(
            &a,
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ),
    )
    .await;
    assert!(a.read_until("trap", "", "ready").await.contains("ready"));
    a.signal("trap", "", 15).await;
    assert!(a.read_all("trap", "", false).await.contains("got TERM"));
    assert_eq!(a.wait("trap", "").await.exit_status, 7);
    a.remove("trap").await;
}

#[tokio::test]
async fn signal_all_reaches_every_process() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("all", &sh(&a, "sleep 100 & sleep 100 & echo started; wait"))
        .await;
    assert!(a.read_until("all", "", "started").await.contains("started"));
    let procs = a.list_processes("all").await;
    assert_eq!(procs.processes.len(), 3, "{:?}", procs.processes);
    let req = pb::SignalProcessRequest {
        container_id: "all".into(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    a.client.signal_process(ctx(), &req).await.unwrap();
    assert_eq!(a.wait("all", "").await.signal, 9);
    for p in procs.processes {
        assert!(
            !Path::new(&format!("/proc/{}", p.pid)).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "pid {} survived",
            p.pid
        );
    }
    a.remove("all").await;
}

#[tokio::test]
async fn exec_shares_the_pid_namespace_and_the_init_is_pid_1() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("ex", &sh(&a, "echo pid=$$; exec sleep 100")).await;
    assert!(a.read_until("ex", "", "pid=").await.contains("pid=1"));
    a.exec(
        "ex",
        "e1",
        &["sh", "-c", "cat /proc/1/cmdline; echo; echo me=$$"],
        false,
    )
    .await
    .unwrap();
    let out = a.read_all("ex", "e1", false).await;
    assert!(out.starts_with("sleep"), "pid 1 seen by the exec: {out:?}");
    assert!(!out.contains("me=1\n"), "the exec is not pid 1: {out:?}");
    assert_eq!(a.wait("ex", "e1").await.exit_status, 0);
    let e = a.exec("ex", "e1", &["true"], false).await.unwrap_err();
    assert_eq!(status_of(&e).0, ttrpc::Code::ALREADY_EXISTS);
    let procs = a.list_processes("ex").await;
    assert_eq!(
        procs.processes.len(),
        1,
        "only the sleep is left: {:?}",
        procs.processes
    );
    // Exec processes can be removed one by one; their ids are free again
    // and nothing of them stays in the agent.
    let fds = settled_fds(a.pid()).await;
    for i in 0..30 {
        a.exec("ex", "probe", &["sh", "-c", "echo probe"], false)
            .await
            .unwrap();
        assert_eq!(
            a.read_all("ex", "probe", false).await,
            "probe\n",
            "round {i}"
        );
        assert_eq!(a.wait("ex", "probe").await.exit_status, 0);
        let rm = pb::RemoveContainerRequest {
            container_id: "ex".into(),
            exec_id: "probe".into(),
            ..Default::default()
        };
        a.client.remove_container(ctx(), &rm).await.unwrap();
    }
    assert_eq!(
        settled_fds(a.pid()).await,
        fds,
        "descriptors of removed execs are closed"
    );
    let req = pb::WaitProcessRequest {
        container_id: "ex".into(),
        exec_id: "probe".into(),
        ..Default::default()
    };
    let (code, _) = status_of(&a.client.wait_process(ctx(), &req).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    a.remove("ex").await;
}

#[tokio::test]
async fn hundred_cycles_leave_nothing_behind() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let s = spec(&a.rootfs(), &["true"]);
    // One warm-up cycle: the runtime's lazily created descriptors.
    a.run_to_end("warm", &s).await;
    let (procs, fds, mounts) = (
        descendants(a.pid()),
        count_fds(a.pid()),
        count_mounts(a.dir.path()),
    );
    for i in 0..100 {
        let id = format!("cycle-{i}");
        let (exit, _, _) = a.run_to_end(&id, &s).await;
        assert_eq!(exit.exit_status, 0, "cycle {i}");
    }
    assert_eq!(descendants(a.pid()), procs, "processes left behind");
    assert_eq!(count_fds(a.pid()), fds, "descriptors left behind");
    assert_eq!(count_mounts(a.dir.path()), mounts, "mounts left behind");
    assert_eq!(mounts, 0);
    a.health().await;
}
