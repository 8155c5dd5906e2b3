//! The Kubernetes path: a CRI client (`k8s-cri`, as the kubelet speaks it)
//! on a private containerd's socket runs a pod with `runtime_handler:
//! "nutshell"`: one VM for the sandbox and both of its containers.

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::{
    ContainerStatsRequest, ExecSyncRequest, LinuxContainerResources, Mount, NamespaceMode,
    UpdateContainerResourcesRequest,
};
use nutshell_tests::containerd::{
    guest_kernel_release, prerequisites, serial, test_nutshell_config, Containerd, Footprint,
    CRI_NAMESPACE, NUTSHELL_HANDLER,
};
use nutshell_tests::cri::{pod_config, Cri};
use nutshell_tests::require;

/// The command lines of the QEMUs serving CRI pod `pod` of `c`.
fn vm_cmdlines(c: &Containerd, pod: &str) -> Vec<String> {
    let dir = format!("{}/", c.pod_dir(CRI_NAMESPACE, pod).display());
    Footprint::now()
        .processes
        .iter()
        .filter(|(_, name)| name == "qemu-system-x86_64")
        .filter_map(|(pid, _)| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect()
}

#[test]
fn a_cri_pod_with_two_containers_runs_in_one_vm() {
    let _g = serial();
    let ready = prerequisites();
    if !require(
        ready.is_ok(),
        ready.as_ref().err().map_or("", String::as_str),
    ) {
        return;
    }
    let before = Footprint::now();
    // The CRI runtime option ConfigPath must win over $NUTSHELL_CONFIG,
    // whose kernel does not exist.
    let env_config = test_nutshell_config("").replace(
        &format!(
            "kernel = \"{}\"",
            nutshell_tests::guest_dir().join("vmlinux").display()
        ),
        "kernel = \"/nonexistent/only-in-the-env-config\"",
    );
    assert!(env_config.contains("only-in-the-env-config"));
    let c = Containerd::start_with(&env_config, Some(&test_nutshell_config("")))
        .expect("private containerd starts");
    // Host directories for the pod's volumes: one read-only, one writable.
    let ro_dir = c.dir().join("vol-ro");
    let rw_dir = c.dir().join("vol-rw");
    std::fs::create_dir_all(&ro_dir).unwrap();
    std::fs::create_dir_all(&rw_dir).unwrap();
    std::fs::write(ro_dir.join("hello"), "hello-from-host\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cri = Cri::connect(&c).await;
        let logs = c.dir().join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut pod_config = pod_config("nutshell-pod", &logs, NamespaceMode::Node);
        pod_config.labels = HashMap::from([("app".to_string(), "nutshell-test".to_string())]);
        // Pod sizing: passed on by CRI (pod_annotations = ["io.nutshell.*"]).
        pod_config.annotations =
            HashMap::from([("io.nutshell.vm.memory_mib".to_string(), "320".to_string())]);
        let pod = cri.run_pod(&pod_config, NUTSHELL_HANDLER).await;

        let mut ids = Vec::new();
        for name in ["first", "second"] {
            let script = format!("echo {name} started; while true; do sleep 1; done");
            let mounts = vec![
                Mount {
                    container_path: "/data".into(),
                    host_path: ro_dir.display().to_string(),
                    readonly: true,
                    ..Default::default()
                },
                Mount {
                    container_path: "/scratch".into(),
                    host_path: rw_dir.display().to_string(),
                    ..Default::default()
                },
            ];
            let id = cri
                .start_container(&pod, &pod_config, name, &["sh", "-c", &script], mounts)
                .await;
            ids.push(id);
        }
        let vms = vm_cmdlines(&c, &pod);
        assert_eq!(vms.len(), 1, "exactly one VM serves the pod");
        assert!(
            vms[0].contains("size=320M"),
            "the pod annotation sized the VM: {}",
            vms[0]
        );

        let exec = cri
            .client
            .exec_sync(ExecSyncRequest {
                container_id: ids[1].clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "uname -r; hostname; cat /data/hello; \
                     if touch /data/new 2>/dev/null; then echo writable; else echo read-only; fi; \
                     echo from-the-pod > /scratch/out; grep -c localhost /etc/hosts"
                        .into(),
                ],
                timeout: 120,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", c.log_tail(80)))
            .into_inner();
        assert_eq!(
            exec.exit_code,
            0,
            "{}",
            String::from_utf8_lossy(&exec.stderr)
        );
        let out = String::from_utf8_lossy(&exec.stdout).into_owned();
        let mut lines = out.lines();
        assert_eq!(lines.next(), guest_kernel_release().as_deref(), "{out}");
        assert_eq!(lines.next(), Some("nutshell-pod"), "{out}");
        assert_eq!(
            lines.next(),
            Some("hello-from-host"),
            "a host volume is visible: {out}"
        );
        assert_eq!(
            lines.next(),
            Some("read-only"),
            "a read-only volume stays read-only: {out}"
        );
        let hosts: u32 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        assert!(hosts >= 1, "CRI's /etc/hosts reaches the container: {out}");
        assert!(!ro_dir.join("new").exists());
        assert_eq!(
            std::fs::read_to_string(rw_dir.join("out")).unwrap_or_default(),
            "from-the-pod\n",
            "a writable volume writes through to the host"
        );

        // UpdateContainerResources reaches the guest's cgroup.
        cri.client
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: ids[0].clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 128 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", c.log_tail(80)));
        // The guest cgroup's memory.max, as the task's v2 metrics report it.
        let metrics = c
            .ctr_in(CRI_NAMESPACE, &["task", "metrics", &ids[0]])
            .output()
            .unwrap();
        let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
        let limit = metrics.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("memory.usage_limit")).then(|| it.next().map(str::to_string))?
        });
        assert_eq!(
            limit,
            Some((128u64 << 20).to_string()),
            "the update reached the guest: {metrics}"
        );

        let stats = cri
            .client
            .container_stats(ContainerStatsRequest {
                container_id: ids[0].clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", c.log_tail(80)))
            .into_inner()
            .stats
            .expect("stats");
        let mem = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        let cpu = stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map_or(0, |v| v.value);
        assert!(mem > 0 && cpu > 0, "memory {mem}, cpu {cpu}");

        // The first container's output reached its CRI log.
        let log = std::fs::read_to_string(logs.join("first.log")).unwrap_or_default();
        assert!(log.contains("first started"), "{log:?}");

        cri.remove_containers(&ids).await;
        assert_eq!(
            vm_cmdlines(&c, &pod).len(),
            1,
            "the VM outlives its containers"
        );
        cri.remove_pod(&pod, &[]).await;
    });
    c.assert_left_nothing(&before, Duration::from_secs(30));
}
