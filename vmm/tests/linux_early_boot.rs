//! Boots the real guest `vmlinux` with our VMM and reads its early boot from
//! our own serial device. On a KVM that emulates kernel mode (this project's
//! machines) Linux gets through early boot slowly and then dies on an
//! instruction the emulator cannot run: the VMM must say so clearly, quote
//! the console, and not hang. On a capable KVM the kernel goes on, finds no
//! root filesystem, panics and reboots (`panic=-1 reboot=k`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nutshell_vmm::boot::linux::LinuxBoot;
use nutshell_vmm::probe::{probe_kvm, ProbeVerdict};
use nutshell_vmm::{BootSource, ExitReason, SerialOutput, VmConfig, Vmm};

mod common;
use common::{kvm_usable, require};

fn guest_kernel() -> PathBuf {
    std::env::var_os("NUTSHELL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/nutshell"))
        .join("vmlinux")
}

// `earlyprintk` shows what the kernel prints before its console driver
// registers. `clearcpuid=cx16,xsave` keeps SLUB off `cmpxchg16b` and the FPU
// code off `xrstor`, two instructions an emulating KVM cannot run, so that
// the boot gets as far as the console driver; it costs a capable host nothing
// that matters for this test.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 \
                       clearcpuid=cx16,xsave nutshell.test=early-boot";
const MEMORY_MIB: u64 = 256;
const LIMIT: Duration = Duration::from_secs(180);

/// PVH: `hvm_start_info`, its memory map, 32-bit protected-mode entry.
#[test]
fn real_kernel_early_boot_via_pvh() {
    early_boot(false);
}

/// The 64-bit boot protocol: zero page, e820 table, identity-mapped page
/// tables, GDT, long-mode entry.
#[test]
fn real_kernel_early_boot_via_64bit_boot_protocol() {
    early_boot(true);
}

fn early_boot(force_64bit_protocol: bool) {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let vmlinux = guest_kernel();
    if !require(
        vmlinux.is_file(),
        &format!(
            "{} is missing (guest-image/build.sh --install)",
            vmlinux.display()
        ),
    ) {
        return;
    }
    let capable = probe_kvm(Duration::from_secs(5)).unwrap() == ProbeVerdict::CanRunLinux;

    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("console.log");
    let mut config = VmConfig::new(BootSource::Linux(LinuxBoot {
        vmlinux,
        initrd: None,
        cmdline: CMDLINE.into(),
        force_64bit_protocol,
    }));
    config.memory_mib = MEMORY_MIB;
    // Two vCPUs with PVH: the MP table and CPUID topology must agree.
    config.vcpus = if force_64bit_protocol { 1 } else { 2 };
    config.serial = SerialOutput::File(serial.clone());
    config.timeout = Some(LIMIT);

    let started = Instant::now();
    let reason = Vmm::build(&config).unwrap().run();
    let took = started.elapsed();
    let console = std::fs::read_to_string(&serial).unwrap();
    eprintln!(
        "early boot (64-bit protocol: {force_64bit_protocol}): {} console lines in {took:.1?}; ended: {reason}",
        console.lines().count()
    );

    assert!(console.contains("Linux version "), "no banner:\n{console}");
    assert!(
        console.contains(&format!("Command line: {CMDLINE}")),
        "our command line is not echoed:\n{console}"
    );
    // The memory map we wrote: low RAM to the EBDA, then 1 MiB to the end.
    let top = (MEMORY_MIB << 20) - 1;
    for want in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        format!("BIOS-e820: [mem 0x0000000000100000-{top:#018x}] usable"),
    ] {
        assert!(console.contains(&want), "missing `{want}`:\n{console}");
    }
    assert!(console.contains("Hypervisor detected: KVM"), "{console}");
    assert!(console.contains("MPTABLE: OEM ID: NUTSHELL"), "{console}");
    let cpus = format!("smpboot: Allowing {} CPUs, 0 hotplug CPUs", config.vcpus);
    assert!(console.contains(&cpus), "missing `{cpus}`:\n{console}");
    assert!(console.contains("kvm-clock: "), "{console}");
    assert!(
        console.contains("printk: console [ttyS0] enabled"),
        "the serial console driver never registered:\n{console}"
    );

    match &reason {
        ExitReason::KvmInternalError {
            suberror,
            console_tail,
            ..
        } if !capable => {
            assert_eq!(*suberror, 1, "{reason}");
            let last = console.lines().last().unwrap().trim_end_matches('\r');
            assert_eq!(console_tail.last().map(String::as_str), Some(last));
            let msg = reason.to_string();
            assert!(msg.contains("KVM_EXIT_INTERNAL_ERROR"), "{msg}");
            assert!(msg.contains("suberror 1 (emulation failure)"), "{msg}");
            assert!(msg.contains(last), "{msg}");
            assert_eq!(reason.exit_code(), 4);
        }
        ExitReason::GuestReset if capable => {
            assert!(console.contains("Kernel panic"), "{console}");
        }
        other => panic!("unexpected end (capable KVM: {capable}): {other}"),
    }
    assert!(took < LIMIT, "the VM ran into the time limit");
}
