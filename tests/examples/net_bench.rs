//! Network benchmark of CRI pods (printed, not asserted), a nutshell pod
//! beside a runc pod in the same run, both on the CNI bridge of a test
//! containerd in a network namespace of its own (`start_net_test`):
//! - TCP throughput from the pod to the node: busybox `dd | nc` in the pod,
//!   a listener in the node's namespace counting bytes and time;
//! - round-trip latency, p50/p99, from the node to the pod: a 64-byte echo
//!   over one connection (busybox `nc -e cat`), and an HTTP GET to busybox
//!   `httpd` on a new connection each time.
//!
//! `cargo run -p nutshell-tests --example net_bench [MIB] [ROUND_TRIPS]`
//! (as root; `tools/bench/net.sh` builds the shim and runs it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use k8s_cri::v1::NamespaceMode;
use nutshell_tests::containerd::{test_nutshell_config, NUTSHELL_HANDLER};
use nutshell_tests::cri::{pod_config, Cri};
use nutshell_tests::netns::{http_get, start_net_test, NetTest, IO_TIMEOUT, NODE_IP};
use nutshell_tests::{host_summary, percentile_ms};

/// What the pod serves: httpd on port 80, and an echo on port 7.
const SERVE: &str = "mkdir -p /www && echo ok > /www/index.html && httpd -p 80 -h /www \
                     && exec nc -ll -p 7 -e cat";
const ECHO_PORT: u16 = 7;

/// One runtime's figures.
struct Figures {
    mib_per_s: f64,
    echo: Vec<Duration>,
    get: Vec<Duration>,
}

/// Accepts one connection on `listener` and reads `bytes` from it; the
/// rate from the first byte to the last, in MiB/s.
fn sink(listener: TcpListener, bytes: u64) -> std::io::Result<f64> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    let mut first = None;
    while got < bytes {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "the pod sent {got} of {bytes} bytes"
            )));
        }
        first.get_or_insert_with(Instant::now);
        got += n as u64;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(got as f64 / (1 << 20) as f64 / secs.max(1e-9))
}

/// `rounds` echoes of 64 bytes over one connection to `addr`.
fn echo_rounds(addr: SocketAddr, rounds: usize) -> std::io::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let msg = [b'x'; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(rounds);
    // The first rounds warm up the path (ARP, the guest's caches).
    for i in 0..rounds + 5 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= 5 {
            times.push(t.elapsed());
        }
    }
    Ok(times)
}

/// `rounds` GETs of `addr`, a new connection each.
fn get_rounds(addr: SocketAddr, rounds: usize) -> std::io::Result<Vec<Duration>> {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            http_get(addr).map(|_| t.elapsed())
        })
        .collect()
}

/// Calls `f` in the node's namespace until it succeeds (the pod's servers
/// may not listen yet), for up to 60 s.
fn retrying<T>(
    t: &NetTest,
    f: impl Fn() -> std::io::Result<T> + Send + Sync,
) -> Result<T, Box<dyn std::error::Error>>
where
    T: Send,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match t.netns.run(&f)? {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

async fn measure(
    t: &NetTest,
    handler: &str,
    mib: u64,
    rounds: usize,
) -> Result<Figures, Box<dyn std::error::Error>> {
    let mut cri = Cri::connect(&t.c).await;
    let config = pod_config(
        &format!("bench-{handler}"),
        &t.pod_logs(),
        NamespaceMode::Pod,
    );
    let pod = cri.run_pod(&config, handler).await;
    let ip = cri.pod_ip(&pod).await;
    let container = cri
        .start_container(&pod, &config, "servers", &["sh", "-c", SERVE], Vec::new())
        .await;

    let echo = retrying(t, || {
        echo_rounds(
            format!("{ip}:{ECHO_PORT}").parse().expect("an address"),
            rounds,
        )
    })?;
    let get = retrying(t, || {
        get_rounds(format!("{ip}:80").parse().expect("an address"), rounds)
    })?;

    let listener = t.netns.run(|| TcpListener::bind("0.0.0.0:0"))??;
    let port = listener.local_addr()?.port();
    let bytes = mib << 20;
    let receiver = std::thread::spawn(move || sink(listener, bytes));
    let send = format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {NODE_IP} {port}",
        bytes >> 16
    );
    let sent = cri.exec(&container, &send).await;
    let mib_per_s = receiver
        .join()
        .map_err(|_| "the receiver panicked")?
        .map_err(|e| {
            format!(
                "{e}; the pod said: {}",
                String::from_utf8_lossy(&sent.stderr)
            )
        })?;

    cri.remove_pod(&pod, &[container]).await;
    Ok(Figures {
        mib_per_s,
        echo,
        get,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let Some(t) = start_net_test(&test_nutshell_config("")) else {
        return Err("a prerequisite is missing (see SKIP above)".into());
    };
    println!(
        "host: {}; nutshell pods: QEMU/TCG, the tests' config (256 MiB)",
        host_summary()
    );
    println!("pod -> node: {mib} MiB with dd | nc; node -> pod: {rounds} round trips each\n");
    let mut figures = Vec::new();
    for handler in ["runc", NUTSHELL_HANDLER] {
        let mut f = measure(&t, handler, mib, rounds).await?;
        let echo = [50, 99].map(|p| percentile_ms(&mut f.echo, p));
        let get = [50, 99].map(|p| percentile_ms(&mut f.get, p));
        println!(
            "{handler:>9}: pod -> node {:7.1} MiB/s; echo RTT p50 {:6.2} ms, p99 {:6.2} ms; \
             GET p50 {:6.2} ms, p99 {:6.2} ms",
            f.mib_per_s, echo[0], echo[1], get[0], get[1]
        );
        figures.push((f.mib_per_s, echo, get));
    }
    let [(runc_rate, runc_echo, runc_get), (ns_rate, ns_echo, ns_get)] = figures[..] else {
        return Err("two runtimes measured".into());
    };
    println!("\nREADME rows:");
    println!(
        "| pod → node TCP throughput (busybox `dd \\| nc`, {mib} MiB): nutshell (QEMU/TCG) vs runc, \
         same run | — | {ns_rate:.1} vs {runc_rate:.1} MiB/s | `tools/bench/net.sh` |"
    );
    println!(
        "| node → pod round trip, p50 / p99 over {rounds}: 64-byte echo on one connection; \
         HTTP GET to busybox httpd, new connection each: nutshell (QEMU/TCG) vs runc | — | \
         echo {:.2} / {:.2} vs {:.2} / {:.2} ms; GET {:.2} / {:.2} vs {:.2} / {:.2} ms | \
         `tools/bench/net.sh` |",
        ns_echo[0],
        ns_echo[1],
        runc_echo[0],
        runc_echo[1],
        ns_get[0],
        ns_get[1],
        runc_get[0],
        runc_get[1]
    );
    Ok(())
}
