//! virtio-blk on a raw image file: read, write (refused when read-only),
//! flush and the device id. Out-of-range sectors and oversized requests get
//! `VIRTIO_BLK_S_IOERR`; requests are served synchronously, in order.

pub mod request;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::TYPE_BLOCK;
use super::{
    read_config_bytes, signal_used_queue, ActivateError, Activation, Interrupt, VirtioDevice,
};
use request::*;

/// The disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// The device has a flush command.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZE: u16 = 256;

/// A block device.
pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
}

impl Block {
    /// Opens `path` (read-only if asked). The capacity is the file size in
    /// whole sectors.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_file(file, read_only, &name)
    }

    /// A device on an already open image; `name` becomes the device id.
    pub fn from_file(file: File, read_only: bool, name: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            file,
            sectors,
            read_only,
            id,
            active: None,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Byte offset of `sector` when `len` bytes from there stay on the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(off)
    }

    /// Serves one request and returns (status, bytes written to the driver).
    fn execute(&mut self, req: &mut Request<'_>) -> (u8, u32) {
        match req.header.type_ {
            VIRTIO_BLK_T_IN => {
                let len = req.data_out.available_bytes();
                let Some(off) = self.range(req.header.sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut buf = vec![0u8; len];
                if self.file.read_exact_at(&mut buf, off).is_err()
                    || req.data_out.write_all(&buf).is_err()
                {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = req.data_in.available_bytes();
                let Some(off) = self.range(req.header.sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut buf = vec![0u8; len];
                if req.data_in.read_exact(&mut buf).is_err()
                    || self.file.write_all_at(&buf, off).is_err()
                {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only || self.file.sync_all().is_ok() {
                    (VIRTIO_BLK_S_OK, 0)
                } else {
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = req.data_out.available_bytes().min(ID_BYTES);
                if req.data_out.write_all(&self.id[..n]).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`.
        read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, act: Activation, irq: Arc<Interrupt>) -> Result<(), ActivateError> {
        let (mem, queue) = act.into_single_queue()?;
        self.active = Some((mem, queue, irq));
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, mut queue, irq)) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.iter(&mem).ok().and_then(|mut it| it.next()) {
            let head = chain.head_index();
            let written = match parse(&mem, chain) {
                Ok(mut req) => {
                    let (status, n) = self.execute(&mut req);
                    if req.status.write_all(&[status]).is_ok() {
                        n + 1
                    } else {
                        n
                    }
                }
                // Nowhere to put a status: complete it with nothing written.
                Err(_) => 0,
            };
            if queue.add_used(&mem, head, written).is_err() {
                break;
            }
            used_any = true;
        }
        signal_used_queue(&mut queue, &mem, &irq, used_any);
        self.active = Some((mem, queue, irq));
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, Driver, Ring};
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x100000;
    const DATA: u64 = 0x200000;
    const STATUS: u64 = 0x300000;

    struct Rig {
        mem: GuestMemoryMmap,
        driver: Driver,
        ring: Ring,
        _file: tempfile::NamedTempFile,
        path: std::path::PathBuf,
    }

    fn rig(read_only: bool) -> Rig {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut image = vec![0u8; 8 * 512];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i / 512) as u8 + 1;
        }
        std::fs::write(file.path(), &image).unwrap();
        let mem = test_memory();
        let dev = Block::open(file.path(), read_only).unwrap();
        assert_eq!(dev.sectors(), 8);
        let mut driver = Driver::new(Box::new(dev), mem.clone());
        let ring = Ring::at(0x10000, QUEUE_SIZE);
        let features =
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if read_only { VIRTIO_BLK_F_RO } else { 0 };
        assert!(driver.bring_up(features, &[&ring]));
        Rig {
            mem,
            driver,
            ring,
            path: file.path().into(),
            _file: file,
        }
    }

    impl Rig {
        /// Submits one request; returns (status byte, used length).
        fn submit(
            &mut self,
            type_: u32,
            sector: u64,
            data_len: u32,
            data_writable: bool,
        ) -> (u8, u32) {
            let hdr = RequestHeader {
                type_,
                reserved: 0,
                sector,
            };
            self.mem.write_obj(hdr, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HDR, 16, false)];
            if data_len > 0 {
                chain.push((DATA, data_len, data_writable));
            }
            chain.push((STATUS, 1, true));
            let head = self.ring.push(&self.mem, &chain);
            self.driver.notify(0);
            let (id, len) = self.ring.pop_used(&self.mem).expect("request completed");
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), len)
        }
    }
    #[test]
    fn reads_sectors() {
        let mut r = rig(false);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 2, 1024, true),
            (VIRTIO_BLK_S_OK, 1025)
        );
        let mut b = [0u8; 1024];
        r.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(b[..512].iter().all(|&x| x == 3) && b[512..].iter().all(|&x| x == 4));
    }

    #[test]
    fn writes_and_flushes() {
        let mut r = rig(false);
        r.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 7, 512, false),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_FLUSH, 0, 0, false),
            (VIRTIO_BLK_S_OK, 1)
        );
        let image = std::fs::read(&r.path).unwrap();
        assert!(image[7 * 512..].iter().all(|&x| x == 0xab));
        assert!(image[6 * 512..7 * 512].iter().all(|&x| x == 7));
    }

    #[test]
    fn out_of_range_requests_fail_with_ioerr() {
        let mut r = rig(false);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 8, 512, true).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 7, 1024, true).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, u64::MAX / 256, 512, false).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, 100, true).0,
            VIRTIO_BLK_S_IOERR,
            "partial sector"
        );
        assert_eq!(r.submit(99, 0, 0, false).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut r = rig(true);
        r.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 0, 512, false).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(std::fs::read(&r.path).unwrap()[0], 1);
        assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, 512, true).0, VIRTIO_BLK_S_OK);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_GET_ID, 0, 20, true).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn config_space_holds_the_capacity() {
        let r = rig(false);
        let mut d = r.driver;
        let mut b = [0u8; 8];
        use crate::devices::bus::BusDevice;
        d.transport.read(0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 8);
    }
}
