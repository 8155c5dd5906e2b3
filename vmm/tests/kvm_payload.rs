//! Runs tiny guest payloads on the real /dev/kvm: 64-bit code at CPL3 (which
//! even an emulating nested KVM runs natively) writes to the serial port and
//! to an MMIO register, then resets through the i8042. This proves memory
//! slots, PIO and MMIO exits, the serial device, the irqchip and the event
//! loop's exit path.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nutshell_vmm::arch::regs::EntryMode;
use nutshell_vmm::devices::bus::BusDevice;
use nutshell_vmm::{BootSource, ExitReason, SerialOutput, VmConfig, Vmm};

mod common;
use common::payload::{Asm, MMIO_BASE};
use common::{kvm_usable, require};

const MMIO_ADDR: u64 = MMIO_BASE as u64;

#[derive(Default)]
struct MmioRecorder(Vec<(u64, Vec<u8>)>);
impl BusDevice for MmioRecorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.push((offset, data.to_vec()));
    }
}

/// `out 0x3f8` each byte of `msg`, store 0x0f to MMIO_ADDR+0x70, reset.
fn payload(msg: &[u8]) -> Vec<u8> {
    let mut c = Asm::new();
    c.serial();
    for &b in msg {
        c.print_byte(b);
    }
    let addr = (MMIO_ADDR + 0x70) as u32;
    c.raw(&[0xb8]).raw(&addr.to_le_bytes()); // mov eax, imm32
    c.raw(&[0xc7, 0x00, 0x0f, 0x00, 0x00, 0x00]); // mov dword [rax], 0xf
    c.reset_vm();
    c.code()
}

fn config(code: Vec<u8>, serial: &Path) -> VmConfig {
    let mut c = VmConfig::new(BootSource::Payload {
        code,
        load_addr: 0x10_0000,
        mode: EntryMode::Long64User,
    });
    c.memory_mib = 16;
    c.serial = SerialOutput::File(serial.into());
    c.timeout = Some(Duration::from_secs(20));
    c
}

#[test]
fn cpl3_payload_reaches_serial_mmio_and_reset() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let rec = Arc::new(Mutex::new(MmioRecorder::default()));
    let vmm = Vmm::build_with(
        &config(payload(b"hello from CPL3\n"), &serial),
        vec![(MMIO_ADDR, 0x1000, rec.clone())],
    )
    .unwrap();
    let control = vmm.control();
    let reason = vmm.run();
    assert_eq!(reason, ExitReason::GuestReset, "{reason}");
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        "hello from CPL3\n"
    );
    assert_eq!(control.console_lines(), vec!["hello from CPL3".to_string()]);
    assert_eq!(rec.lock().unwrap().0, vec![(0x70, vec![0x0f, 0, 0, 0])]);
}

#[test]
fn a_spinning_guest_is_stopped_by_the_time_limit() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(vec![0xeb, 0xfe], &dir.path().join("s.log"));
    c.timeout = Some(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let reason = Vmm::build(&c).unwrap().run();
    assert_eq!(reason, ExitReason::Timeout(Duration::from_millis(300)));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn shutdown_from_another_thread_ends_a_spinning_guest() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::build(&config(vec![0xeb, 0xfe], &dir.path().join("s.log"))).unwrap();
    let control = vmm.control();
    let t = std::thread::spawn(move || vmm.run());
    std::thread::sleep(Duration::from_millis(100));
    control.pause();
    assert_eq!(control.state(), nutshell_vmm::vmm::VmState::Paused);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while control.parked_vcpus() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPU never parked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    control.resume();
    control.shutdown();
    assert_eq!(t.join().unwrap(), ExitReason::HostShutdown);
}

/// The probe's verdict must match what the host's KVM module says it is: the
/// pagetable-based nested `kvm_pvm` emulates CPL0 and cannot run Linux;
/// hardware-assisted `kvm_intel`/`kvm_amd` (without pvm) can.
#[test]
fn probe_verdict_matches_the_kvm_module() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let started = std::time::Instant::now();
    let v = nutshell_vmm::probe::probe_kvm(Duration::from_secs(5)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match v {
        nutshell_vmm::probe::ProbeVerdict::CanRunLinux => assert!(!pvm, "kvm_pvm said it can"),
        nutshell_vmm::probe::ProbeVerdict::CannotRunLinux { detail } => {
            if !pvm {
                eprintln!("note: a non-pvm KVM cannot run Linux: {detail}");
            }
            assert!(detail.contains("KVM_EXIT_INTERNAL_ERROR"), "{detail}");
        }
    }
}

/// The payload reads the virtio-mmio magic and device id of a real virtio-rng
/// transport and writes its status register, echoing what it read to the
/// serial port: the whole MMIO path from guest to device model and back.
#[test]
fn cpl3_payload_talks_to_a_virtio_mmio_device() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let mut c = Asm::new();
    c.print_virtio_identity().reset_vm();
    let c = c.code();
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut cfg = config(c, &serial);
    cfg.devices = vec![nutshell_vmm::VirtioDeviceConfig::Rng];
    let reason = Vmm::build(&cfg).unwrap().run();
    assert_eq!(reason, ExitReason::GuestReset, "{reason}");
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), "virt43\n");
}

#[test]
fn api_socket_reports_state_pauses_and_shuts_down() {
    use std::io::{BufRead, BufReader, Write};
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let mut c = config(vec![0xeb, 0xfe], &dir.path().join("s.log"));
    c.api_socket = Some(api.clone());
    let t = std::thread::spawn(move || Vmm::build(&c).unwrap().run());
    let mut s = None;
    for _ in 0..200 {
        if let Ok(x) = std::os::unix::net::UnixStream::connect(&api) {
            s = Some(x);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = s.expect("API socket never came up");
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ask = |req: &str| {
        writeln!(&s, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    };
    assert!(ask(r#"{"op":"state"}"#).contains(r#""state":"running""#));
    assert!(ask(r#"{"op":"pause"}"#).contains(r#""state":"paused""#));
    assert!(ask(r#"{"op":"resume"}"#).contains(r#""state":"running""#));
    assert!(ask(r#"{"op":"reboot"}"#).contains(r#""ok":false"#));
    assert!(ask("not json").contains("bad request"));
    assert!(ask(r#"{"op":"shutdown"}"#).contains(r#""state":"stopping""#));
    assert_eq!(t.join().unwrap(), ExitReason::HostShutdown);
    assert!(!api.exists(), "socket removed");
}

/// A CPL3 "driver" brings up virtio-rng through the real MMIO transport:
/// writes a descriptor and the avail ring, negotiates VERSION_1, sets up
/// queue 0, sets DRIVER_OK, notifies (an ioeventfd into the event loop),
/// spins until the used ring moves, then prints the used length and the
/// first 8 bytes the device wrote. The whole virtio data path on real KVM.
#[test]
fn cpl3_driver_gets_entropy_from_virtio_rng() {
    if !require(kvm_usable(), "/dev/kvm is missing or not usable") {
        return;
    }
    let mut c = Asm::new();
    c.mov_ecx(0x20_0000)
        .store_at_rcx(0x0, 0x20_3000) // desc[0].addr
        .store_at_rcx(0x8, 64) // desc[0].len
        .store_at_rcx(0xc, 2) // desc[0].flags = WRITE, next = 0
        .store_at_rcx(0x1000, 1 << 16); // avail.flags = 0, avail.idx = 1
    c.mmio_writes(&[
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1), // VIRTIO_F_VERSION_1
        (0x24, 0),
        (0x20, 0),
        (0x70, 0xb),
        (0x30, 0),
        (0x38, 16),
        (0x80, 0x20_0000),
        (0x84, 0),
        (0x90, 0x20_1000),
        (0x94, 0),
        (0xa0, 0x20_2000),
        (0xa4, 0),
        (0x44, 1),
        (0x70, 0xf),
        (0x50, 0), // QueueNotify
    ]);
    c.spin_while_zero_u16(0x20_2002) // used.idx
        .serial()
        .print_u32_at_rcx(6); // used[0].len
    c.mov_ecx(0x20_3000);
    c.raw(&[0x48, 0x8b, 0x01]); // mov rax, [rcx]
    for _ in 0..8 {
        c.raw(&[0xee, 0x48, 0xc1, 0xe8, 0x08]); // out; shr rax, 8
    }
    c.reset_vm();
    let c = c.code();

    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut cfg = config(c, &serial);
    cfg.devices = vec![nutshell_vmm::VirtioDeviceConfig::Rng];
    let reason = Vmm::build(&cfg).unwrap().run();
    assert_eq!(reason, ExitReason::GuestReset, "{reason}");
    let out = std::fs::read(&serial).unwrap();
    assert_eq!(out.len(), 9, "{out:?}");
    assert_eq!(out[0], 64, "used length");
    assert!(out[1..].iter().any(|&b| b != 0), "entropy arrived: {out:?}");
}
