//! `nutshell-vmm`: boots one microVM and exits with a status that says why
//! it ended (see the crate README for the table).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use nutshell_vmm::arch::regs::EntryMode;
use nutshell_vmm::boot::linux::LinuxBoot;
use nutshell_vmm::exit::EXIT_SETUP_ERROR;
use nutshell_vmm::probe::{probe_kvm, ProbeVerdict};
use nutshell_vmm::{BootSource, SerialOutput, TapSource, VirtioDeviceConfig, VmConfig, Vmm};

/// Boot a Linux microVM on KVM.
#[derive(Parser, Debug)]
#[command(name = "nutshell-vmm", version)]
struct Args {
    /// The whole VM as a JSON file (see the README); other VM flags are
    /// then not allowed.
    #[arg(long, conflicts_with_all = ["kernel", "payload", "initrd", "block", "vsock", "rng", "fs", "net", "api_socket", "timeout_ms"])]
    config: Option<PathBuf>,
    /// Uncompressed ELF kernel (vmlinux).
    #[arg(long, required_unless_present_any = ["probe", "payload", "config"])]
    kernel: Option<PathBuf>,
    /// initramfs (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended to it).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// vCPU count.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Serial console: `stdout`, `none` or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Feed stdin to the serial console (e.g. with `rdinit=/bin/sh`).
    #[arg(long)]
    stdin_console: bool,
    /// Use the Linux 64-bit boot protocol even if the kernel supports PVH.
    #[arg(long)]
    no_pvh: bool,
    /// A raw disk image as virtio-blk; append `,ro` for read-only.
    #[arg(long)]
    block: Vec<String>,
    /// Hybrid vsock: `<guest-cid>,<uds-path>`.
    #[arg(long)]
    vsock: Option<String>,
    /// Attach a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// A shared directory (virtio-fs): `<tag>,<socket>`, the tag the guest
    /// mounts (1 to 36 bytes) and the vhost-user socket of the `virtiofsd`
    /// serving it (which must already listen). Repeatable.
    #[arg(long, value_name = "TAG,SOCKET")]
    fs: Vec<String>,
    /// A network card (virtio-net) on a host tap: `<tap>[,mac=<mac>]`. The
    /// tap is attached to if it exists (made by the runtime or a CNI
    /// plugin), created otherwise (needs CAP_NET_ADMIN); the VMM sets no
    /// address and no link state. `fd=<n>` instead takes a tap fd the
    /// parent passed down (the runtime opens the pod's taps in the pod's
    /// network namespace). Without `mac=` the guest gets a random locally
    /// administered address. Repeatable.
    #[arg(long, value_name = "TAP|fd=N[,mac=MAC]")]
    net: Vec<String>,
    /// Control API socket (state, pause, resume, shutdown).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// End the VM after this many milliseconds (exit status 7).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Run raw 64-bit user-mode (CPL3, IOPL 3) machine code loaded at 1 MiB
    /// instead of a kernel (tests and benchmarks).
    #[arg(long, conflicts_with = "kernel")]
    payload: Option<PathBuf>,
    /// Keep capabilities and run without the seccomp filter (debugging).
    #[arg(long)]
    no_seccomp: bool,
    /// Print on stderr how long after process start the first KVM_RUN came.
    #[arg(long)]
    print_timing: bool,
    /// Only run the KVM capability probe and print its verdict (exit 0: can
    /// run Linux, 10: cannot, 1: probe failed).
    #[arg(long)]
    probe: bool,
}

/// The JSON config file: the same settings as the flags.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    payload: Option<PathBuf>,
    memory_mib: Option<u64>,
    vcpus: Option<u8>,
    serial: Option<String>,
    #[serde(default)]
    block: Vec<FileBlock>,
    vsock: Option<FileVsock>,
    #[serde(default)]
    rng: bool,
    #[serde(default)]
    fs: Vec<FileFs>,
    #[serde(default)]
    net: Vec<FileNet>,
    api_socket: Option<PathBuf>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    no_pvh: bool,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileBlock {
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileVsock {
    guest_cid: u32,
    uds_path: PathBuf,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileFs {
    tag: String,
    socket: PathBuf,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileNet {
    tap: String,
    mac: Option<String>,
}

/// Folds a JSON config into the flags, so one code path builds the VM.
fn apply_file(args: &mut Args, path: &PathBuf) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: FileConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    args.kernel = f.kernel;
    args.initrd = f.initrd;
    if let Some(c) = f.cmdline {
        args.cmdline = c;
    }
    args.payload = f.payload;
    if let Some(m) = f.memory_mib {
        args.memory_mib = m;
    }
    if let Some(v) = f.vcpus {
        args.vcpus = v;
    }
    if let Some(s) = f.serial {
        args.serial = s;
    }
    args.block = f
        .block
        .into_iter()
        .map(|b| {
            let p = b.path.display().to_string();
            if b.read_only {
                format!("{p},ro")
            } else {
                p
            }
        })
        .collect();
    args.vsock = f
        .vsock
        .map(|v| format!("{},{}", v.guest_cid, v.uds_path.display()));
    args.rng = f.rng;
    args.fs =
        f.fs.into_iter()
            .map(|d| format!("{},{}", d.tag, d.socket.display()))
            .collect();
    args.net = f
        .net
        .into_iter()
        .map(|n| match n.mac {
            Some(m) => format!("{},mac={m}", n.tap),
            None => n.tap,
        })
        .collect();
    args.api_socket = f.api_socket;
    args.timeout_ms = f.timeout_ms;
    args.no_pvh = f.no_pvh;
    if args.kernel.is_none() && args.payload.is_none() {
        bail!("{}: needs \"kernel\" or \"payload\"", path.display());
    }
    Ok(())
}

fn boot_source(args: &Args) -> anyhow::Result<BootSource> {
    if let Some(p) = &args.payload {
        let code = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        return Ok(BootSource::Payload {
            code,
            load_addr: 0x10_0000,
            mode: EntryMode::Long64User,
        });
    }
    let Some(kernel) = args.kernel.clone() else {
        bail!("--kernel is required");
    };
    Ok(BootSource::Linux(LinuxBoot {
        vmlinux: kernel,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        force_64bit_protocol: args.no_pvh,
    }))
}

fn config_from(args: &Args) -> anyhow::Result<VmConfig> {
    let mut devices = Vec::new();
    for b in &args.block {
        let (path, read_only) = match b.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (b.as_str(), false),
        };
        devices.push(VirtioDeviceConfig::Block {
            path: path.into(),
            read_only,
        });
    }
    if let Some(v) = &args.vsock {
        let (cid, uds) = v
            .split_once(',')
            .context("--vsock wants <guest-cid>,<uds-path>")?;
        devices.push(VirtioDeviceConfig::Vsock {
            guest_cid: cid.parse().context("--vsock guest cid")?,
            uds_path: uds.into(),
        });
    }
    if args.rng {
        devices.push(VirtioDeviceConfig::Rng);
    }
    for f in &args.fs {
        let (tag, socket) = f
            .split_once(',')
            .with_context(|| format!("--fs wants <tag>,<socket>, got {f:?}"))?;
        nutshell_vmm::devices::virtio::fs::tag_field(tag)?;
        devices.push(VirtioDeviceConfig::Fs {
            tag: tag.to_string(),
            socket: socket.into(),
        });
    }
    for n in &args.net {
        devices.push(parse_net(n)?);
    }
    let mut config = VmConfig::new(boot_source(args)?);
    config.memory_mib = args.memory_mib;
    config.vcpus = args.vcpus;
    config.serial = match args.serial.as_str() {
        "stdout" => SerialOutput::Stdout,
        "none" => SerialOutput::Discard,
        path => SerialOutput::File(path.into()),
    };
    config.devices = devices;
    config.serial_stdin = args.stdin_console;
    config.timeout = args.timeout_ms.map(Duration::from_millis);
    config.api_socket = args.api_socket.clone();
    config.harden = !args.no_seccomp;
    Ok(config)
}

/// `<tap>[,mac=<mac>]` or `fd=<n>[,mac=<mac>]`.
fn parse_net(s: &str) -> anyhow::Result<VirtioDeviceConfig> {
    let mut parts = s.split(',');
    let first = parts.next().unwrap_or_default();
    let tap = match first.strip_prefix("fd=") {
        Some(n) => match n.parse::<i32>() {
            Ok(fd) if fd > 2 => TapSource::Fd(fd),
            _ => bail!("--net fd= wants an inherited fd number above 2, got {n:?}"),
        },
        None => {
            nutshell_vmm::devices::virtio::net::tap::check_name(first)?;
            TapSource::Name(first.to_string())
        }
    };
    let mut mac = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) => mac = Some(m.parse()?),
            _ => bail!("--net wants <tap>[,mac=<mac>] or fd=<n>[,mac=<mac>], got {s:?}"),
        }
    }
    Ok(VirtioDeviceConfig::Net { tap, mac })
}

fn main() -> ExitCode {
    nutshell_vmm::timing::mark_process_start();
    let args = Args::parse();
    nutshell_vmm::timing::set_report_first_run(args.print_timing);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NUTSHELL_VMM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();

    if args.probe {
        return match probe_kvm(Duration::from_secs(5)) {
            Ok(ProbeVerdict::CanRunLinux) => {
                println!("KVM can run a Linux guest: the CPL0 int3 handler was reached");
                ExitCode::SUCCESS
            }
            Ok(ProbeVerdict::CannotRunLinux { detail }) => {
                println!("KVM cannot run a Linux guest: {detail}");
                ExitCode::from(10)
            }
            Err(e) => {
                eprintln!("nutshell-vmm: {:#}", anyhow::Error::from(e));
                ExitCode::from(EXIT_SETUP_ERROR as u8)
            }
        };
    }

    let mut args = args;
    if let Some(path) = args.config.clone() {
        if let Err(e) = apply_file(&mut args, &path) {
            eprintln!("nutshell-vmm: {e:#}");
            return ExitCode::from(EXIT_SETUP_ERROR as u8);
        }
    }
    let vmm = config_from(&args).and_then(|c| Vmm::build(&c).map_err(anyhow::Error::from));
    let vmm = match vmm {
        Ok(v) => v,
        Err(e) => {
            eprintln!("nutshell-vmm: {e:#}");
            return ExitCode::from(EXIT_SETUP_ERROR as u8);
        }
    };
    let reason = vmm.run();
    if reason.is_guest_stop() {
        eprintln!("nutshell-vmm: {reason}");
    } else {
        eprintln!("nutshell-vmm: the VM ended: {reason}");
        // Once more as the last line: a supervisor that keeps only the tail
        // of our stderr (the runtime does) sees why, not console lines.
        if reason.headline() != reason.to_string() {
            eprintln!(
                "nutshell-vmm: exit status {}: {}",
                reason.exit_code(),
                reason.headline()
            );
        }
    }
    nutshell_vmm::timing::report("VM torn down");
    ExitCode::from(reason.exit_code() as u8)
}
