//! UpdateNetwork against the real kernel: the agent runs in a network
//! namespace the test makes, holding a veth pair as the guest holds its
//! virtio NIC, and `ip -j` inside that namespace says what it did. Nothing
//! here touches the host's own interfaces.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nutshell_protocol::agent as pb;
use nutshell_tests::{is_root, require, run_ok, which};
use serde_json::{json, Value};

use crate::agent::{ctx, sh, status_of, Agent};

/// The "NIC" the agent finds by MAC, and its veth peer (the "host side").
const NIC_MAC: &str = "02:00:00:5e:aa:01";
const PEER_MAC: &str = "02:00:00:5e:aa:02";
const OTHER_MAC: &str = "02:00:00:5e:aa:03";

/// A network namespace of the test's, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A namespace with `nic0` (down) and its peer `peer0` (up, so the NIC
    /// gets a carrier once the agent sets it up); `None` after a SKIP line.
    fn create() -> Option<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        if !require(is_root(), "needs root (network namespaces)")
            || !require(which("ip").is_some(), "needs ip (iproute2)")
            || !require(which("nsenter").is_some(), "needs nsenter (util-linux)")
        {
            return None;
        }
        let name = format!(
            "nutshell-agentnet-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name])).unwrap();
        let ns = Self { name };
        // No DAD: the link-local addresses settle at once, so the checks
        // that nothing changes see only what the agent does.
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ]);
        }
        ns.add_nic("nic0", NIC_MAC, "peer0", PEER_MAC);
        Some(ns)
    }

    /// A veth pair: `nic` (down) as the guest's NIC, `peer` (up).
    fn add_nic(&self, nic: &str, mac: &str, peer: &str, peer_mac: &str) {
        self.ip(&[
            "link", "add", nic, "address", mac, "type", "veth", "peer", "name", peer, "address",
            peer_mac,
        ]);
        self.ip(&["link", "set", peer, "up"]);
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn exec(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
        .unwrap()
    }

    fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args)).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = run_ok(Command::new("ip").args(["-n", &self.name, "-j"]).args(args)).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
    }

    /// `dev`'s addresses as "addr/len", without the kernel's link-local.
    fn addresses(&self, dev: &str) -> BTreeSet<String> {
        let links = self.json(&["addr", "show", "dev", dev]);
        links[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .filter(|a| !a.starts_with("fe80:"))
            .collect()
    }

    /// The main table's routes, "dst via gw dev scope proto metric" each.
    fn routes(&self, family: &str) -> BTreeSet<String> {
        let field = |r: &Value, k: &str| r[k].as_str().map(str::to_string).unwrap_or_default();
        self.json(&[family, "route", "show", "table", "main"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} via {} dev {} scope {} proto {} metric {}",
                    field(r, "dst"),
                    field(r, "gateway"),
                    field(r, "dev"),
                    field(r, "scope"),
                    field(r, "protocol"),
                    r["metric"].as_u64().unwrap_or(0)
                )
            })
            .collect()
    }

    /// The permanent neighbour entries, "ip lladdr dev" each.
    fn neighbors(&self) -> BTreeSet<String> {
        self.json(&["neigh", "show", "nud", "permanent"])
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                format!(
                    "{} {} {}",
                    n["dst"].as_str().unwrap(),
                    n["lladdr"].as_str().unwrap(),
                    n["dev"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// Everything UpdateNetwork can change, for before/after comparisons.
    fn snapshot(&self) -> String {
        [
            "link",
            "addr",
            "route show table all",
            "-6 route show table all",
            "neigh",
        ]
        .iter()
        .map(|args| self.ip(&args.split(' ').collect::<Vec<_>>()))
        .collect()
    }

    /// Waits until the kernel's own work after a link came up is done (its
    /// IPv6 link-local address), so that later events are the agent's.
    fn settle(&self, dev: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .ip(&["-6", "addr", "show", "dev", dev])
            .contains("fe80::")
        {
            assert!(Instant::now() < deadline, "{dev} got no link-local address");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip_address(address: &str, prefix_len: u32) -> pb::IpAddress {
    pb::IpAddress {
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn route(destination: &str, gateway: &str, scope: u32, metric: u32) -> pb::Route {
    pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: "eth0".into(),
        scope,
        metric,
        ..Default::default()
    }
}

fn neighbor(ip: &str, mac: &str) -> pb::Neighbor {
    pb::Neighbor {
        ip: ip.into(),
        mac: mac.into(),
        device: "eth0".into(),
        ..Default::default()
    }
}

/// nic0 as a pod's eth0: dual stack, a link route, default routes through
/// the "host", a permanent entry for each gateway.
fn pod_request() -> pb::UpdateNetworkRequest {
    pb::UpdateNetworkRequest {
        interfaces: vec![pb::Interface {
            mac: NIC_MAC.into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![ip_address("10.88.0.5", 16), ip_address("fd00:88::5", 64)],
            up: true,
            ..Default::default()
        }],
        routes: vec![
            route("0.0.0.0/0", "10.88.0.1", 0, 0),
            route("10.89.0.0/16", "", 253, 0),
            route("::/0", "fd00:88::1", 0, 0),
        ],
        neighbors: vec![
            neighbor("10.88.0.1", PEER_MAC),
            neighbor("fd00:88::1", PEER_MAC),
        ],
        ..Default::default()
    }
}

async fn update(a: &Agent, req: &pb::UpdateNetworkRequest) -> ttrpc::Result<pb::Empty> {
    a.client.update_network(ctx(), req).await
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Runs `ip monitor` on the namespace while `f` runs: what changed.
async fn events_during<F: std::future::Future>(ns: &Netns, f: F) -> (F::Output, String) {
    let mut monitor = Command::new("ip")
        .args([
            "-n", &ns.name, "monitor", "link", "address", "route", "neigh",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = f.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    monitor.kill().unwrap();
    let events = monitor.wait_with_output().unwrap();
    (out, String::from_utf8_lossy(&events.stdout).into_owned())
}

/// A namespace with nic0, and the agent in it after the pod's request.
async fn pod() -> Option<(Netns, Agent)> {
    let ns = Netns::create()?;
    let a = Agent::start_in_netns(&ns.path()).await?;
    update(&a, &pod_request()).await.expect("UpdateNetwork");
    Some((ns, a))
}

#[tokio::test]
async fn update_network_configures_the_nic_and_is_idempotent() {
    let Some(ns) = Netns::create() else { return };
    let Some(a) = Agent::start_in_netns(&ns.path()).await else {
        return;
    };
    let req = pod_request();
    let (first, events) = events_during(&ns, update(&a, &req)).await;
    first.expect("UpdateNetwork");
    // The monitor sees the agent's changes (so its silence below means
    // something).
    assert!(events.contains("10.88.0.5/16"), "{events}");

    let link = &ns.json(&["link", "show", "eth0"])[0];
    assert_eq!(link["address"], NIC_MAC);
    assert_eq!(link["mtu"], 1400);
    assert!(
        link["flags"].as_array().unwrap().contains(&json!("UP")),
        "{link}"
    );
    assert!(!ns.ip(&["link"]).contains("nic0"), "renamed");
    assert_eq!(
        ns.addresses("eth0"),
        set(&["10.88.0.5/16", "fd00:88::5/64"])
    );
    assert_eq!(
        ns.routes("-4"),
        set(&[
            "default via 10.88.0.1 dev eth0 scope  proto static metric 0",
            "10.88.0.0/16 via  dev eth0 scope link proto kernel metric 0",
            "10.89.0.0/16 via  dev eth0 scope link proto static metric 0",
        ])
    );
    let v6 = ns.routes("-6");
    assert!(
        v6.contains("default via fd00:88::1 dev eth0 scope  proto static metric 1024"),
        "{v6:?}"
    );
    assert!(
        v6.contains("fd00:88::/64 via  dev eth0 scope  proto kernel metric 256"),
        "{v6:?}"
    );
    assert_eq!(
        ns.neighbors(),
        set(&[
            &format!("10.88.0.1 {PEER_MAC} eth0"),
            &format!("fd00:88::1 {PEER_MAC} eth0"),
        ])
    );

    // Again, the same: it succeeds and changes nothing at all.
    ns.settle("eth0");
    let before = ns.snapshot();
    let (again, events) = events_during(&ns, update(&a, &req)).await;
    again.expect("UpdateNetwork, again");
    assert_eq!(events, "", "the second call changed something");
    assert_eq!(ns.snapshot(), before);

    // Changed: the IPv6 address, routes and entry go, the link route and
    // the default route move, the gateway's MAC changes.
    let mut changed = pod_request();
    changed.interfaces[0].addresses.truncate(1);
    changed.routes = vec![
        route("0.0.0.0/0", "10.88.0.2", 0, 0),
        route("10.90.0.0/16", "10.88.0.1", 0, 50),
    ];
    changed.neighbors = vec![neighbor("10.88.0.1", OTHER_MAC)];
    update(&a, &changed).await.expect("UpdateNetwork, changed");
    assert_eq!(ns.addresses("eth0"), set(&["10.88.0.5/16"]));
    assert_eq!(
        ns.routes("-4"),
        set(&[
            "default via 10.88.0.2 dev eth0 scope  proto static metric 0",
            "10.88.0.0/16 via  dev eth0 scope link proto kernel metric 0",
            "10.90.0.0/16 via 10.88.0.1 dev eth0 scope  proto static metric 50",
        ])
    );
    let v6 = ns.routes("-6");
    assert!(
        !v6.iter()
            .any(|r| r.contains("default") || r.contains("fd00:88")),
        "{v6:?}"
    );
    assert_eq!(
        ns.neighbors(),
        set(&[&format!("10.88.0.1 {OTHER_MAC} eth0")])
    );
    // The link-local address the kernel gave eth0 is still there.
    assert!(ns
        .ip(&["-6", "addr", "show", "dev", "eth0"])
        .contains("fe80::"));
    // The peer, which no request names, is as the test left it.
    assert!(ns.addresses("peer0").is_empty());
    a.health().await;
}

#[tokio::test]
async fn update_network_refusals_change_nothing() {
    let Some((ns, a)) = pod().await else { return };
    ns.settle("eth0");
    let before = ns.snapshot();

    // A NIC the guest does not have: NOT_FOUND naming it and what there is,
    // and the NIC it does have is left as it was.
    let mut missing = pod_request();
    missing.interfaces[0].name = "eth1".into();
    missing.interfaces.push(pb::Interface {
        mac: OTHER_MAC.into(),
        name: "eth9".into(),
        up: true,
        ..Default::default()
    });
    missing.routes.clear();
    missing.neighbors.clear();
    let (code, msg) = status_of(&update(&a, &missing).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    assert!(
        msg.contains(OTHER_MAC) && msg.contains(&format!("eth0 {NIC_MAC}")),
        "{msg}"
    );

    // Malformed: INVALID_ARGUMENT naming the field, before anything moves
    // (the new MTU is not applied either).
    let mut bad = pod_request();
    bad.interfaces[0].mtu = 1300;
    bad.routes.push(route("10.91.0.0/16", "fd00:88::1", 0, 0));
    let (code, msg) = status_of(&update(&a, &bad).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("routes[3].gateway"), "{msg}");

    // Well-formed but refused by the kernel: INTERNAL naming the step.
    let mut unreachable = pod_request();
    unreachable
        .routes
        .push(route("10.92.0.0/16", "192.0.2.1", 0, 0));
    let (code, msg) = status_of(&update(&a, &unreachable).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INTERNAL, "{msg}");
    assert!(
        msg.starts_with("cannot add the route 10.92.0.0/16 via 192.0.2.1 dev eth0: ")
            && msg.contains("unreachable"),
        "{msg}"
    );
    assert!(!ns.ip(&["route"]).contains("10.92.0.0"));

    assert_eq!(ns.snapshot(), before);
    a.health().await;
}

#[tokio::test]
async fn containers_without_a_network_namespace_see_the_pods_nics() {
    let Some((_ns, a)) = pod().await else { return };
    let script = "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; \
                  grep -c eth0 /proc/net/dev";
    // No network namespace in the spec: the agent's, the pod's network.
    let mut shared = sh(&a, script);
    shared["linux"]["namespaces"] =
        json!([{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]);
    let (exit, out, err) = a.run_to_end("podnet", &shared).await;
    assert_eq!(exit.exit_status, 0, "{err}");
    assert_eq!(out, format!("{NIC_MAC}\n1400\n1\n"));
    // A network namespace of its own: none of the pod's NICs.
    let (exit, out, _) = a.run_to_end("ownnet", &sh(&a, "ls /sys/class/net")).await;
    assert_eq!(exit.exit_status, 0);
    assert_eq!(out, "lo\n");
}

#[tokio::test]
async fn two_nics_can_swap_names() {
    let Some(ns) = Netns::create() else { return };
    ns.add_nic("nic1", OTHER_MAC, "peer1", "02:00:00:5e:aa:04");
    let Some(a) = Agent::start_in_netns(&ns.path()).await else {
        return;
    };
    let nic = |mac: &str, name: &str| pb::Interface {
        mac: mac.into(),
        name: name.into(),
        up: true,
        ..Default::default()
    };
    let name_of = |mac: &str| {
        let links = ns.json(&["link"]);
        let link = links
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["address"] == mac);
        link.unwrap()["ifname"].as_str().unwrap().to_string()
    };
    for (first, second) in [("eth0", "eth1"), ("eth1", "eth0")] {
        let req = pb::UpdateNetworkRequest {
            interfaces: vec![nic(NIC_MAC, first), nic(OTHER_MAC, second)],
            ..Default::default()
        };
        update(&a, &req).await.expect("UpdateNetwork");
        assert_eq!(
            (name_of(NIC_MAC), name_of(OTHER_MAC)),
            (first.to_string(), second.to_string())
        );
    }
}
