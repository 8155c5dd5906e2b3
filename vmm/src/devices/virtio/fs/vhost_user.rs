//! The vhost-user side of virtio-fs: one connection to `virtiofsd`, set up
//! when the VMM is built (so a missing backend fails the VM's setup, and the
//! `connect` happens before the seccomp filter), then driven from the
//! transport's activation and reset.
//!
//! Every request asks for a reply (`REPLY_ACK`) so that a backend that
//! refuses something fails the activation there and then, not silently
//! later. A backend that dies makes the next request fail with a broken
//! socket (`sendmsg` uses `MSG_NOSIGNAL`, a closed peer reads as EOF): the
//! device stops, the VMM goes on.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user feature bit, never
/// offered to the guest.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const RING_F_EVENT_IDX: u64 = 1 << 29;
/// The virtio features the guest may get from the backend: the ring
/// layout features only the backend's queue code cares about. Everything
/// else (LOG_ALL, ACCESS_PLATFORM, ...) is about the vhost-user link or an
/// IOMMU we do not have.
pub const GUEST_FEATURE_MASK: u64 =
    super::super::VIRTIO_F_VERSION_1 | RING_F_INDIRECT_DESC | RING_F_EVENT_IDX;

/// The protocol features we use: several queues, and an answer to every
/// request. Nothing else (no backend-initiated requests, no config space
/// from the backend: the tag is ours).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

/// How long a socket that exists but refuses connections gets: virtiofsd
/// binds its socket (the file appears, which is what callers wait for) a
/// moment before it listens.
const CONNECT_REFUSED_GRACE: Duration = Duration::from_secs(2);

fn connect_retrying(socket: &Path) -> Result<UnixStream, VhostUserError> {
    let deadline = Instant::now() + CONNECT_REFUSED_GRACE;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(VhostUserError::Connect(socket.into(), e)),
        }
    }
}

/// Failure of the vhost-user link to the file server.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket does not accept connections.
    #[error("Cannot connect to the virtio-fs backend (virtiofsd) socket {0}.")]
    Connect(PathBuf, #[source] std::io::Error),
    /// A request during the handshake failed.
    #[error("The virtio-fs backend on {socket} failed the vhost-user handshake at {step}.")]
    Handshake {
        /// The backend's socket.
        socket: PathBuf,
        /// The request that failed.
        step: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("The virtio-fs backend on {socket} is not usable: {why}.")]
    Unsupported {
        /// The backend's socket.
        socket: PathBuf,
        /// What is missing.
        why: String,
    },
    /// A request while starting or stopping the queues failed.
    #[error("The virtio-fs backend on {socket} failed {step}.")]
    Request {
        /// The backend's socket.
        socket: PathBuf,
        /// The request that failed.
        step: String,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// A guest address does not lie in guest memory.
    #[error("Queue {queue}'s rings are not in guest memory.")]
    RingAddress {
        /// The queue.
        queue: usize,
    },
    /// Guest memory cannot be shared (a region without a file).
    #[error("Guest memory cannot be shared with the virtio-fs backend.")]
    Memory(#[source] vhost::Error),
}

/// The connection to one `virtiofsd`.
pub struct FsBackend {
    frontend: Frontend,
    socket: PathBuf,
    /// The virtio features the backend offers (protocol bit included).
    backend_features: u64,
    /// Whether `PROTOCOL_FEATURES` was negotiated (rings then start
    /// disabled and need `SET_VRING_ENABLE`).
    protocol: bool,
    /// Queues handed to the backend by the last activation.
    started_queues: Vec<usize>,
}

impl FsBackend {
    /// Connects to `socket` and does the part of the handshake that does
    /// not depend on the guest: owner, features, protocol features, queue
    /// count (at least `queues`).
    pub fn connect(socket: &Path, queues: usize) -> Result<Self, VhostUserError> {
        let stream = connect_retrying(socket)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        let step = |step: &'static str| {
            let socket = socket.to_path_buf();
            move |source| VhostUserError::Handshake {
                socket,
                step,
                source,
            }
        };
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let unsupported = |why: String| VhostUserError::Unsupported {
            socket: socket.to_path_buf(),
            why,
        };
        if backend_features & super::super::VIRTIO_F_VERSION_1 == 0 {
            return Err(unsupported("it does not offer VIRTIO_F_VERSION_1".into()));
        }
        let protocol = backend_features & PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let acked = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(acked)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if n < queues as u64 {
                    return Err(unsupported(format!(
                        "it serves {n} queues, virtio-fs needs {queues}"
                    )));
                }
            }
        }
        Ok(FsBackend {
            frontend,
            socket: socket.to_path_buf(),
            backend_features,
            protocol,
            started_queues: Vec::new(),
        })
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The virtio features to offer the guest.
    pub fn guest_features(&self) -> u64 {
        self.backend_features & GUEST_FEATURE_MASK
    }

    /// The connection's fd (watched for the backend hanging up).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.frontend)
    }

    fn request(&self, step: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostUserError {
        let socket = self.socket.clone();
        let step = step.into();
        move |source| VhostUserError::Request {
            socket,
            step,
            source,
        }
    }

    /// Hands the guest's memory and the driver's queues to the backend:
    /// features, memory table, then per ready queue its size, ring
    /// addresses (as our process's virtual addresses, which the backend
    /// translates through the memory table), base, call and kick eventfds.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[Queue],
        kicks: &[&EventFd],
        calls: &[EventFd],
    ) -> Result<(), VhostUserError> {
        let mut features = acked_features & self.backend_features;
        if self.protocol {
            features |= PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(features)
            .map_err(self.request("SET_FEATURES"))?;

        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(VhostUserError::Memory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.request("SET_MEM_TABLE"))?;

        self.started_queues.clear();
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let (Some(kick), Some(call)) = (kicks.get(i), calls.get(i)) else {
                continue;
            };
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingAddress { queue: i })
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let f = &self.frontend;
            f.set_vring_num(i, q.size())
                .map_err(self.request(format!("SET_VRING_NUM for queue {i}")))?;
            f.set_vring_addr(i, &config)
                .map_err(self.request(format!("SET_VRING_ADDR for queue {i}")))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(self.request(format!("SET_VRING_BASE for queue {i}")))?;
            f.set_vring_call(i, call)
                .map_err(self.request(format!("SET_VRING_CALL for queue {i}")))?;
            f.set_vring_kick(i, kick)
                .map_err(self.request(format!("SET_VRING_KICK for queue {i}")))?;
            self.started_queues.push(i);
        }
        if self.protocol {
            for i in self.started_queues.clone() {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(self.request(format!("SET_VRING_ENABLE for queue {i}")))?;
            }
        }
        Ok(())
    }

    /// Stops every queue the last [`FsBackend::start`] handed over
    /// (`GET_VRING_BASE` stops a ring), so a later start begins afresh.
    /// Every queue is tried; the first failure is returned.
    pub fn stop(&mut self) -> Result<(), VhostUserError> {
        let mut first = Ok(());
        for i in std::mem::take(&mut self.started_queues) {
            if let Err(e) = self
                .frontend
                .get_vring_base(i)
                .map_err(self.request(format!("GET_VRING_BASE for queue {i}")))
            {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
