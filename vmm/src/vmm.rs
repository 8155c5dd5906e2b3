//! Putting a VM together from a [`VmConfig`] and running it: memory, the
//! irqchip, the buses and their devices, the boot vCPU's entry state, the
//! vCPU threads and the epoll event loop that owns every host-side fd.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::arch::{cpuid, regs};
use crate::boot::{self, linux, BootEntry};
use crate::config::{BootSource, SerialOutput, TapSource, VirtioDeviceConfig, VmConfig};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    Capped, ConsoleWriter, SerialDevice, SerialInput, SharedTail, COM1_BASE, COM1_LEN, FILE_LIMIT,
};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::{Net, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{PauseGate, Vcpu, VcpuError, VcpuHandle, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

/// Failure to build or start a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The config is not usable.
    #[error("Invalid VM configuration: {0}")]
    Config(String),
    /// Creating the VM failed.
    #[error("Failed to create the VM.")]
    Vm(#[from] VmError),
    /// Creating guest memory failed.
    #[error("Failed to create guest memory.")]
    Memory(#[from] MemoryError),
    /// Setting up a vCPU failed.
    #[error("Failed to set up a vCPU.")]
    Vcpu(#[from] VcpuError),
    /// Reading the supported CPUID failed.
    #[error("Failed to read the supported CPUID.")]
    Cpuid(#[from] cpuid::CpuidError),
    /// Setting the boot vCPU's registers failed.
    #[error("Failed to set up the boot vCPU's registers.")]
    Regs(#[from] regs::RegsError),
    /// Loading Linux failed.
    #[error("Failed to load the guest kernel.")]
    Linux(#[from] linux::LinuxBootError),
    /// Writing the MP table failed.
    #[error("Failed to write the MP table.")]
    Mptable(#[from] crate::arch::mptable::MptableError),
    /// Placing a payload failed.
    #[error("Failed to load the payload.")]
    Payload(#[from] boot::PayloadError),
    /// A device did not fit on its bus.
    #[error("Failed to place a device on a bus.")]
    Bus(#[from] BusError),
    /// A host resource (eventfd, file, epoll) could not be created.
    #[error("Failed to {0}.")]
    Host(&'static str, #[source] std::io::Error),
    /// Registering an irqfd or ioeventfd with KVM failed.
    #[error("Failed to {0}.")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A device's host side could not be opened.
    #[error("Failed to open the device backend {0}.")]
    Device(std::path::PathBuf, #[source] std::io::Error),
    /// A virtio-fs device could not be set up (its message names the socket).
    #[error("Failed to set up a virtio-fs device.")]
    Fs(#[from] FsError),
    /// A virtio-net device's tap could not be opened (its message names it).
    #[error("Failed to set up a virtio-net device.")]
    Net(#[from] TapError),
    /// The event loop failed.
    #[error("The event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

/// A handle to a running VM's controls, usable from other threads.
#[derive(Clone)]
pub struct VmmControl {
    exit: Arc<ExitSignal>,
    pause: Arc<PauseGate>,
    console: SharedTail,
    kick: Arc<EventFd>,
}

/// The run state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The VM is ending.
    Stopping,
}

impl VmmControl {
    /// The current state.
    pub fn state(&self) -> VmState {
        if self.exit.is_stopping() {
            VmState::Stopping
        } else if self.pause.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Parks the vCPUs.
    pub fn pause(&self) {
        self.pause.pause();
        // The event loop kicks the vCPUs out of KVM_RUN.
        let _ = self.kick.write(1);
    }

    /// vCPUs parked by [`VmmControl::pause`] so far.
    pub fn parked_vcpus(&self) -> usize {
        self.pause.parked()
    }

    /// Unparks the vCPUs.
    pub fn resume(&self) {
        self.pause.resume();
    }

    /// Ends the VM with [`ExitReason::HostShutdown`].
    pub fn shutdown(&self) {
        self.exit.request(ExitReason::HostShutdown);
    }

    /// The console's last lines.
    pub fn console_lines(&self) -> Vec<String> {
        self.console.lock().map(|t| t.lines()).unwrap_or_default()
    }
}

/// Extra devices a library caller puts on the MMIO bus (tests, experiments).
pub type ExtraMmioDevice = (u64, u64, SharedDevice);

/// A built, not yet running VM.
pub struct Vmm {
    // Field order matters on drop: vCPUs before the VM, the VM before memory.
    vcpus: Vec<Vcpu>,
    vm: Vm,
    _mem: GuestMemoryMmap,
    exit: Arc<ExitSignal>,
    pause: Arc<PauseGate>,
    console: SharedTail,
    kick: Arc<EventFd>,
    timeout: Option<Duration>,
    api_socket: Option<std::path::PathBuf>,
    harden: bool,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

/// Drains the exit and pause-kick eventfds; the loop looks at the state.
struct ControlSubscriber {
    exit: Arc<ExitSignal>,
    kick: Arc<EventFd>,
    kicked: bool,
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.kick.as_raw_fd() {
            let _ = self.kick.read();
            self.kicked = true;
        } else {
            let _ = self.exit.eventfd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration only fails on a broken epoll fd; run() then times out.
        let _ = ops.add(Events::new(self.exit.eventfd(), EventSet::IN));
        let _ = ops.add(Events::new(self.kick.as_ref(), EventSet::IN));
    }
}

fn serial_sink(out: &SerialOutput) -> Result<Option<Box<dyn Write + Send>>, VmmError> {
    Ok(match out {
        SerialOutput::Stdout => Some(Box::new(std::io::stdout())),
        SerialOutput::File(p) => {
            let f =
                File::create(p).map_err(|e| VmmError::Host("create the serial output file", e))?;
            Some(Box::new(Capped::new(f, FILE_LIMIT)))
        }
        SerialOutput::Discard => None,
    })
}

impl Vmm {
    /// Builds a VM from `config`.
    pub fn build(config: &VmConfig) -> Result<Self, VmmError> {
        Self::build_with(config, Vec::new())
    }

    /// Builds a VM from `config`, with `extra` devices on the MMIO bus.
    pub fn build_with(config: &VmConfig, extra: Vec<ExtraMmioDevice>) -> Result<Self, VmmError> {
        if config.vcpus == 0 || config.vcpus > 32 {
            return Err(VmmError::Config(format!(
                "{} vCPUs (1 to 32 are supported)",
                config.vcpus
            )));
        }
        if config.memory_mib == 0 || config.memory_mib > 64 * 1024 {
            return Err(VmmError::Config(format!(
                "{} MiB of memory (1 MiB to 64 GiB are supported)",
                config.memory_mib
            )));
        }
        let mem_size = config.memory_mib << 20;
        let vm = Vm::new()?;
        let mem = create_guest_memory(mem_size)?;
        vm.register_memory(&mem)?;
        if config.irqchip {
            vm.setup_irqchip()?;
        }

        let exit = Arc::new(ExitSignal::new().map_err(|e| VmmError::Host("create an eventfd", e))?);
        let console = SharedTail::default();
        let pause = Arc::new(PauseGate::default());
        let kick = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("create an eventfd", e))?,
        );

        let mut io_bus = Bus::new();
        let serial_irq =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("create an eventfd", e))?;
        if config.irqchip {
            vm.fd()
                .register_irqfd(&serial_irq, SERIAL_IRQ)
                .map_err(|e| VmmError::Kvm("register the serial irqfd", e))?;
        }
        let serial = SerialDevice::new(
            serial_irq,
            ConsoleWriter::new(serial_sink(&config.serial)?, console.clone()),
        );
        let serial = Arc::new(Mutex::new(serial));
        io_bus.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        io_bus.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;

        let mut mmio_bus = Bus::new();
        for (base, len, dev) in extra {
            mmio_bus.insert(dev, base, len)?;
        }
        let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
        if config.serial_stdin {
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| VmmError::Host("duplicate stdin", e))?;
            let input = SerialInput::new(serial.clone(), File::from(stdin));
            subscribers.push(Arc::new(Mutex::new(input)));
        }
        let mut cmdline_devices = Vec::new();
        for (i, dev_config) in config.devices.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            let transport = attach_virtio_device(&vm, &mem, dev_config, base, gsi, config.irqchip)?;
            mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            subscribers.push(transport);
            cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }

        let shared = VcpuShared {
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            exit: exit.clone(),
            console: console.clone(),
            pause: pause.clone(),
        };
        let base_cpuid = cpuid::supported(vm.kvm())?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let vcpu = Vcpu::new(vm.fd(), id, shared.clone())?;
            vcpu.configure(&base_cpuid, config.vcpus, config.irqchip)?;
            vcpus.push(vcpu);
        }

        let entry: BootEntry = match &config.boot {
            BootSource::Linux(l) => {
                let mut l = l.clone();
                for d in &cmdline_devices {
                    l.cmdline.push(' ');
                    l.cmdline.push_str(d);
                }
                let entry = linux::load(&mem, mem_size, &l)?;
                if config.irqchip {
                    crate::arch::mptable::write(&mem, config.vcpus)?;
                }
                entry
            }
            BootSource::Payload {
                code,
                load_addr,
                mode,
            } => boot::load_payload(&mem, code, *load_addr, *mode, 0x8000)?,
        };
        // Only the boot vCPU gets an entry state; APs wait for INIT/SIPI in the irqchip.
        let bsp = vcpus[0].fd();
        regs::setup_sregs(&mem, bsp, entry.mode, entry.idt_limit)?;
        regs::setup_regs(bsp, entry.mode, entry.rip, entry.rsp, entry.boot_arg)?;

        let mut events = EventManager::new().map_err(VmmError::EventLoop)?;
        let control: Arc<Mutex<dyn MutEventSubscriber + Send>> =
            Arc::new(Mutex::new(ControlSubscriber {
                exit: exit.clone(),
                kick: kick.clone(),
                kicked: false,
            }));
        events.add_subscriber(control);
        for sub in subscribers {
            events.add_subscriber(sub);
        }

        Ok(Vmm {
            vcpus,
            vm,
            _mem: mem,
            exit,
            pause,
            console,
            kick,
            timeout: config.timeout,
            api_socket: config.api_socket.clone(),
            harden: config.harden,
            events,
        })
    }

    /// Controls for other threads (the API server, tests).
    pub fn control(&self) -> VmmControl {
        VmmControl {
            exit: self.exit.clone(),
            pause: self.pause.clone(),
            console: self.console.clone(),
            kick: self.kick.clone(),
        }
    }

    /// The VM (for registering more devices before [`Vmm::run`]).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Adds an event subscriber to the loop before the VM runs.
    pub fn add_subscriber(&mut self, sub: Arc<Mutex<dyn MutEventSubscriber + Send>>) {
        self.events.add_subscriber(sub);
    }

    /// Starts the vCPUs and runs the event loop until the VM ends.
    pub fn run(mut self) -> ExitReason {
        let started = Instant::now();
        let _api = match &self.api_socket {
            Some(p) => match crate::api::ApiServer::start(p, self.control()) {
                Ok(s) => Some(s),
                Err(e) => {
                    return ExitReason::HostError(format!(
                        "cannot listen on the API socket {}: {e}",
                        p.display()
                    ))
                }
            },
            None => None,
        };
        let mut handles: Vec<VcpuHandle> = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            match vcpu.start() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit.request(ExitReason::HostError(format!("{e}")));
                    break;
                }
            }
        }
        if self.harden {
            // After every thread exists, before the guest can do much.
            let hardened = crate::hardening::drop_capabilities()
                .and_then(|()| crate::hardening::apply_seccomp());
            if let Err(e) = hardened {
                self.exit.request(ExitReason::HostError(format!(
                    "{e}: {:?}",
                    std::error::Error::source(&e)
                )));
            }
        }
        while !self.exit.is_stopping() {
            if let Some(t) = self.timeout {
                if started.elapsed() >= t {
                    self.exit.request(ExitReason::Timeout(t));
                    break;
                }
            }
            if let Err(e) = self.events.run_with_timeout(20) {
                self.exit
                    .request(ExitReason::HostError(format!("event loop failed: {e:?}")));
            }
            // A kick can land just before a vCPU enters KVM_RUN and be
            // lost: keep kicking until every vCPU is parked.
            let paused = self.pause.is_paused();
            if paused && self.pause.parked() < handles.len() {
                handles.iter().for_each(VcpuHandle::kick);
            }
        }
        crate::timing::report("loop left");
        for h in handles {
            h.stop(Duration::from_secs(2));
        }
        crate::timing::report("vcpus stopped");
        self.exit
            .reason()
            .unwrap_or_else(|| ExitReason::HostError("the VM stopped without a reason".into()))
    }
}

/// Creates the device model for `config`.
fn create_device(config: &VirtioDeviceConfig) -> Result<Box<dyn VirtioDevice>, VmmError> {
    Ok(match config {
        VirtioDeviceConfig::Rng => Box::new(Rng::new()),
        VirtioDeviceConfig::Block { path, read_only } => {
            Box::new(Block::open(path, *read_only).map_err(|e| VmmError::Device(path.clone(), e))?)
        }
        VirtioDeviceConfig::Vsock {
            guest_cid,
            uds_path,
        } => Box::new(
            Vsock::new(u64::from(*guest_cid), uds_path)
                .map_err(|e| VmmError::Device(uds_path.clone(), e))?,
        ),
        VirtioDeviceConfig::Fs { tag, socket } => Box::new(Fs::new(tag, socket)?),
        VirtioDeviceConfig::Net { tap, mac } => {
            let net = match tap {
                TapSource::Name(name) => Net::open(name, *mac)?,
                // SAFETY: the fd was named once on our command line by the
                // parent that passed it; nothing else in this process owns
                // it, and the config is built into devices once.
                TapSource::Fd(fd) => Net::new(unsafe { Tap::inherited(*fd) }?, *mac)?,
            };
            tracing::info!(tap = %tap, mac = %net.mac(), "virtio-net on a tap");
            Box::new(net)
        }
    })
}

/// Puts a virtio device behind a virtio-mmio window at `base`, raising
/// `gsi`: its irqfd, one ioeventfd per queue on `QueueNotify`.
fn attach_virtio_device(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VirtioDeviceConfig,
    base: u64,
    gsi: u32,
    irqchip: bool,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let device = create_device(config)?;
    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("create an eventfd", e))?;
    if irqchip {
        vm.fd()
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| VmmError::Kvm("register a virtio irqfd", e))?;
    }
    let transport = MmioTransport::new(device, mem.clone(), irqfd)
        .map_err(|e| VmmError::Host("create a virtio-mmio transport", std::io::Error::other(e)))?;
    for (i, evt) in transport.queue_evts().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + mmio::reg::QUEUE_NOTIFY),
                i as u32,
            )
            .map_err(|e| VmmError::Kvm("register a virtio queue ioeventfd", e))?;
    }
    Ok(Arc::new(Mutex::new(transport)))
}

/// Builds and runs a VM: the whole life of `nutshell-vmm`.
pub fn run_vm(config: &VmConfig) -> Result<ExitReason, VmmError> {
    Ok(Vmm::build(config)?.run())
}
