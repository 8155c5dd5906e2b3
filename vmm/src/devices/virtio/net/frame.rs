//! Frames in and out of descriptor chains: the 12-byte virtio-net header
//! (virtio 1.x always has `num_buffers`), the TX chain turned into slices
//! of guest memory with every length bounded, and an RX frame written
//! behind a header into the driver's writable buffers.

use std::io::Write;

use virtio_queue::{DescriptorChain, Writer};
use vm_memory::{ByteValued, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::tap::MAX_SEGMENTS;

/// `struct virtio_net_hdr_mrg_rxbuf`'s size: what virtio 1.x puts before
/// every frame.
pub const NET_HDR_LEN: usize = 12;
/// Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Longest frame either way: what fits the 65562-byte buffers Linux posts
/// for big packets, less the header.
pub const MAX_FRAME_LEN: usize = 65550;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the frame's checksum is left to us.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;

/// The virtio-net header, little endian on the wire.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header length for GSO.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this frame spans (1 without `MRG_RXBUF`; the device sets it).
    pub num_buffers: u16,
}
// SAFETY: plain-old-data, 1 + 1 + 5 * 2 = 12 bytes without padding, any bit
// pattern valid.
unsafe impl ByteValued for NetHeader {}

impl NetHeader {
    /// The header of every frame we deliver: no offload, one buffer.
    pub fn rx() -> Self {
        NetHeader {
            num_buffers: 1u16.to_le(),
            ..Default::default()
        }
    }

    /// From its 12 wire bytes.
    pub fn from_bytes(b: &[u8; NET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

/// Why a TX chain is dropped (it is still returned to the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// A buffer lies outside guest memory.
    #[error("A TX buffer lies outside guest memory.")]
    Memory,
    /// A device-writable descriptor in a TX chain.
    #[error("A TX chain has a device-writable buffer.")]
    Writable,
    /// Shorter than a header plus an Ethernet header.
    #[error("A TX frame of {0} bytes (header included) is too short.")]
    TooShort(usize),
    /// Longer than [`MAX_FRAME_LEN`] plus the header.
    #[error("A TX frame of more than {0} bytes (header included) is too long.")]
    TooLong(usize),
    /// Split in more pieces than one `writev` takes.
    #[error("A TX frame is split in more than {MAX_SEGMENTS} pieces.")]
    Fragmented,
    /// The header asks for an offload we never offered (GSO or a checksum
    /// left undone): the frame on the wire would be wrong.
    #[error("A TX header asks for an offload that was not negotiated (flags {flags:#x}, gso {gso_type}).")]
    Offload {
        /// The header's flags.
        flags: u8,
        /// The header's GSO type.
        gso_type: u8,
    },
}

/// A TX chain's frame: its header and the frame's bytes, still in guest
/// memory.
pub struct TxFrame<'a> {
    /// The virtio-net header.
    pub header: NetHeader,
    /// The Ethernet frame, in order.
    pub segments: Vec<VolatileSlice<'a>>,
    /// Its length.
    pub len: usize,
}

/// Walks a TX chain: readable buffers only, in guest memory, at most
/// [`NET_HDR_LEN`] + [`MAX_FRAME_LEN`] bytes in at most [`MAX_SEGMENTS`]
/// pieces, no offload asked for.
pub fn tx_frame<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<TxFrame<'a>, TxError> {
    const LIMIT: usize = NET_HDR_LEN + MAX_FRAME_LEN;
    let mut total = 0usize;
    let mut slices = Vec::new();
    // The iterator stops after queue-size descriptors, so a looping chain
    // ends too.
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxError::Writable);
        }
        let len = desc.len() as usize;
        total = total.saturating_add(len);
        if total > LIMIT {
            return Err(TxError::TooLong(LIMIT));
        }
        for s in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            slices.push(s.map_err(|_| TxError::Memory)?);
            if slices.len() > MAX_SEGMENTS {
                return Err(TxError::Fragmented);
            }
        }
    }
    if total < NET_HDR_LEN + ETH_HLEN {
        return Err(TxError::TooShort(total));
    }
    // Take the header off the front, across slices if the driver split it.
    let mut hdr = [0u8; NET_HDR_LEN];
    let mut got = 0;
    let mut segments = Vec::with_capacity(slices.len());
    for s in slices {
        if got < NET_HDR_LEN {
            let take = (NET_HDR_LEN - got).min(s.len());
            s.copy_to(&mut hdr[got..got + take]);
            got += take;
            if take < s.len() {
                segments.push(s.offset(take).map_err(|_| TxError::Memory)?);
            }
        } else if !s.is_empty() {
            segments.push(s);
        }
    }
    let header = NetHeader::from_bytes(&hdr);
    if header.gso_type != GSO_NONE || header.flags & HDR_F_NEEDS_CSUM != 0 {
        return Err(TxError::Offload {
            flags: header.flags,
            gso_type: header.gso_type,
        });
    }
    Ok(TxFrame {
        header,
        segments,
        len: total - NET_HDR_LEN,
    })
}

/// Why an RX frame did not go into a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    /// The chain's writable buffers cannot hold header and frame: the
    /// frame is dropped, the chain kept for the next one.
    #[error("An RX buffer of {room} bytes cannot hold a {need}-byte frame and its header.")]
    TooSmall {
        /// Writable bytes in the chain.
        room: usize,
        /// Header plus frame.
        need: usize,
    },
    /// The chain does not map into guest memory: it goes back unused.
    #[error("An RX buffer lies outside guest memory.")]
    Memory,
}

/// Writes the RX header (`num_buffers` = 1) and `frame` into the chain's
/// writable buffers; returns the used length (header + frame).
pub fn write_rx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, RxError> {
    let mut w = Writer::new(mem, chain).map_err(|_| RxError::Memory)?;
    let need = NET_HDR_LEN + frame.len();
    let room = w.available_bytes();
    if room < need {
        return Err(RxError::TooSmall { room, need });
    }
    w.write_all(NetHeader::rx().as_slice())
        .and_then(|()| w.write_all(frame))
        .map_err(|_| RxError::Memory)?;
    Ok(need as u32)
}
