//! Boots the installed guest N times through the runtime (QEMU or
//! nutshell-vmm, hybrid-vsock agent client) and prints boot-to-agent-ready
//! times, guest memory in use at agent-ready, and host RSS/PSS of the VM's
//! processes. `tools/bench/boot.sh` runs it.
//!
//!   boot-bench [--backend qemu|vmm] [--boots N] [--accel tcg|kvm|auto]
//!              [--memory MIB] [--shared] [--guest-dir DIR]
//!
//! The accelerator defaults to TCG for QEMU and is KVM for nutshell-vmm.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nutshell_runtime::agent::DialOptions;
use nutshell_runtime::hypervisor::nutshell_vmm::VmmHypervisor;
use nutshell_runtime::hypervisor::qemu::QemuHypervisor;
use nutshell_runtime::hypervisor::{
    pss_by_cause, Accel, Cause, Hypervisor, HypervisorError, VmConfig, GUEST_ASSETS_DIR,
};
use nutshell_runtime::sandbox::Sandbox;

struct Args {
    vmm: bool,
    boots: usize,
    accel: Option<Accel>,
    memory_mib: u32,
    shared: bool,
    guest_dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        vmm: false,
        boots: 10,
        accel: None,
        memory_mib: 256,
        shared: false,
        guest_dir: PathBuf::from(GUEST_ASSETS_DIR),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => {
                a.vmm = match value()?.as_str() {
                    "qemu" => false,
                    "vmm" => true,
                    other => return Err(format!("--backend: {other} is not qemu or vmm")),
                }
            }
            "--boots" => a.boots = value()?.parse().map_err(|e| format!("--boots: {e}"))?,
            "--accel" => a.accel = Some(value()?.parse().map_err(|e| format!("--accel: {e}"))?),
            "--memory" => a.memory_mib = value()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--shared" => a.shared = true,
            "--guest-dir" => a.guest_dir = value()?.into(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.boots == 0 {
        return Err("--boots must be at least 1".into());
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, unit: &str, v: Vec<f64>) {
    // A boot whose guest or process tree could not be read has no figure.
    let mut v: Vec<f64> = v
        .into_iter()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if v.is_empty() {
        println!("{name:<34} no figures");
        return;
    }
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<34} p50 {:>8.2} {unit}  p90 {:>8.2}  min {:>8.2}  max {:>8.2}  (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("boot-bench: {e}");
            std::process::exit(2);
        }
    };
    let hv: Result<Box<dyn Hypervisor>, HypervisorError> = if args.vmm {
        VmmHypervisor::discover().map(|h| Box::new(h) as _)
    } else {
        QemuHypervisor::discover().map(|h| Box::new(h) as _)
    };
    let accel = args
        .accel
        .unwrap_or(if args.vmm { Accel::Kvm } else { Accel::Tcg });
    let hv = match hv {
        Ok(hv) => hv,
        Err(e) => {
            eprintln!("boot-bench: {e}");
            std::process::exit(1);
        }
    };
    let tmp = std::env::temp_dir().join(format!("nutshell-boot-bench-{}", std::process::id()));
    let shared = tmp.join("shared");
    if let Err(e) = std::fs::create_dir_all(&shared) {
        eprintln!("boot-bench: creating {}: {e}", shared.display());
        std::process::exit(1);
    }
    let dial = DialOptions {
        deadline: Duration::from_secs(60),
        ..DialOptions::default()
    };
    let (mut ready, mut down, mut guest_used, mut rss, mut pss) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut failed = 0;
    // Of the last boot that came up: PSS by process and cause.
    let mut last_by_cause: Vec<(String, Vec<(Cause, u64)>)> = Vec::new();
    for i in 0..args.boots {
        let id = format!("bench-{i}");
        let mut config = VmConfig::new(&id, tmp.join(&id));
        config.accel = accel;
        config.memory_mib = args.memory_mib;
        config.kernel = args.guest_dir.join("vmlinux");
        config.initrd = args.guest_dir.join("initramfs.cpio.gz");
        config.shared_dir = args.shared.then(|| shared.clone());
        let t = Instant::now();
        let sandbox = match Sandbox::start(hv.as_ref(), &config, &dial).await {
            Ok(s) => s,
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                // Counted and reported, not fatal: one flaky boot must not
                // throw away the others' figures.
                println!("boot {i:>2}: FAILED: {msg}");
                failed += 1;
                continue;
            }
        };
        let ready_s = t.elapsed().as_secs_f64();
        let details = sandbox.agent().guest_details().await;
        let mem = sandbox.vm().host_memory();
        let guest_bytes = u64::from(args.memory_mib) << 20;
        last_by_cause = sandbox
            .vm()
            .processes()
            .iter()
            .map(|(role, pid)| {
                let by = pss_by_cause(&[*pid], guest_bytes).unwrap_or_default();
                (role.to_string(), by)
            })
            .collect();
        let t = Instant::now();
        let exit = sandbox.shutdown(Duration::from_secs(10)).await;
        let down_s = t.elapsed().as_secs_f64();
        let used = details
            .as_ref()
            .map(|d| (d.mem_total_bytes - d.mem_available_bytes) as f64 / 1048576.0)
            .unwrap_or(f64::NAN);
        let (r, p) = mem
            .map(|m| (m.rss_kib as f64 / 1024.0, m.pss_kib as f64 / 1024.0))
            .unwrap_or((f64::NAN, f64::NAN));
        println!(
            "boot {i:>2}: agent ready {ready_s:.3} s, guest used {used:.1} MiB, host RSS {r:.1} MiB PSS {p:.1} MiB, shutdown {down_s:.3} s ({})",
            if exit.is_clean_poweroff() { "clean power-off".to_string() } else { exit.to_string() }
        );
        ready.push(ready_s);
        down.push(down_s);
        guest_used.push(used);
        rss.push(r);
        pss.push(p);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if failed == args.boots {
        eprintln!("boot-bench: every boot failed");
        std::process::exit(1);
    }
    println!();
    summary("boot to agent-ready (wall)", "s  ", ready);
    summary("guest memory in use at ready", "MiB", guest_used);
    summary("host RSS of the VM process tree", "MiB", rss);
    summary("host PSS of the VM process tree", "MiB", pss);
    summary("shutdown (DestroySandbox to reaped)", "s  ", down);
    println!("host PSS by process and cause, last boot (MiB):");
    for (role, by) in &last_by_cause {
        let parts: Vec<String> = by
            .iter()
            .map(|(c, kib)| format!("{} {:.1}", c.label(), *kib as f64 / 1024.0))
            .collect();
        let total: u64 = by.iter().map(|(_, k)| k).sum();
        println!(
            "  {role:<22} {:>6.1}: {}",
            total as f64 / 1024.0,
            parts.join(", ")
        );
    }
    println!("failed boots: {failed} of {}", args.boots);
}
