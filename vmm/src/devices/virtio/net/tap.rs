//! The host side of virtio-net: a tap interface opened through
//! `/dev/net/tun`, non-blocking, one frame per `read`/`writev`.
//!
//! Flags: `IFF_TAP | IFF_NO_PI`, *without* `IFF_VNET_HDR`. We negotiate no
//! offloads, so the virtio-net header carries nothing the kernel needs;
//! leaving it out of the tap means a guest cannot hand the host kernel GSO
//! or checksum metadata we never offered. The device strips the header on
//! TX (the frame still goes from guest memory to the kernel in one
//! `writev`) and writes a zeroed one on RX. Offloads would switch to
//! `IFF_VNET_HDR` with `TUNSETVNETHDRSZ` 12 and `TUNSETOFFLOAD`.
//!
//! Hand-written ioctls rather than a crate: all this needs is `TUNSETIFF`
//! (the `tun-tap`/`tun` crates bring async runtimes or IP configuration we
//! do not want in the VMM, and nix has no tun helpers).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::VolatileSlice;

/// Longest interface name, NUL excluded (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// More slices than this in one frame is a malformed chain (`UIO_MAXIOV`).
pub const MAX_SEGMENTS: usize = 1024;

/// Failure to open a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("The tap name {0:?} must be 1 to 15 bytes of letters, digits, '-', '_' or '.'.")]
    Name(String),
    /// `/dev/net/tun` did not open.
    #[error("Failed to open /dev/net/tun for tap {0}.")]
    Open(String, #[source] io::Error),
    /// `TUNSETIFF` refused the interface.
    #[error("Failed to attach to tap {name}: {hint}.")]
    Attach {
        /// The interface.
        name: String,
        /// What the errno most likely means here.
        hint: &'static str,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// The fd could not be made non-blocking.
    #[error("Failed to make the fd of tap {0} non-blocking.")]
    NonBlocking(String, #[source] io::Error),
    /// The eventfd that brings the device back to a tap it left unread
    /// (its RX budget ran out) could not be created.
    #[error("Failed to create the RX wake-up eventfd for tap {0}.")]
    RxWakeup(String, #[source] io::Error),
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags in the
/// union (40 bytes in all on x86_64).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks that `name` can be an interface name.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

/// An open tap (or, for tests and fuzzing, any fd with one message per
/// read and write, such as a `SOCK_SEQPACKET` socket).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap `name`, which the runtime or a CNI plugin made,
    /// or creates it (then it lasts as long as the fd, and the VMM needs
    /// `CAP_NET_ADMIN`). The VMM configures no address and sets no link up:
    /// that is the network plumbing's job.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TapError::Open(name.to_string(), e))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
        // valid, exclusively borrowed, correctly sized one, and the fd is ours.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => {
                    "not allowed (the VMM needs CAP_NET_ADMIN, or the tap must be owned by its user)"
                }
                Some(libc::EBUSY) => "another process already holds it",
                Some(libc::EINVAL) => {
                    "it exists with other flags (a multi-queue tap, or a tun rather than a tap)"
                }
                _ => "TUNSETIFF failed",
            };
            return Err(TapError::Attach {
                name: name.to_string(),
                hint,
                source,
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Wraps an fd that behaves like a tap (tests, fuzzing); makes it
    /// non-blocking.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Self, TapError> {
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let rc = unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(TapError::NonBlocking(
                name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        Ok(Tap {
            file: File::from(fd),
            name: name.to_string(),
        })
    }

    /// Takes a tap fd our parent opened and passed down (the runtime
    /// makes the pod's taps inside the pod's network namespace, where the
    /// VMM does not run). `TUNGETIFF` proves it is a tap and names it.
    ///
    /// # Safety
    /// `fd` must be open, owned by nobody else in this process, and not
    /// used through its number afterwards.
    pub unsafe fn inherited(fd: RawFd) -> Result<Self, TapError> {
        let what = format!("fd {fd}");
        // SAFETY: the caller hands over an open fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which is
        // valid, exclusively borrowed and correctly sized.
        let rc = unsafe { libc::ioctl(owned.as_raw_fd(), TUNGETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: what,
                hint: "it is not an open tap (TUNGETIFF failed)",
                source: io::Error::last_os_error(),
            });
        }
        if req.flags & (libc::IFF_TAP as libc::c_short) == 0 {
            return Err(TapError::Attach {
                name: what,
                hint: "it is a tun, not a tap",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Self::from_fd(owned, &name)
    }

    /// The fd, for a VMM process this one starts (the runtime opens taps
    /// in a pod's network namespace and hands them down).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf` (a longer frame is cut to `buf`'s length
    /// by the kernel). `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`, which is
        // valid and exclusively borrowed.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame gathered from `segments` (guest memory) with one
    /// `writev`: the only copy is the kernel's.
    pub fn write_frame(&self, segments: &[VolatileSlice<'_>]) -> io::Result<usize> {
        if segments.len() > MAX_SEGMENTS {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let guards: Vec<_> = segments.iter().map(|s| s.ptr_guard()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: g.len(),
            })
            .collect();
        // SAFETY: every iovec points into guest memory that `segments`
        // borrows (mapped for at least as long as the borrow; the guards
        // keep the pointers valid) and writev only reads from them. The
        // guest may change the bytes meanwhile: the kernel copies whatever
        // is there, which is the guest's own business.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for good in ["tap0", "nsvmmt1234", "a", "x-y_z.1", "123456789012345"] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "tap 0",
            "1234567890123456",
            "ta\0p",
            "tap:0",
        ] {
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad}");
        }
        let e = Tap::open("bad/name").unwrap_err().to_string();
        assert!(e.contains("bad/name") && e.contains("1 to 15 bytes"), "{e}");
    }

    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }
}
