//! Pod networking through the CRI, as the kubelet drives it: a private
//! containerd runs in a network namespace the test made, with a CNI bridge
//! there (`start_net_test`), so every pod address and all test traffic stay
//! off the machine's own network.
//!
//! Two nutshell pods on the bridge get their CRI IPs and reach each other,
//! the node (the test's namespace) and a host port; a host-network pod gets
//! loopback only. Afterwards, and after a shim killed with SIGKILL, no tap
//! and no tc qdisc or filter is left in a pod's namespace, CNI's teardown
//! still succeeds, and nutshell leaves nothing on the host. The same bridge
//! flow with runc pods is the control: when it fails too, the harness or the
//! host is at fault, not nutshell.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use k8s_cri::v1::{DnsConfig, Mount, NamespaceMode, PodSandboxConfig, PortMapping, Protocol};
use nutshell_runtime::shim::pod::HOST_NETWORK_WARNING;
use nutshell_tests::containerd::{
    test_nutshell_config, Containerd, Footprint, CRI_NAMESPACE, NUTSHELL_HANDLER,
};
use nutshell_tests::cri::{pod_config, Cri};
use nutshell_tests::netns::{
    http_get, serve_http, start_net_test, NetTest, TestNetns, BRIDGE, NODE_IP,
};

/// How long a test gives nutshell to clean up before checking.
const SETTLE: Duration = Duration::from_secs(30);
/// The runc handler of the test containerd (its CRI default).
const RUNC_HANDLER: &str = "runc";
/// What pod B's httpd serves.
const POD_PAGE: &str = "served-by-pod-b";
/// What the node's server answers.
const NODE_PAGE: &str = "served-by-the-node";
/// A second address of the node, off the pods' subnet: a pod reaches it
/// only through its default route.
const NODE_ROUTED_IP: &str = "10.214.0.1";
/// Pod B's host port (portmap DNATs it to B's port 80).
const HOST_PORT: u16 = 18080;

/// A running pod, its containers, and a hold on its network namespace
/// (which outlives the pod, so the test can look inside after teardown).
struct Pod {
    id: String,
    config: PodSandboxConfig,
    containers: Vec<String>,
    ip: String,
    netns: Option<TestNetns>,
}

/// Runs a pod from `config` under `handler` with one container running
/// `command`. Like the kubelet, a pod on the CNI network gets an
/// `/etc/hosts` naming its IP and hostname.
async fn start_pod(
    cri: &mut Cri<'_>,
    c: &Containerd,
    config: PodSandboxConfig,
    handler: &str,
    command: &[&str],
) -> Pod {
    let id = cri.run_pod(&config, handler).await;
    let ip = cri.pod_ip(&id).await;
    let netns = cri
        .pod_netns(&id)
        .await
        .map(|p| TestNetns::hold(&p).expect("the pod's netns opens"));
    let mut mounts = Vec::new();
    if netns.is_some() {
        let hosts = c.dir().join(format!("{}-hosts", config.hostname));
        std::fs::write(
            &hosts,
            format!(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n{ip}\t{}\n",
                config.hostname
            ),
        )
        .unwrap();
        mounts.push(Mount {
            container_path: "/etc/hosts".into(),
            host_path: hosts.display().to_string(),
            ..Default::default()
        });
    }
    let name = config.hostname.clone();
    let container = cri
        .start_container(&id, &config, &name, command, mounts)
        .await;
    Pod {
        id,
        config,
        containers: vec![container],
        ip,
        netns,
    }
}

/// `http_get` from the node until it answers, for up to 60 s (a server
/// that just started may not listen yet).
fn node_fetch(t: &NetTest, addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match t.netns.run(|| http_get(addr)).expect("setns") {
            Ok(body) => return body,
            Err(e) if Instant::now() > deadline => {
                panic!("the node cannot fetch {addr}: {e}\n{}", t.c.log_tail(60))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A pod's shell script printing the body of `GET /` from `ip:port`. With
/// `nc`: busybox-static's `wget` crashes in a runc container.
fn get_script(ip: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 30 {ip} {port} | sed '1,/^\\r$/d'")
}

/// Asserts what a runtime added to a pod's namespace while the pod runs:
/// for nutshell a tap beside `eth0` and tc redirects on `eth0`; for runc
/// nothing (just `lo` and `eth0`, no tc).
fn assert_mirrored(pod: &Pod, nutshell: bool) {
    let ns = pod.netns.as_ref().expect("a CNI pod has a netns");
    let links = ns.links().unwrap();
    let tc = ns.tc_state("eth0").unwrap();
    if nutshell {
        assert!(
            links.len() > 2 && links.contains(&"eth0".to_string()),
            "a tap beside eth0: {links:?}"
        );
        let tc = tc.expect("an ingress qdisc on eth0");
        assert!(tc.contains("mirred"), "a redirect on eth0: {tc}");
    } else {
        assert_eq!(links, ["eth0", "lo"]);
        assert_eq!(tc, None);
    }
}

/// Two pods on the bridge under `handler`: their IPs, DNS, hostname and
/// hosts file, pod to pod, node to pod, pod to node (on the bridge, and
/// off the subnet through the default route), a host port, and a clean
/// teardown.
fn two_pods_on_the_bridge(handler: &str) {
    let Some(t) = start_net_test(&test_nutshell_config("")) else {
        return;
    };
    let nutshell = handler == NUTSHELL_HANDLER;
    let logs = t.pod_logs();
    // On every address of the node: the bridge only comes with the first pod.
    let node_listener = t
        .netns
        .run(|| TcpListener::bind("0.0.0.0:0"))
        .unwrap()
        .expect("a listener in the node's namespace");
    let node_port = node_listener.local_addr().unwrap().port();
    let node_server = serve_http(node_listener, NODE_PAGE.into(), 2);
    t.netns
        .output(
            "ip",
            &["addr", "add", &format!("{NODE_ROUTED_IP}/32"), "dev", "lo"],
        )
        .expect("a second node address");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cri = Cri::connect(&t.c).await;
        let mut b_config = pod_config("pod-b", &logs, NamespaceMode::Pod);
        b_config.port_mappings = vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: 80,
            host_port: HOST_PORT.into(),
            host_ip: String::new(),
        }];
        let serve = format!(
            "mkdir -p /www && echo {POD_PAGE} > /www/index.html && exec httpd -f -p 80 -h /www"
        );
        t.c.wait_pool_warm().expect("the test's pool readies a VM");
        let b = start_pod(&mut cri, &t.c, b_config, handler, &["sh", "-c", &serve]).await;
        let mut a_config = pod_config("pod-a", &logs, NamespaceMode::Pod);
        a_config.dns_config = Some(DnsConfig {
            servers: vec!["10.213.0.53".into()],
            searches: vec!["pods.test.invalid".into()],
            options: vec!["ndots:2".into()],
        });
        let a = start_pod(&mut cri, &t.c, a_config, handler, &["sleep", "1000000"]).await;
        assert_ne!(a.ip, b.ip);
        for pod in [&a, &b] {
            assert!(pod.ip.starts_with("10.213.0."), "{}", pod.ip);
            assert_mirrored(pod, nutshell);
        }
        // With a pool (NUTSHELL_TEST_POOL=1), pod B's VM was a warm one
        // (the test waited for it), its NIC moved into B's namespace at the
        // claim; pod A may find the pool still refilling.
        if let (true, Some(claims)) = (nutshell, t.c.pool_claims()) {
            assert!(claims >= 1, "no pod claimed a warm VM");
        }

        // Inside pod A: its address, DNS config, hostname and hosts file.
        let a_eth0 = cri
            .exec_ok(&a.containers[0], "ip -o -4 addr show dev eth0")
            .await;
        assert!(
            a_eth0.contains(&format!("inet {}/24", a.ip)),
            "eth0 has the CRI IP {}: {a_eth0}",
            a.ip
        );
        let resolv = cri.exec_ok(&a.containers[0], "cat /etc/resolv.conf").await;
        for line in [
            "nameserver 10.213.0.53",
            "search pods.test.invalid",
            "options ndots:2",
        ] {
            assert!(resolv.lines().any(|l| l == line), "{line:?} in {resolv}");
        }
        let names = cri
            .exec_ok(&a.containers[0], "hostname; grep -w pod-a /etc/hosts")
            .await;
        assert_eq!(names, format!("pod-a\n{}\tpod-a\n", a.ip));

        // The node reaches pod B directly and through the host port.
        let b_addr: SocketAddr = format!("{}:80", b.ip).parse().unwrap();
        assert_eq!(node_fetch(&t, b_addr).trim(), POD_PAGE);
        let host_port: SocketAddr = format!("{NODE_IP}:{HOST_PORT}").parse().unwrap();
        assert_eq!(node_fetch(&t, host_port).trim(), POD_PAGE);
        // Pod A reaches pod B, and the node.
        let from_b = cri.exec_ok(&a.containers[0], &get_script(&b.ip, 80)).await;
        assert_eq!(from_b.trim(), POD_PAGE);
        for node_ip in [NODE_IP, NODE_ROUTED_IP] {
            let from_node = cri
                .exec_ok(&a.containers[0], &get_script(node_ip, node_port))
                .await;
            assert_eq!(from_node.trim(), NODE_PAGE, "from {node_ip}");
        }
        assert_eq!(node_server.join().unwrap(), 2);

        for pod in [&a, &b] {
            cri.remove_pod(&pod.id, &pod.containers).await;
            assert_pod_netns_clean(pod, false);
        }
        assert_eq!(
            t.netns.links().unwrap(),
            ["lo", BRIDGE],
            "the node keeps only its bridge"
        );
    });
    t.c.assert_left_nothing(&t.before, SETTLE);
}

/// Asserts a pod's namespace holds no tap and no tc state: only `lo`, and
/// `eth0` while CNI has not torn it down yet (`with_eth0`). A tap goes
/// with the last process holding it, the VMM, which may still be dying
/// when the runtime's clean-up returns: the namespace gets [`SETTLE`].
fn assert_pod_netns_clean(pod: &Pod, with_eth0: bool) {
    let ns = pod.netns.as_ref().expect("a CNI pod has a netns");
    let state = || {
        let links = ns.links().unwrap();
        let tc = if links.iter().any(|l| l == "eth0") {
            ns.tc_state("eth0").unwrap()
        } else {
            None
        };
        (links, tc)
    };
    let links: &[&str] = if with_eth0 { &["eth0", "lo"] } else { &["lo"] };
    let want = (
        links.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        None,
    );
    let deadline = Instant::now() + SETTLE;
    let mut got = state();
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        got = state();
    }
    assert_eq!(
        got, want,
        "pod {}: links and eth0's tc",
        pod.config.hostname
    );
}

#[test]
fn nutshell_pods_on_a_cni_bridge_reach_each_other_and_the_node() {
    two_pods_on_the_bridge(NUTSHELL_HANDLER);
}

#[test]
fn runc_pods_on_the_same_bridge_reach_each_other_and_the_node() {
    two_pods_on_the_bridge(RUNC_HANDLER);
}

/// The pid of the shim serving `pod` (its command line names `-id <pod>`).
fn shim_pid(pod: &str) -> u32 {
    let needle = format!("-id {pod}");
    Footprint::now()
        .processes
        .iter()
        .filter(|(_, name)| name == "containerd-shim-nutshell-v2")
        .find(|(pid, _)| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .map(|(pid, _)| *pid)
        .unwrap_or_else(|| panic!("no shim serves pod {pod}"))
}

/// Runs a sleeping nutshell pod `name` on `network` in a fresh network
/// test and hands it to `check`; then removes it and checks that its
/// namespace, if any, holds only `lo`, and that nutshell left nothing.
fn with_a_nutshell_pod(
    name: &str,
    network: NamespaceMode,
    check: impl AsyncFnOnce(&NetTest, &mut Cri<'_>, &Pod),
) {
    let Some(t) = start_net_test(&test_nutshell_config("")) else {
        return;
    };
    let config = pod_config(name, &t.pod_logs(), network);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cri = Cri::connect(&t.c).await;
        let sleep = ["sleep", "1000000"];
        let pod = start_pod(&mut cri, &t.c, config, NUTSHELL_HANDLER, &sleep).await;
        check(&t, &mut cri, &pod).await;
        cri.remove_pod(&pod.id, &pod.containers).await;
        if pod.netns.is_some() {
            assert_pod_netns_clean(&pod, false);
        }
    });
    t.c.assert_left_nothing(&t.before, SETTLE);
}

/// `kill -9`s `pid` (a process of a running nutshell pod), waits until
/// CRI reports the pod not ready, then checks that the runtime took its
/// plumbing away while CNI's eth0 is still there; the pod is then removed
/// as usual (StopPodSandbox's CNI DEL must not trip).
async fn kill_and_check_the_netns(t: &NetTest, cri: &mut Cri<'_>, pod: &Pod, what: &str, pid: u32) {
    assert_mirrored(pod, true);
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // containerd learns of the end (the shim's exit, or the task's exit the
    // shim reports), then has the task deleted.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cri.pod_ready(&pod.id).await {
        assert!(
            Instant::now() < deadline,
            "the pod is still ready 60 s after its {what} died\n{}",
            t.c.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // CNI has not torn eth0 down yet: what is left is the runtime's.
    assert_pod_netns_clean(pod, true);
}

#[test]
fn a_killed_shim_leaves_no_tap_or_tc_filter_in_the_pods_netns() {
    with_a_nutshell_pod("pod-killed", NamespaceMode::Pod, async |t, cri, pod| {
        kill_and_check_the_netns(t, cri, pod, "shim", shim_pid(&pod.id)).await;
    });
}

#[test]
fn a_killed_vm_leaves_no_tap_or_tc_filter_in_the_pods_netns() {
    with_a_nutshell_pod("pod-vm-killed", NamespaceMode::Pod, async |t, cri, pod| {
        let dir = format!("{}/", t.c.pod_dir(CRI_NAMESPACE, &pod.id).display());
        let vmm = Footprint::now()
            .processes
            .into_iter()
            .filter(|(_, name)| name == "qemu-system-x86_64" || name == "nutshell-vmm")
            .find(|(pid, _)| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir))
            })
            .map(|(pid, _)| pid)
            .unwrap_or_else(|| panic!("no VMM serves pod {}", pod.id));
        kill_and_check_the_netns(t, cri, pod, "VM", vmm).await;
    });
}

#[test]
fn a_host_network_pod_gets_loopback_only_and_a_warning() {
    with_a_nutshell_pod("pod-host", NamespaceMode::Node, async |t, cri, pod| {
        assert!(pod.netns.is_none(), "a host-network pod has no netns");
        let id = &pod.containers[0];
        let nics = cri.exec_ok(id, "ls /sys/class/net").await;
        assert_eq!(nics.split_whitespace().collect::<Vec<_>>(), ["lo"]);
        let ping = "ping -c1 -W5 127.0.0.1 >/dev/null && echo reached";
        assert_eq!(cri.exec_ok(id, ping).await, "reached\n", "loopback works");
        assert_eq!(t.netns.links().unwrap(), ["lo"], "no tap on the node");
        assert!(
            t.c.log_tail(usize::MAX).contains(HOST_NETWORK_WARNING),
            "the shim warns that it cannot share the host's network\n{}",
            t.c.log_tail(60)
        );
    });
}
