//! WarmUp: the throw-away container the warm pool has an idle agent create
//! and remove. It must leave nothing (no process, descriptor, mount,
//! directory or container), leave the agent able to run a pod, and refuse
//! an agent that is not idle.

use nutshell_protocol::agent as pb;

use crate::agent::{ctx, spec, status_of, Agent};
use crate::procfs::{count_mounts, descendants, settled_fds};

async fn warm_up(a: &Agent) -> ttrpc::Result<pb::Empty> {
    a.client.warm_up(ctx(), &pb::WarmUpRequest::new()).await
}

#[tokio::test]
async fn warm_up_leaves_nothing_and_the_agent_runs_containers_after() {
    let Some(a) = Agent::start().await else {
        return;
    };
    // The agent's own directories for it, under the temp dir it inherited.
    let prefix = format!("warm-up.{}.", a.pid());
    let left = || -> Vec<_> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    // Twice: the first call's lazily created runtime descriptors (a
    // ttrpc stream, the reaper's) are not the warm-up's.
    warm_up(&a).await.expect("a first warm-up");
    let (procs, fds) = (descendants(a.pid()), settled_fds(a.pid()).await);
    warm_up(&a).await.expect("a second warm-up");
    assert_eq!(descendants(a.pid()), procs, "processes left behind");
    assert!(procs.is_empty(), "an idle agent has no children: {procs:?}");
    assert_eq!(settled_fds(a.pid()).await, fds, "descriptors left behind");
    assert_eq!(
        count_mounts(&std::env::temp_dir().join(&prefix)),
        0,
        "mounts left behind"
    );
    assert_eq!(
        left(),
        Vec::<std::path::PathBuf>::new(),
        "directories left behind"
    );
    let req = pb::ListProcessesRequest {
        container_id: "nutshell-warm-up".into(),
        ..Default::default()
    };
    let e = a.client.list_processes(ctx(), &req).await.unwrap_err();
    assert_eq!(status_of(&e).0, ttrpc::Code::NOT_FOUND);
    let (exit, out, _) = a
        .run_to_end("after", &spec(&a.rootfs(), &["echo", "ran"]))
        .await;
    assert_eq!((exit.exit_status, out.as_str()), (0, "ran\n"));
}

#[tokio::test]
async fn warm_up_is_refused_beside_a_container_or_a_sandbox() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.run("busy", &spec(&a.rootfs(), &["sleep", "100"])).await;
    let (code, msg) = status_of(&warm_up(&a).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("a container exists"), "{msg}");
    assert_eq!(a.list_processes("busy").await.processes.len(), 1);
    a.remove("busy").await;
    let req = pb::CreateSandboxRequest {
        sandbox_id: "pod".into(),
        shared_dir: a.dir.path().display().to_string(),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.unwrap();
    let (code, msg) = status_of(&warm_up(&a).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("a sandbox exists"), "{msg}");
}
