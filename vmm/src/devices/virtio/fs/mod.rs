//! virtio-fs as a vhost-user frontend: the guest's FUSE requests are served
//! by an external `virtiofsd` that maps guest memory (our memfd) and works
//! the queues itself. This process only owns the config space (the tag),
//! the handshake and the interrupts. See the README's decisions for why the
//! file server lives outside the VMM.
//!
//! Queues: 0 = hiprio, 1 = the one request queue.

pub mod vhost_user;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation, Interrupt, VirtioDevice, INT_VRING, TYPE_FS};
use vhost_user::{FsBackend, VhostUserError};

/// The tag's field in the config space (virtio 1.2, 5.11.4).
pub const TAG_LEN: usize = 36;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Queue size offered to the driver. virtiofsd accepts up to 32768; Linux
/// allocates rings of the size we offer, and 1024 requests in flight is
/// plenty for one pod.
pub const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Failure to create the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or has a NUL byte.
    #[error("The virtio-fs tag {0:?} must be 1 to 36 bytes without NUL bytes.")]
    Tag(String),
    /// The backend could not be reached or set up.
    #[error(transparent)]
    Backend(#[from] VhostUserError),
    /// An eventfd could not be created.
    #[error("Failed to create the virtio-fs interrupt eventfds.")]
    EventFd(#[source] std::io::Error),
}

/// Checks a mount tag and returns the config space's tag field.
pub fn tag_field(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_LEN || bytes.contains(&0) {
        return Err(FsError::Tag(tag.to_string()));
    }
    let mut field = [0u8; TAG_LEN];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

/// The config space: `tag[36]`, then `le32 num_request_queues`.
pub fn config_space(tag: &[u8; TAG_LEN]) -> [u8; TAG_LEN + 4] {
    let mut c = [0u8; TAG_LEN + 4];
    c[..TAG_LEN].copy_from_slice(tag);
    c[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
    c
}

/// The virtio-fs device.
pub struct Fs {
    config: [u8; TAG_LEN + 4],
    backend: FsBackend,
    backend_fd: RawFd,
    /// One per queue: virtiofsd writes them when it used buffers.
    calls: Vec<EventFd>,
    irq: Option<Arc<Interrupt>>,
    /// The backend hung up or failed a request: the device is dead.
    broken: bool,
}

impl Fs {
    /// Connects to the `virtiofsd` listening on `socket` and prepares a
    /// device that mounts as `tag`.
    pub fn new(tag: &str, socket: &Path) -> Result<Self, FsError> {
        let tag = tag_field(tag)?;
        let backend = FsBackend::connect(socket, NUM_QUEUES)?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        Ok(Fs {
            config: config_space(&tag),
            backend_fd: backend.socket_fd(),
            backend,
            calls,
            irq: None,
            broken: false,
        })
    }

    /// The call eventfds, one per queue (tests wait on them).
    pub fn call_evts(&self) -> &[EventFd] {
        &self.calls
    }

    /// Whether the backend failed or hung up.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn start(&mut self, act: &Activation) -> Result<(), VhostUserError> {
        let kicks: Vec<&EventFd> = act.queue_kicks.iter().map(AsRef::as_ref).collect();
        self.backend.start(
            &act.mem,
            act.acked_features,
            &act.queues,
            &kicks,
            &self.calls,
        )
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn features(&self) -> u64 {
        self.backend.guest_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        if act.queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                want: NUM_QUEUES,
                got: act.queues.len(),
            });
        }
        if self.broken {
            return Err(ActivateError::Backend(
                format!(
                    "the virtio-fs backend on {} is gone",
                    self.backend.socket().display()
                )
                .into(),
            ));
        }
        if let Err(e) = self.start(&act) {
            match e {
                // The guest's doing: stop what was started, stay usable.
                VhostUserError::RingAddress { .. } | VhostUserError::Memory(_) => {
                    if self.backend.stop().is_err() {
                        self.broken = true;
                    }
                }
                _ => self.broken = true,
            }
            return Err(ActivateError::Backend(Box::new(e)));
        }
        self.irq = Some(irq);
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        // Never called: the backend reads the queue eventfds.
    }

    fn reset(&mut self) {
        self.irq = None;
        if self.broken {
            return;
        }
        if let Err(e) = self.backend.stop() {
            tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "virtio-fs reset");
            self.broken = true;
        }
    }

    fn queues_served_externally(&self) -> bool {
        true
    }

    fn init_host_events(&mut self, ops: &mut EventOps) {
        for call in &self.calls {
            if let Err(e) = ops.add(Events::new(call, EventSet::IN)) {
                tracing::error!(?e, "failed to watch a virtio-fs call eventfd");
            }
        }
        // Only the hang-up, edge-triggered: replies on the socket are read
        // by whoever sent the request, never by the event loop.
        let hup = EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::new_raw(self.backend_fd, hup)) {
            tracing::error!(?e, "failed to watch the virtio-fs backend socket");
        }
    }

    fn host_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.backend_fd {
            if events.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP) && !self.broken {
                tracing::error!(
                    socket = %self.backend.socket().display(),
                    "the virtio-fs backend hung up; the guest's shared directory stops working"
                );
                self.broken = true;
            }
            return;
        }
        let Some(call) = self.calls.iter().find(|c| c.as_raw_fd() == fd) else {
            return;
        };
        let _ = call.read();
        // The backend signals its own eventfd, not the device's irqfd:
        // Linux's virtio-mmio interrupt handler reads InterruptStatus and
        // ignores the interrupt when the used-ring bit is clear, so the bit
        // must be set here before the GSI fires.
        if let Some(irq) = &self.irq {
            irq.trigger(INT_VRING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked_and_nul_padded() {
        assert!(matches!(tag_field(""), Err(FsError::Tag(_))));
        assert!(matches!(tag_field(&"x".repeat(37)), Err(FsError::Tag(_))));
        assert!(matches!(tag_field("a\0b"), Err(FsError::Tag(_))));
        let full = "y".repeat(36);
        assert_eq!(&tag_field(&full).unwrap()[..], full.as_bytes());
        let f = tag_field("nutshell").unwrap();
        assert_eq!(&f[..8], b"nutshell");
        assert!(f[8..].iter().all(|b| *b == 0));
        let e = tag_field(&"z".repeat(40)).unwrap_err().to_string();
        assert!(e.contains("1 to 36 bytes"), "{e}");
    }

    #[test]
    fn config_space_is_tag_then_one_request_queue() {
        let c = config_space(&tag_field("nutshell").unwrap());
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..8], b"nutshell");
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 1);
        let mut out = [0xffu8; 8];
        super::super::read_config_bytes(&c, 36, &mut out);
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_missing_socket_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("no-virtiofsd.sock");
        let Err(e) = Fs::new("nutshell", &sock) else {
            panic!("connected to nothing");
        };
        let msg = e.to_string();
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
        assert!(msg.contains("virtiofsd"), "{msg}");
        // A bad tag is refused before any connection is tried.
        assert!(matches!(Fs::new("", &sock), Err(FsError::Tag(_))));
    }

    #[test]
    fn a_socket_that_hangs_up_fails_the_handshake_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("dead.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || drop(listener.accept()));
        let Err(e) = Fs::new("nutshell", &sock) else {
            panic!("handshake with a dead peer succeeded");
        };
        t.join().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("dead.sock") && msg.contains("handshake"),
            "{msg}"
        );
    }
}
