//! One virtio-blk request: parse the descriptor chain, execute it against the backing
//! file, write the status byte.
//!
//! Any layout of descriptors is accepted (virtio 1.x): the header is the first 16 bytes of
//! the device-readable part, the status byte the last byte of the device-writable part,
//! and the data is what lies between. Everything the guest controls is checked: buffer
//! addresses (through virtio-queue's Reader/Writer, which refuse memory outside the guest),
//! lengths (multiple of the sector size, at most [`MAX_REQUEST_BYTES`]), direction (reads
//! need writable data, writes readable data), the sector range against the capacity, and
//! the request type. A chain that loops or is too long is cut by virtio-queue's iterator.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{BOUNCE_CHUNK, MAX_REQUEST_BYTES, SECTOR_SIZE};

/// The 16-byte request header (virtio 1.x, 5.2.6).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct RequestHeader {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub request_type: u32,
    /// Reserved.
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
}

// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// Why a request failed (logged; the guest sees only the status byte).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no writable byte for the status.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// A descriptor points outside guest memory or the chain is malformed.
    #[error("descriptor chain is invalid: {0}")]
    InvalidChain(String),
    /// The header is missing or short.
    #[error("request header missing or shorter than 16 bytes")]
    ShortHeader,
    /// Data length not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(usize),
    /// Data length above the limit.
    #[error("data length {0} exceeds the {MAX_REQUEST_BYTES}-byte limit")]
    TooLong(usize),
    /// Read with no writable data buffer, or the like.
    #[error("data buffers have the wrong direction for a {0} request")]
    WrongDirection(&'static str),
    /// Sectors beyond the end of the disk.
    #[error("sectors {start}..{end} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        start: u64,
        /// End sector (exclusive).
        end: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// Write to a read-only drive.
    #[error("write to a read-only drive")]
    ReadOnly,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The backing file failed.
    #[error("backing file I/O failed: {0}")]
    Io(String),
}

impl RequestError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The backing store as a request sees it.
pub struct Disk<'a> {
    /// Backing file.
    pub file: &'a File,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Serial number returned by GET_ID.
    pub id: &'a [u8],
    /// Reusable bounce buffer (requests larger than [`BOUNCE_CHUNK`] go through it in
    /// chunks, so it never holds more than that).
    pub buffer: &'a mut Vec<u8>,
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes the device wrote into the chain (used-ring length).
    pub used_len: u32,
    /// Data bytes moved (for the counters).
    pub data_bytes: u64,
    /// Status byte written (if the chain had room for one).
    pub status: Option<u8>,
    /// The error, if the request failed.
    pub error: Option<RequestError>,
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// Data payload length a chain carries, for rate limiting before the request runs.
/// Returns 0 for malformed chains (they fail fast and cost nothing).
pub fn data_len(chain: &Chain<'_>, mem: &GuestMemoryMmap) -> u64 {
    let readable = Reader::<()>::new(mem, chain.clone())
        .map(|r| r.available_bytes())
        .unwrap_or(0);
    let writable = Writer::<()>::new(mem, chain.clone())
        .map(|w| w.available_bytes())
        .unwrap_or(0);
    (readable.saturating_sub(16) + writable.saturating_sub(1)) as u64
}

/// Parses and executes one request, writing its status byte.
pub fn handle(chain: Chain<'_>, mem: &GuestMemoryMmap, disk: &mut Disk<'_>) -> Outcome {
    let mut writer = match Writer::<()>::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => return no_status(RequestError::InvalidChain(e.to_string())),
    };
    if writer.available_bytes() == 0 {
        return no_status(RequestError::NoStatus);
    }
    let mut status_writer = match writer.split_at(writer.available_bytes() - 1) {
        Ok(s) => s,
        Err(e) => return no_status(RequestError::InvalidChain(e.to_string())),
    };
    let result = Reader::<()>::new(mem, chain)
        .map_err(|e| RequestError::InvalidChain(e.to_string()))
        .and_then(|mut reader| execute(&mut reader, &mut writer, disk));
    let written = writer.bytes_written() as u32;
    let (status, data_bytes, error) = match result {
        Ok(bytes) => (VIRTIO_BLK_S_OK as u8, bytes, None),
        Err(e) => (e.status(), 0, Some(e)),
    };
    if let Err(e) = status_writer.write_obj(status) {
        return no_status(RequestError::InvalidChain(format!("status byte: {e}")));
    }
    Outcome {
        used_len: written + 1,
        data_bytes,
        status: Some(status),
        error,
    }
}

fn no_status(e: RequestError) -> Outcome {
    Outcome {
        used_len: 0,
        data_bytes: 0,
        status: None,
        error: Some(e),
    }
}

fn check_range(sector: u64, len: usize, capacity: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE as usize) {
        return Err(RequestError::UnalignedLength(len));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong(len));
    }
    let end = sector.saturating_add(len as u64 / SECTOR_SIZE);
    if end > capacity {
        return Err(RequestError::OutOfRange {
            start: sector,
            end,
            capacity,
        });
    }
    Ok(sector * SECTOR_SIZE)
}

/// The first `n` bytes (at most [`BOUNCE_CHUNK`]) of the bounce buffer, which grows to
/// the largest chunk used and never beyond [`BOUNCE_CHUNK`].
fn bounce(buffer: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buffer.len() < n {
        buffer.resize(n, 0);
    }
    &mut buffer[..n]
}

/// Runs the request; returns the data bytes moved.
fn execute(
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    disk: &mut Disk<'_>,
) -> Result<u64, RequestError> {
    let header: RequestHeader = reader.read_obj().map_err(|_| RequestError::ShortHeader)?;
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            if len == 0 || reader.available_bytes() != 0 {
                return Err(RequestError::WrongDirection("read"));
            }
            let offset = check_range(header.sector, len, disk.capacity)?;
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(BOUNCE_CHUNK);
                let chunk = bounce(disk.buffer, n);
                disk.file
                    .read_exact_at(chunk, offset + done as u64)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                writer
                    .write_all(chunk)
                    .map_err(|e| RequestError::InvalidChain(e.to_string()))?;
                done += n;
            }
            Ok(len as u64)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            if len == 0 || writer.available_bytes() != 0 {
                return Err(RequestError::WrongDirection("write"));
            }
            let offset = check_range(header.sector, len, disk.capacity)?;
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(BOUNCE_CHUNK);
                let chunk = bounce(disk.buffer, n);
                reader
                    .read_exact(chunk)
                    .map_err(|e| RequestError::InvalidChain(e.to_string()))?;
                disk.file
                    .write_all_at(chunk, offset + done as u64)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                done += n;
            }
            Ok(len as u64)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file
                    .sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let room = writer.available_bytes().min(VIRTIO_BLK_ID_BYTES as usize);
            if room == 0 {
                return Err(RequestError::WrongDirection("get-id"));
            }
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = disk.id.len().min(id.len());
            id[..n].copy_from_slice(&disk.id[..n]);
            writer
                .write_all(&id[..room])
                .map_err(|e| RequestError::InvalidChain(e.to_string()))?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
