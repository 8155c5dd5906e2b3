//! The virtio-vsock packet header and reading/writing packets from/to
//! descriptor chains, with the header's length checked against the chain and
//! a hard payload bound.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Stream sockets (the only type supported).
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// One side will not send/receive any more.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit query.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: no more receiving.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: no more sending.
pub const SHUTDOWN_SEND: u32 = 2;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Largest payload in one packet (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Header size.
pub const HDR_SIZE: usize = std::mem::size_of::<Header>();

/// `struct virtio_vsock_hdr`, little endian (x86 is, so no conversion).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}
// SAFETY: packed plain-old-data; every bit pattern is a valid value.
unsafe impl ByteValued for Header {}
const _: () = assert!(HDR_SIZE == 44);

/// Why a TX chain is not a packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain does not map into guest memory.
    #[error("The descriptor chain points outside guest memory.")]
    Memory,
    /// Shorter than a header.
    #[error("The packet is shorter than its header.")]
    ShortHeader,
    /// `len` says more than the chain holds or than we accept.
    #[error("The packet claims {0} payload bytes, more than it holds or than allowed.")]
    BadLength(u32),
}

/// Reads a driver-to-device packet: the header and its payload.
pub fn read_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut r = Reader::new(mem, chain).map_err(|_| PacketError::Memory)?;
    parse_from(&mut r)
}

/// Parses a header and payload from any reader (shared with the fuzz target).
pub fn parse_from(r: &mut impl ReadAvail) -> Result<(Header, Vec<u8>), PacketError> {
    let mut raw = [0u8; HDR_SIZE];
    r.read_exact(&mut raw)
        .map_err(|_| PacketError::ShortHeader)?;
    let hdr = *Header::from_slice(&raw).ok_or(PacketError::ShortHeader)?;
    let len = hdr.len;
    if len as usize > MAX_PAYLOAD || len as usize > r.available() {
        return Err(PacketError::BadLength(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|_| PacketError::BadLength(len))?;
    Ok((hdr, payload))
}

/// A reader that knows how much is left.
pub trait ReadAvail: Read {
    /// Bytes left to read.
    fn available(&self) -> usize;
}

impl ReadAvail for Reader<'_> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

impl ReadAvail for std::io::Cursor<&[u8]> {
    fn available(&self) -> usize {
        self.get_ref()
            .len()
            .saturating_sub(self.position() as usize)
    }
}

/// Room in a device-to-driver chain for payload after the header, or None
/// when the chain cannot hold a header.
pub fn rx_room(mem: &GuestMemoryMmap, chain: &DescriptorChain<&GuestMemoryMmap>) -> Option<usize> {
    let w = Writer::new(mem, chain.clone()).ok()?;
    w.available_bytes().checked_sub(HDR_SIZE)
}

/// Writes a packet into a device-to-driver chain; returns the bytes written.
pub fn write_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    hdr: &Header,
    payload: &[u8],
) -> Option<u32> {
    let mut w = Writer::new(mem, chain).ok()?;
    w.write_all(hdr.as_slice()).ok()?;
    w.write_all(payload).ok()?;
    Some((HDR_SIZE + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_bounds_lengths() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            len: 3,
            op: OP_RW,
            type_: TYPE_STREAM,
            ..Default::default()
        };
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(b"abc");
        let (h, p) = parse_from(&mut std::io::Cursor::new(&bytes[..])).unwrap();
        assert_eq!((h, p.as_slice()), (hdr, &b"abc"[..]));

        let short = &bytes[..10];
        assert_eq!(
            parse_from(&mut std::io::Cursor::new(short)).unwrap_err(),
            PacketError::ShortHeader
        );
        let mut lying = bytes.clone();
        lying[24..28].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(
            parse_from(&mut std::io::Cursor::new(&lying[..])).unwrap_err(),
            PacketError::BadLength(100)
        );
        lying[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_from(&mut std::io::Cursor::new(&lying[..])).is_err());
    }
}
