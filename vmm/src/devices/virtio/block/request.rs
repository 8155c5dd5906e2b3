//! Parsing one virtio-blk request from a descriptor chain, with every length
//! and sector checked before any I/O.

use std::io::Read;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Read sectors.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: done.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also for out-of-range and writes to a read-only disk).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Longest data transfer per request we accept (bounds our buffer).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// `GET_ID` answers with this many bytes.
pub const ID_BYTES: usize = 20;

/// The request header the driver puts first.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub type_: u32,
    /// Reserved (was `ioprio`).
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
}
// SAFETY: plain-old-data, no padding (4 + 4 + 8 bytes), any bit pattern valid.
unsafe impl ByteValued for RequestHeader {}

/// A parsed request, its buffers still in guest memory.
pub struct Request<'a> {
    /// The header.
    pub header: RequestHeader,
    /// Driver-to-device data (the payload of a write).
    pub data_in: Reader<'a>,
    /// Device-to-driver data (the buffer of a read), without the status byte.
    pub data_out: Writer<'a>,
    /// Where the status byte goes.
    pub status: Writer<'a>,
}

/// Why a chain is not a request we can even answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The chain does not map into guest memory.
    #[error("The descriptor chain points outside guest memory.")]
    Memory,
    /// No room for the header.
    #[error("The request has no complete header.")]
    NoHeader,
    /// No writable byte for the status.
    #[error("The request has no status byte.")]
    NoStatus,
}

/// Splits `chain` into header, data and status.
pub fn parse<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<Request<'a>, ParseError> {
    let mut reader = Reader::new(mem, chain.clone()).map_err(|_| ParseError::Memory)?;
    let mut writer = Writer::new(mem, chain).map_err(|_| ParseError::Memory)?;
    let mut hdr = [0u8; std::mem::size_of::<RequestHeader>()];
    reader
        .read_exact(&mut hdr)
        .map_err(|_| ParseError::NoHeader)?;
    let header = RequestHeader::from_slice(&hdr)
        .copied()
        .ok_or(ParseError::NoHeader)?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err(ParseError::NoStatus);
    }
    let status = writer
        .split_at(writable - 1)
        .map_err(|_| ParseError::NoStatus)?;
    Ok(Request {
        header,
        data_in: reader,
        data_out: writer,
        status,
    })
}
