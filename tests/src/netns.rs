//! Network namespaces for network tests, so that test traffic never touches
//! the machine's own network (docs: environment.md, "Network tests").
//!
//! A [`TestNetns`] is either one the test made (`ip netns add`, `lo` up,
//! deleted when dropped) or a hold on an existing one, such as a CRI pod's,
//! that keeps it alive after its owner removes it and deletes nothing. Code
//! runs inside it on a thread of its own ([`TestNetns::run`]): a socket made
//! there stays in the namespace wherever it is used afterwards, and a
//! command spawned there starts in it.
//!
//! The CNI network of a test containerd ([`bridge_conflist`]) lives in the
//! namespace that containerd runs in: its bridge, and the host ends of the
//! pods' veths, with [`NODE_IP`] on the bridge. [`start_net_test`] sets up
//! both for a test, and its [`NetTest`] removes what a failed test left.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::MutexGuard;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::containerd::{self, begin_test, Containerd, Footprint, CRI_NAMESPACE};
use crate::{run_ok, which};

/// The pods' subnet on the test bridge.
pub const POD_SUBNET: &str = "10.213.0.0/24";
/// The node's address on the test bridge: the pods' gateway.
pub const NODE_IP: &str = "10.213.0.1";
/// The test bridge's name (in the test's own namespace, so it clashes with
/// nothing).
pub const BRIDGE: &str = "nutshell-br0";

/// Where containerd looks for CNI plugins (`bin_dir` of
/// tools/lib/containerd-config.toml): Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// What a network test needs beyond a containerd test, or the first thing
/// missing: `ip`, `tc` and `nsenter`, the CNI plugins the network uses, and
/// `iptables`, which portmap runs (containernetworking-plugins depends on
/// it).
pub fn prerequisites() -> Result<(), String> {
    for prog in ["ip", "tc", "nsenter", "iptables"] {
        if which(prog).is_none() {
            return Err(format!("needs {prog} on PATH"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        let p = Path::new(CNI_BIN_DIR).join(plugin);
        if !p.is_file() {
            return Err(format!(
                "needs the CNI plugin {} (containernetworking-plugins)",
                p.display()
            ));
        }
    }
    Ok(())
}

/// A network namespace a test made or holds.
pub struct TestNetns {
    /// Set when the test made it: its name under `/run/netns`.
    name: Option<String>,
    file: File,
}

impl TestNetns {
    /// Makes `nutshell-t-<pid>-<n>` (`ip netns add`) and sets its `lo` up.
    pub fn create() -> io::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nutshell-t-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let file = match File::open(Path::new("/run/netns").join(&name)) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "delete", &name]).status();
                return Err(e);
            }
        };
        let ns = Self {
            name: Some(name),
            file,
        };
        ns.output("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Holds the namespace at `path` (e.g. a CRI pod's): it lives on while
    /// this does, even once its owner removed it. Dropping this deletes
    /// nothing.
    pub fn hold(path: &Path) -> io::Result<Self> {
        Ok(Self {
            name: None,
            file: File::open(path)?,
        })
    }

    /// A path naming the namespace, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        match &self.name {
            Some(name) => Path::new("/run/netns").join(name),
            None => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.file.as_raw_fd()
            )),
        }
    }

    /// Runs `f` on a thread that entered the namespace, and returns what it
    /// returns (a panic in `f` goes on in the caller).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `program args…` in the namespace, returns its stdout.
    pub fn output(&self, program: &str, args: &[&str]) -> io::Result<String> {
        self.run(|| run_ok(Command::new(program).args(args)))?
    }

    /// The names of the namespace's network interfaces (`ip -o link`),
    /// sorted.
    pub fn links(&self) -> io::Result<Vec<String>> {
        let out = self.output("ip", &["-o", "link", "show"])?;
        let mut names: Vec<String> = out
            .lines()
            // "2: eth0@if7: <…": the name, without the peer's index.
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect();
        names.sort();
        Ok(names)
    }

    /// What `tc` shows of `dev`'s qdiscs and ingress filters, or `None`
    /// when `dev` has neither beyond the kernel's default qdisc: so nothing
    /// a runtime added.
    pub fn tc_state(&self, dev: &str) -> io::Result<Option<String>> {
        let qdiscs = self.output("tc", &["qdisc", "show", "dev", dev])?;
        let filters = self.output("tc", &["filter", "show", "dev", dev, "ingress"])?;
        // A veth's default is `noqueue`, a tap's `pfifo_fast` or `fq_codel`:
        // an `ingress` or `clsact` qdisc, or any filter, is someone's.
        let added = qdiscs
            .lines()
            .any(|l| l.contains("qdisc ingress") || l.contains("qdisc clsact"))
            || !filters.trim().is_empty();
        Ok(added.then(|| format!("{qdiscs}{filters}")))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// The CNI network of a test containerd: a bridge [`BRIDGE`] whose address
/// [`NODE_IP`] is the pods' gateway, no masquerading, hairpin on, host-local
/// addresses from [`POD_SUBNET`] kept in `ipam_dir` (not the machine's
/// `/var/lib/cni`), and portmap for host ports. containerd adds loopback
/// itself.
pub fn bridge_conflist(ipam_dir: &Path) -> String {
    bridge_network_conflist("nutshell-test", BRIDGE, POD_SUBNET, NODE_IP, ipam_dir)
}

/// A CNI network `name`: a bridge `bridge` whose address `gateway` is its
/// members' gateway, no masquerading, hairpin on, host-local addresses from
/// `subnet` kept in `ipam_dir`, and portmap for host ports.
pub fn bridge_network_conflist(
    name: &str,
    bridge: &str,
    subnet: &str,
    gateway: &str,
    ipam_dir: &Path,
) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{name}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{}",
        "ranges": [[{{ "subnet": "{subnet}", "gateway": "{gateway}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
        ipam_dir.display()
    )
}

/// How long a test's TCP exchange may take before it fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /` over HTTP/1.0 from `addr`; the response body when the status is
/// 200. Run it inside the namespace that reaches `addr`.
pub fn http_get(addr: SocketAddr) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {resp:?}")))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("{addr} answered {head:?}")));
    }
    Ok(body.to_string())
}

/// Serves `body` to the next `requests` HTTP requests on `listener`, on a
/// thread; the thread returns how many it served.
pub fn serve_http(listener: TcpListener, body: String, requests: usize) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut served = 0;
        for conn in listener.incoming().take(requests) {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).is_ok() {
                served += 1;
            }
            let _ = s.shutdown(Shutdown::Both);
        }
        served
    })
}

/// An end-to-end network test: a private containerd in a network namespace
/// of the test's own, with a CNI bridge there ([`Containerd::start_in_netns`]).
/// Fields drop in order: containerd, then the namespace, then the lock.
pub struct NetTest {
    /// The containerd, running in [`Self::netns`].
    pub c: Containerd,
    /// The "node": the namespace holding containerd, the bridge and the
    /// host ends of the pods' veths.
    pub netns: TestNetns,
    /// The host's nutshell footprint before the test.
    pub before: Footprint,
    _guard: MutexGuard<'static, ()>,
}

/// [`start_test`](crate::containerd::start_test) for a network test: also
/// needs what the CNI network needs, and starts containerd in a fresh
/// [`TestNetns`].
pub fn start_net_test(nutshell_config: &str) -> Option<NetTest> {
    let (guard, before) = begin_test(containerd::prerequisites().and_then(|()| prerequisites()))?;
    let netns = TestNetns::create().expect("ip netns add");
    let c = Containerd::start_in_netns(nutshell_config, &netns).expect("private containerd starts");
    Some(NetTest {
        c,
        netns,
        before,
        _guard: guard,
    })
}

impl NetTest {
    /// The directory for the pods' container logs (made on first use).
    pub fn pod_logs(&self) -> PathBuf {
        let dir = self.c.dir().join("pod-logs");
        std::fs::create_dir_all(&dir).expect("the pod log directory can be made");
        dir
    }
}

impl Drop for NetTest {
    /// A test that failed midway left its pods to containerd's clean-up,
    /// which knows nothing of CRI: the pods' namespaces that CRI made
    /// (`/run/netns/cni-*`, named in their containers' specs) are deleted
    /// here. Their veths and portmap rules go with them and with the
    /// node's namespace.
    fn drop(&mut self) {
        let ids = self
            .c
            .ctr_in(CRI_NAMESPACE, &["containers", "list", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut paths: Vec<PathBuf> = ids
            .split_whitespace()
            .filter_map(|id| {
                let info = self
                    .c
                    .ctr_in(CRI_NAMESPACE, &["containers", "info", id])
                    .output()
                    .ok()?;
                let info: serde_json::Value = serde_json::from_slice(&info.stdout).ok()?;
                spec_netns(&info["Spec"])
            })
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("cni-"))
                    && p.exists()
            })
            .collect();
        paths.sort();
        paths.dedup();
        for p in paths {
            if let Some(name) = p.file_name() {
                let _ = Command::new("ip")
                    .args(["netns", "delete"])
                    .arg(name)
                    .status();
            }
        }
    }
}

/// The network namespace path an OCI runtime spec (as JSON) names, if any.
pub fn spec_netns(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{is_root, require};

    #[test]
    fn a_test_namespace_has_only_loopback_and_goes_when_dropped() {
        if !require(
            is_root() && which("ip").is_some(),
            "needs root and ip (iproute2)",
        ) {
            return;
        }
        let ns = TestNetns::create().expect("ip netns add");
        let path = ns.path();
        assert!(path.exists());
        assert_eq!(ns.links().unwrap(), vec!["lo".to_string()]);
        assert_eq!(ns.tc_state("lo").unwrap(), None);
        // A server and a client inside it meet on its loopback only.
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve_http(listener, "inside".into(), 1);
        assert_eq!(ns.run(|| http_get(addr)).unwrap().unwrap(), "inside");
        assert_eq!(server.join().unwrap(), 1);
        // A hold on it deletes nothing; dropping the maker does.
        drop(TestNetns::hold(&path).unwrap());
        assert!(path.exists());
        drop(ns);
        assert!(!path.exists());
    }

    #[test]
    fn the_conflist_is_json_naming_the_bridge_and_the_private_ipam_dir() {
        let text = bridge_conflist(Path::new("/run/x/ipam"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["bridge"], BRIDGE);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["dataDir"], "/run/x/ipam");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["gateway"], NODE_IP);
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }
}
