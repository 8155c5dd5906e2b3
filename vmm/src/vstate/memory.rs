//! Guest memory: one memfd, mapped shared, so that vhost-user backends
//! (virtiofsd, vhost-device-vsock) can map the same pages later.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::ram_ranges;

/// Failure to create guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("Failed to create the guest memory memfd.")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("Failed to size the guest memory memfd to {0} bytes.")]
    Size(u64, #[source] std::io::Error),
    /// A size of zero or one that is not page aligned.
    #[error("Guest memory size {0:#x} must be a non-zero multiple of 4 KiB.")]
    BadSize(u64),
    /// Mapping the memfd failed.
    #[error("Failed to map guest memory.")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Cloning the memfd for a region failed.
    #[error("Failed to duplicate the guest memory fd.")]
    Dup(#[source] std::io::Error),
}

/// Creates `size` bytes of guest RAM laid out by [`ram_ranges`], backed by
/// one memfd (region offsets follow each other in the file).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new fd or -1, and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"nutshell-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(|e| MemoryError::Size(size, e))?;

    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let f = file.try_clone().map_err(MemoryError::Dup)?;
        regions.push((
            GuestAddress(base),
            len as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_memfd_backed_and_usable() {
        let mem = create_guest_memory(4 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let r = mem.iter().next().unwrap();
        assert!(r.file_offset().is_some(), "memfd backed");
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(1u8, GuestAddress(4 << 20)).is_err());
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            create_guest_memory(4097),
            Err(MemoryError::BadSize(_))
        ));
    }
}
