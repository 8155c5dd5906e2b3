//! The runtime's pod-network plumbing against real netlink, without a VM:
//! a "node" and a "pod" network namespace made by the test, a veth between
//! them as CNI's bridge plugin leaves it, then `scan`, `plumb` and
//! `unplumb`. Frames cross the tap both ways: the node's ARP request comes
//! out of the tap fd, and the reply written into it reaches the node.
//! Nothing touches the machine's own network.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_runtime::network::{
    open_netns, plumb, scan, unplumb, HoldingNetns, Mac, NetworkError, NetworkRecord, TapSource,
    WarmTap,
};
use nutshell_tests::netns::TestNetns;
use nutshell_tests::{is_root, require, which};

/// `ip <args>` inside `ns`, which must succeed.
fn ip(ns: &TestNetns, args: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    ns.output("ip", &args)
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")))
}

/// `tc <args>` inside `ns`.
fn tc(ns: &TestNetns, args: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    ns.output("tc", &args)
        .unwrap_or_else(|e| panic!("tc {}: {e}", args.join(" ")))
}

const POD_MAC: &str = "0a:58:0a:d5:09:02";

/// A node and a pod namespace joined by a veth, the pod end `eth0` with an
/// address, a default route and a permanent neighbour.
fn node_and_pod() -> Option<(TestNetns, TestNetns)> {
    if !require(is_root(), "needs root")
        || !require(which("ip").is_some(), "needs ip (iproute2)")
        || !require(which("tc").is_some(), "needs tc (iproute2)")
    {
        return None;
    }
    let node = TestNetns::create().expect("node namespace");
    let pod = TestNetns::create().expect("pod namespace");
    ip(
        &node,
        &format!(
            "link add veth-node type veth peer name eth0 netns {}",
            pod.path().display()
        ),
    );
    ip(&node, "addr add 10.213.9.1/24 dev veth-node");
    ip(&node, "link set veth-node up");
    ip(&pod, &format!("link set eth0 address {POD_MAC} mtu 1400"));
    ip(&pod, "addr add 10.213.9.2/24 dev eth0");
    ip(&pod, "addr add fd00:213::2/64 dev eth0 nodad");
    ip(&pod, "link set eth0 up");
    ip(&pod, "route add default via 10.213.9.1 dev eth0");
    ip(
        &pod,
        "neigh add 10.213.9.77 lladdr 02:00:00:00:00:77 dev eth0 nud permanent",
    );
    Some((node, pod))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_pods_veth_is_read_as_the_guest_must_copy_it() {
    let Some((_node, pod)) = node_and_pod() else {
        return;
    };
    let net = rt().block_on(scan(&pod.path())).expect("scan");
    assert_eq!(net.interfaces.len(), 1, "{net:?}");
    let eth0 = &net.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mac.to_string(), POD_MAC);
    assert_eq!(eth0.mtu, 1400);
    assert!(eth0.up);
    let mut addrs: Vec<String> = eth0
        .addresses
        .iter()
        .map(|(a, p)| format!("{a}/{p}"))
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.213.9.2/24", "fd00:213::2/64"], "no link-local");
    let default = net
        .routes
        .iter()
        .find(|r| r.prefix_len == 0 && r.destination.is_ipv4())
        .expect("the default route");
    assert_eq!(default.gateway, Some("10.213.9.1".parse().unwrap()));
    assert_eq!(default.device, "eth0");
    assert!(
        net.routes.iter().all(|r| r.gateway.is_some()),
        "the kernel's subnet routes are the guest kernel's business: {:?}",
        net.routes
    );
    assert_eq!(net.neighbors.len(), 1, "{:?}", net.neighbors);
    assert_eq!(net.neighbors[0].ip.to_string(), "10.213.9.77");
    let req = net.to_request(&[]);
    assert_eq!(req.interfaces[0].mac, POD_MAC);
}

#[test]
fn an_interface_that_cannot_be_mirrored_is_named() {
    let Some((_node, pod)) = node_and_pod() else {
        return;
    };
    ip(&pod, "link add extra0 type bridge");
    ip(&pod, "link set extra0 up");
    let e = rt().block_on(scan(&pod.path())).unwrap_err();
    assert!(matches!(e, NetworkError::Unsupported { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("extra0") && msg.contains("bridge"), "{msg}");
    // Down and without an address it carries nothing: skipped.
    ip(&pod, "link set extra0 down");
    let net = rt().block_on(scan(&pod.path())).expect("scan");
    assert_eq!(net.interfaces.len(), 1);
}

#[test]
fn a_vanished_namespace_is_an_error_that_names_it() {
    let path = PathBuf::from("/run/netns/nutshell-np-never-there");
    let e = rt().block_on(scan(&path)).unwrap_err();
    assert!(matches!(e, NetworkError::Netns { .. }), "{e}");
    assert!(e.to_string().contains("nutshell-np-never-there"), "{e}");
    // Nothing to take away from a namespace CNI already deleted.
    let record = NetworkRecord {
        netns: path,
        links: Vec::new(),
    };
    rt().block_on(unplumb(&record))
        .expect("a gone namespace is clean");
}

/// Reads frames from the nonblocking tap until `want` matches one.
fn read_frame(tap: &OwnedFd, want: impl Fn(&[u8]) -> bool, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        match nix::unistd::read(tap, &mut buf) {
            Ok(n) if want(&buf[..n]) => return Some(buf[..n].to_vec()),
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    None
}

fn is_arp_request_for(frame: &[u8], ip: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 1]
        && frame[38..42] == ip
}

/// The ARP reply `ip` is-at `mac` to the asker of `request`.
fn arp_reply(request: &[u8], mac: Mac, ip: [u8; 4]) -> Vec<u8> {
    let asker_mac = &request[22..28];
    let asker_ip = &request[28..32];
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(asker_mac);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip);
    f.extend_from_slice(asker_mac);
    f.extend_from_slice(asker_ip);
    f
}

#[test]
fn plumbing_joins_veth_and_tap_both_ways_and_unplumbing_leaves_nothing() {
    let Some((node, pod)) = node_and_pod() else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let net = rt.block_on(scan(&pod.path())).expect("scan");
    let plumbed = rt
        .block_on(plumb(&pod.path(), &net, state.path(), TapSource::Make))
        .expect("plumb");
    assert_eq!(
        NetworkRecord::load(state.path()).unwrap().as_ref(),
        Some(&plumbed.record),
        "the record is on disk for `shim delete`"
    );
    assert_eq!(plumbed.taps.len(), 1);
    let (mac, tap) = &plumbed.taps[0];
    assert_eq!(mac.to_string(), POD_MAC);
    let tap_name = &plumbed.record.links[0].tap;
    let link = ip(&pod, &format!("-o link show {tap_name}"));
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    for dev in ["eth0", tap_name.as_str()] {
        let q = tc(&pod, &format!("qdisc show dev {dev} ingress"));
        assert!(q.contains("ingress"), "{dev}: {q}");
        let f = tc(&pod, &format!("filter show dev {dev} ingress"));
        assert!(
            f.contains("protocol all") && f.contains("mirred") && f.contains("Redirect"),
            "{dev}: {f}"
        );
    }
    // A scan after plumbing still sees the pod's interface only.
    assert_eq!(rt.block_on(scan(&pod.path())).expect("rescan"), net);

    // veth → tap: the node's ARP request for the pod comes out of the tap.
    // Forked from a thread inside the node's namespace, ping lives there.
    let mut ping = ping_from(&node, "10.213.9.2");
    let pod_ip = [10, 213, 9, 2];
    let request = read_frame(
        tap,
        |f| is_arp_request_for(f, pod_ip),
        Duration::from_secs(5),
    )
    .expect("the node's ARP request reaches the tap");
    // tap → veth: the reply written into the tap teaches the node the MAC.
    let reply = arp_reply(&request, *mac, pod_ip);
    let n = nix::unistd::write(tap, &reply).expect("write the reply");
    assert_eq!(n, reply.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let neigh = ip(&node, "neigh show 10.213.9.2");
        if neigh.contains(POD_MAC) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never learnt the pod's MAC: {neigh}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ping.kill();
    let _ = ping.wait();

    // The VM's end goes: the tap goes with its last fd.
    drop(plumbed.taps);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ip(&pod, "-o link").contains(tap_name.as_str()) {
        assert!(Instant::now() < deadline, "the tap outlived its fd");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What outlives the VM is the veth's qdisc; unplumbing takes it away,
    // twice without harm.
    rt.block_on(unplumb(&plumbed.record)).expect("unplumb");
    rt.block_on(unplumb(&plumbed.record))
        .expect("unplumb again");
    assert_eq!(
        pod.tc_state("eth0").expect("tc"),
        None,
        "eth0's tc after unplumbing"
    );
    // The pod's own configuration is untouched.
    assert!(ip(&pod, "addr show eth0").contains("10.213.9.2/24"));
}

#[test]
fn a_plumbing_that_fails_halfway_undoes_what_it_did() {
    let Some((node, pod)) = node_and_pod() else {
        return;
    };
    // A second veth, and the name its tap would get taken by a bridge: the
    // first interface gets plumbed, the second cannot be.
    ip(
        &node,
        &format!(
            "link add veth-node2 type veth peer name eth1 netns {}",
            pod.path().display()
        ),
    );
    ip(&pod, "link set eth1 up");
    ip(&pod, "link add tap1_nutshell type bridge");
    let state = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let net = rt.block_on(scan(&pod.path())).expect("scan");
    assert_eq!(net.interfaces.len(), 2, "{net:?}");
    let e = rt
        .block_on(plumb(&pod.path(), &net, state.path(), TapSource::Make))
        .expect_err("the taken tap name fails the plumbing");
    assert!(e.to_string().contains("tap1_nutshell"), "{e}");
    for dev in ["eth0", "eth1"] {
        assert_eq!(pod.tc_state(dev).expect("tc"), None, "{dev} kept its tc");
    }
    assert!(
        !ip(&pod, "-o link").contains("tap0_nutshell"),
        "the first tap went with its fd"
    );
}

/// Pings `addr` from inside `ns`, in the background.
fn ping_from(ns: &TestNetns, addr: &str) -> std::process::Child {
    ns.run(|| {
        Command::new(nutshell_tests::BUSYBOX)
            .args(["ping", "-c", "3", addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    })
    .expect("enter the namespace")
    .expect("ping")
}

#[test]
fn a_warm_vms_taps_move_into_the_pod_and_carry_its_frames() {
    let Some((node, pod)) = node_and_pod() else {
        return;
    };
    let rt = rt();
    let holding = HoldingNetns::new().expect("the pool's namespace");
    let made = rt.block_on(holding.make_taps(7, 2)).expect("warm taps");
    let taps: Vec<WarmTap> = made.iter().map(|(t, _)| t.clone()).collect();
    assert_ne!(taps[0].mac, taps[1].mac);
    // The pool's taps live in its own namespace, not the pod's or the
    // node's.
    for ns in [&pod, &node] {
        assert!(!ip(ns, "-o link").contains(&taps[0].name));
    }
    let e = rt
        .block_on(holding.hand_over(&taps, 3, Some(open_netns(&pod.path()).unwrap())))
        .expect_err("more NICs than the VM has");
    assert!(e.to_string().contains("3 of a warm VM's 2 taps"), "{e}");

    rt.block_on(holding.hand_over(&taps, 1, Some(open_netns(&pod.path()).unwrap())))
        .expect("hand over");
    let links = ip(&pod, "-o link");
    assert!(links.contains("tap0_nutshell"), "{links}");
    assert!(!links.contains("tap1_nutshell") && !links.contains(&taps[1].name));
    // Both keep their fds working: the moved one in the pod, the unused
    // one where it was. A deleted tap would leave its fd in error
    // (EBADFD) for good, which a VMM's main loop would poll without end.
    let mut buf = [0u8; 64];
    for (_, fd) in &made {
        assert_eq!(
            nix::unistd::read(fd, &mut buf),
            Err(nix::errno::Errno::EAGAIN)
        );
    }

    let state = tempfile::tempdir().expect("tempdir");
    let net = rt.block_on(scan(&pod.path())).expect("scan");
    let plumbed = rt
        .block_on(plumb(&pod.path(), &net, state.path(), TapSource::Moved))
        .expect("plumb the moved tap");
    assert!(plumbed.taps.is_empty(), "the VMM holds the moved tap");
    let link = ip(&pod, "-o link show tap0_nutshell");
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    // The node's frames reach the warm VM's fd through the moved tap.
    let mut ping = ping_from(&node, "10.213.9.2");
    let request = read_frame(
        &made[0].1,
        |f| is_arp_request_for(f, [10, 213, 9, 2]),
        Duration::from_secs(5),
    );
    let _ = ping.kill();
    let _ = ping.wait();
    assert!(
        request.is_some(),
        "the node's ARP request never reached the warm tap"
    );

    drop(made);
    rt.block_on(unplumb(&plumbed.record)).expect("unplumb");
    assert_eq!(pod.tc_state("eth0").expect("tc"), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ip(&pod, "-o link").contains("tap0_nutshell") {
        assert!(Instant::now() < deadline, "the moved tap outlived its fd");
        std::thread::sleep(Duration::from_millis(50));
    }
}
