//! Tests of the installed guest image itself (`guest-image/build.sh
//! --install`): the kernel is a PVH-bootable ELF, the initramfs holds only
//! the agent and what the kernel needs to start it, and the pair boots
//! under QEMU/TCG as far as the agent serving.
//!
//! The ELF and cpio readers are hand-written: each test reads a handful of
//! fixed-layout fields, less code than wiring up a parsing crate, and the
//! tests then check the files independently of the tools that wrote them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nutshell_tests::{guest_dir, require, which};

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point a PVH loader
/// jumps to (Linux's `pvh_start_xen`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn guest_file(name: &str) -> Option<PathBuf> {
    let p = guest_dir().join(name);
    require(
        p.is_file(),
        &format!("needs {} (guest-image/build.sh --install)", p.display()),
    )
    .then_some(p)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The program headers of a little-endian ELF64 x86-64 file, as
/// `(p_type, p_offset, p_filesz)`.
fn program_headers(elf: &[u8]) -> Vec<(u32, usize, usize)> {
    assert!(elf.len() > 64, "too short for an ELF header");
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELFCLASS64");
    assert_eq!(elf[5], 1, "not little-endian");
    assert_eq!(u16_at(elf, 18), 62, "e_machine is not x86-64");
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    assert!(phentsize >= 56 && phoff + phnum * phentsize <= elf.len());
    (0..phnum)
        .map(|i| {
            let ph = &elf[phoff + i * phentsize..];
            (
                u32_at(ph, 0),
                u64_at(ph, 8) as usize,
                u64_at(ph, 32) as usize,
            )
        })
        .collect()
}

/// The notes in an ELF's PT_NOTE segments, as `(name, type, desc)`.
fn elf_notes(elf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let align4 = |n: usize| (n + 3) & !3;
    let mut notes = Vec::new();
    for (ty, off, size) in program_headers(elf) {
        if ty != PT_NOTE {
            continue;
        }
        let seg = &elf[off..off + size];
        let mut at = 0;
        while at + 12 <= seg.len() {
            let namesz = u32_at(seg, at) as usize;
            let descsz = u32_at(seg, at + 4) as usize;
            let ntype = u32_at(seg, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + align4(namesz);
            assert!(desc_at + descsz <= seg.len(), "note overruns its segment");
            let name = String::from_utf8_lossy(&seg[name_at..name_at + namesz])
                .trim_end_matches('\0')
                .to_string();
            notes.push((name, ntype, seg[desc_at..desc_at + descsz].to_vec()));
            at = desc_at + align4(descsz);
        }
    }
    notes
}

#[test]
fn vmlinux_is_an_elf_with_a_pvh_entry_note() {
    let Some(vmlinux) = guest_file("vmlinux") else {
        return;
    };
    let elf = fs::read(&vmlinux).unwrap();
    let notes = elf_notes(&elf);
    let pvh: Vec<_> = notes
        .iter()
        .filter(|(name, ty, _)| name == "Xen" && *ty == XEN_ELFNOTE_PHYS32_ENTRY)
        .collect();
    assert_eq!(
        pvh.len(),
        1,
        "expected one Xen PHYS32_ENTRY note (CONFIG_PVH), notes: {:?}",
        notes.iter().map(|n| (&n.0, n.1)).collect::<Vec<_>>()
    );
    let desc = &pvh[0].2;
    let entry = match desc.len() {
        4 => u64::from(u32_at(desc, 0)),
        8 => u64_at(desc, 0),
        n => panic!("PHYS32_ENTRY note has a {n}-byte descriptor"),
    };
    // A 32-bit physical address, inside the kernel's load area (1 MiB+).
    assert!(
        (0x10_0000..0x1_0000_0000).contains(&entry),
        "PVH entry {entry:#x} is not a 32-bit physical address above 1 MiB"
    );
    println!("vmlinux: {} bytes, PVH entry {entry:#x}", elf.len());
}

/// One member of a newc cpio archive.
#[derive(Debug)]
struct CpioEntry {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

/// A symlink's target. gen_init_cpio stores it with its terminating NUL
/// (the kernel's unpacker accepts both).
fn link_target(e: &CpioEntry) -> &[u8] {
    e.data.strip_suffix(&[0]).unwrap_or(&e.data)
}

fn gunzip(path: &Path) -> Vec<u8> {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .output()
        .expect("running gzip");
    assert!(
        out.status.success(),
        "{} is not a valid gzip file",
        path.display()
    );
    out.stdout
}

/// Reads a newc ("070701") cpio archive, up to its TRAILER!!!.
fn read_cpio(archive: &[u8]) -> BTreeMap<String, CpioEntry> {
    let align4 = |n: usize| (n + 3) & !3;
    let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let mut entries = BTreeMap::new();
    let mut at = 0;
    loop {
        let h = &archive[at..at + 110];
        assert_eq!(&h[..6], b"070701", "not a newc cpio header at offset {at}");
        let field = |i: usize| hex(&h[6 + 8 * i..14 + 8 * i]);
        let (mode, uid, gid, mtime, filesize) = (field(1), field(2), field(3), field(5), field(6));
        let rdev = (field(9), field(10));
        let namesize = field(11) as usize;
        let name_at = at + 110;
        let name = std::str::from_utf8(&archive[name_at..name_at + namesize - 1])
            .unwrap()
            .to_string();
        let data_at = align4(name_at + namesize);
        let data = archive[data_at..data_at + filesize as usize].to_vec();
        at = align4(data_at + filesize as usize);
        if name == "TRAILER!!!" {
            break;
        }
        let old = entries.insert(
            name.clone(),
            CpioEntry {
                mode,
                uid,
                gid,
                mtime,
                rdev,
                data,
            },
        );
        assert!(old.is_none(), "{name} appears twice in the archive");
    }
    entries
}

/// What both variants must hold: a static executable /init owned by root,
/// and the console node the kernel opens for it.
fn check_init_and_console(entries: &BTreeMap<String, CpioEntry>) {
    let init = &entries["init"];
    assert_eq!(init.mode & S_IFMT, S_IFREG, "/init is not a regular file");
    assert_eq!(init.mode & 0o777, 0o755);
    assert_eq!((init.uid, init.gid), (0, 0));
    let interp = program_headers(&init.data)
        .iter()
        .any(|(ty, _, _)| *ty == PT_INTERP);
    assert!(
        !interp,
        "/init is dynamically linked; the image has no libc"
    );
    assert!(
        init.data.windows(13).any(|w| w == b"nutshell-agen"),
        "/init does not look like nutshell-agent"
    );
    let console = &entries["dev/console"];
    assert_eq!(
        console.mode & S_IFMT,
        S_IFCHR,
        "/dev/console is not a char device"
    );
    assert_eq!(console.rdev, (5, 1), "/dev/console is not 5:1");
    assert_eq!(entries["dev"].mode & S_IFMT, S_IFDIR);
    // One mtime for everything: the archive depends only on its inputs.
    let mtimes: std::collections::BTreeSet<u32> = entries.values().map(|e| e.mtime).collect();
    assert_eq!(
        mtimes.len(),
        1,
        "entries carry different mtimes: {mtimes:?}"
    );
}

#[test]
fn initramfs_holds_only_the_agent_and_its_console() {
    let Some(path) = guest_file("initramfs.cpio.gz") else {
        return;
    };
    let entries = read_cpio(&gunzip(&path));
    let names: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(names, ["dev", "dev/console", "init"]);
    check_init_and_console(&entries);
    println!(
        "initramfs: {} bytes compressed, /init {} bytes",
        fs::metadata(&path).unwrap().len(),
        entries["init"].data.len()
    );
}

#[test]
fn debug_initramfs_adds_busybox_with_a_shell() {
    let Some(path) = guest_file("initramfs-debug.cpio.gz") else {
        return;
    };
    let entries = read_cpio(&gunzip(&path));
    check_init_and_console(&entries);
    let busybox = &entries["bin/busybox"];
    assert_eq!(busybox.mode & S_IFMT, S_IFREG);
    let sh = &entries["bin/sh"];
    assert_eq!(sh.mode & S_IFMT, S_IFLNK, "/bin/sh is not a symlink");
    assert_eq!(link_target(sh), b"/bin/busybox");
    // Everything beyond the production image is busybox or a link to it.
    for (name, e) in &entries {
        let production = ["dev", "dev/console", "init"].contains(&name.as_str());
        let busybox_part = e.mode & S_IFMT == S_IFDIR
            || name == "bin/busybox"
            || (e.mode & S_IFMT == S_IFLNK && link_target(e) == b"/bin/busybox");
        assert!(
            production || busybox_part,
            "unexpected {name} in the debug initramfs"
        );
    }
}

/// Boots the installed kernel and initramfs under QEMU/TCG on a microvm
/// with no devices but the serial console, and watches the console for the
/// kernel's banner and then the agent's "serving" line. The guest is then
/// killed: powering off is the agent's business, driven over vsock by the
/// runtime's tests.
#[test]
fn boots_under_tcg_to_the_agent_serving() {
    let Some(vmlinux) = guest_file("vmlinux") else {
        return;
    };
    let Some(initramfs) = guest_file("initramfs.cpio.gz") else {
        return;
    };
    let Some(qemu) = which("qemu-system-x86_64") else {
        require(
            false,
            "needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
        );
        return;
    };
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args([
            "-M",
            "microvm,x-option-roms=off,acpi=off,memory-backend=mem",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-m",
            "256",
        ])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&vmlinux)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Generous: TCG on a loaded two-core CI machine. A healthy boot takes
    // about a second of guest time.
    let deadline = started + Duration::from_secs(120);
    let mut console = Vec::new();
    let (mut banner, mut serving) = (None, None);
    while serving.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if banner.is_none() && line.contains("Linux version") {
                    banner = Some(started.elapsed());
                }
                if line.contains("agent serving") {
                    serving = Some(started.elapsed());
                }
                console.push(line);
            }
            Err(_) => break,
        }
    }
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let log = console.join("\n");
    let banner = banner.unwrap_or_else(|| {
        panic!("no kernel banner on the console; qemu {status}, stderr:\n{stderr}\nconsole:\n{log}")
    });
    let serving = serving.unwrap_or_else(|| {
        panic!("the agent never logged 'agent serving'; qemu {status}, console:\n{log}")
    });
    assert!(banner < serving);
    let release = fs::read_to_string(guest_dir().join("VERSION"))
        .ok()
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("kernel ").map(str::to_string))
        });
    if let Some(release) = release {
        assert!(
            log.contains(&format!("Linux version {release} ")),
            "the banner does not name kernel {release} from VERSION"
        );
    }
    assert!(!log.contains("Kernel panic"), "the guest panicked:\n{log}");
    assert!(
        still_running,
        "qemu exited before it was killed: {status}\n{log}"
    );
    println!(
        "TCG boot: banner after {:.2} s, agent serving after {:.2} s (wall, from qemu start)",
        banner.as_secs_f64(),
        serving.as_secs_f64()
    );
}
