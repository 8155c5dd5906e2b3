//! What a container sees of the host: its own hostname, a read-only rootfs,
//! masked and read-only /proc paths and its own sysctls, and the namespaces
//! containers of one sandbox share.

use nutshell_protocol::agent as pb;
use serde_json::{json, Value};

use crate::agent::{ctx, sh, status_of, Agent};
use crate::procfs::descendants;

#[tokio::test]
async fn hostname_is_isolated() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_ne!(host, "nutshell-test");
    let (exit, out, _) = a.run_to_end("host", &sh(&a, "hostname")).await;
    assert_eq!(exit.exit_status, 0);
    assert_eq!(out, "nutshell-test\n");
    assert_eq!(
        nix::unistd::gethostname().unwrap().into_string().unwrap(),
        host
    );
}

#[tokio::test]
async fn readonly_rootfs_refuses_writes() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "touch /written");
    s["root"]["readonly"] = json!(true);
    let (exit, _, err) = a.run_to_end("ro", &s).await;
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Read-only file system"), "stderr: {err:?}");
    assert!(!a.rootfs().join("written").exists());
    // The same write works on a writable rootfs (the test can fail).
    let (exit, _, _) = a.run_to_end("rw", &sh(&a, "touch /written")).await;
    assert_eq!(exit.exit_status, 0);
    assert!(a.rootfs().join("written").exists());
}

#[tokio::test]
async fn masked_paths_readonly_paths_and_sysctls_apply() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want = if host_forward.trim() == "1" { "0" } else { "1" };
    let mut s = sh(
        &a,
        "wc -c < /proc/timer_list; cat /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/kernel/panic",
    );
    s["linux"]["sysctl"] = json!({ "net.ipv4.ip_forward": want });
    let (exit, out, err) = a.run_to_end("masked", &s).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["0", want], "stdout {out:?} stderr {err:?}");
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "the host's sysctl is untouched"
    );
}

#[tokio::test]
async fn sandbox_containers_share_net_ipc_uts_but_not_mounts() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let req = pb::CreateSandboxRequest {
        sandbox_id: "pod".into(),
        hostname: "pod-host".into(),
        shared_dir: a.dir.path().display().to_string(),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &req).await.unwrap();
    let (code, _) = status_of(&a.client.create_sandbox(ctx(), &req).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    let script =
        "hostname; for n in net ipc uts mnt; do readlink /proc/self/ns/$n; done; sleep 100";
    let mut first = sh(&a, script);
    first["hostname"] = Value::Null;
    // Relative rootfs paths resolve in <shared_dir>/<container id>.
    std::fs::create_dir(a.dir.path().join("pause")).unwrap();
    first["root"]["path"] = json!("../rootfs");
    a.run("pause", &first).await;
    let mut second = sh(&a, script);
    second["hostname"] = Value::Null;
    a.run("app", &second).await;
    let lines = |s: String| s.lines().map(str::to_string).collect::<Vec<_>>();
    let p = lines(a.read_until("pause", "", "mnt:").await);
    let q = lines(a.read_until("app", "", "mnt:").await);
    assert_eq!((p[0].as_str(), q[0].as_str()), ("pod-host", "pod-host"));
    assert_eq!(p[1..4], q[1..4], "net, ipc and uts are shared");
    assert_ne!(p[4], q[4], "mount namespaces are not");
    a.client
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .await
        .unwrap();
    let (code, _) = status_of(&a.start_c("app").await.unwrap_err());
    assert_eq!(
        code,
        ttrpc::Code::NOT_FOUND,
        "DestroySandbox removed the containers"
    );
    assert!(
        descendants(a.pid()).is_empty(),
        "no process left: {:?}",
        descendants(a.pid())
    );
    let d = a
        .client
        .guest_details(ctx(), &pb::GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(!d.pid1 && d.cpus >= 1 && d.mem_total_bytes > 0 && !d.kernel_release.is_empty());
}
