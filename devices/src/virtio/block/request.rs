//! One virtio-blk request: parse the descriptor chain, execute it against the backing
//! file, write the status byte.
//!
//! Any layout of descriptors is accepted (virtio 1.x): the header is the first 16 bytes of
//! the device-readable part, the status byte the last byte of the device-writable part,
//! and the data is what lies between. Everything the guest controls is checked: buffer
//! addresses (resolved through vm-memory, which refuses memory outside the guest),
//! lengths (multiple of the sector size, at most [`MAX_REQUEST_BYTES`]), direction (reads
//! need writable data, writes readable data), the sector range against the capacity, and
//! the request type. A chain that loops or is too long is cut by virtio-queue's iterator.

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use super::{MAX_REQUEST_BYTES, SECTOR_SIZE};

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
    match Buffers::of(chain, mem) {
        Ok(b) => (b.readable_len.saturating_sub(16) + b.writable_len.saturating_sub(1)) as u64,
        Err(_) => 0,
    }
}

/// Parses and executes one request, writing its status byte.
pub fn handle(chain: Chain<'_>, mem: &GuestMemoryMmap, disk: &mut Disk<'_>) -> Outcome {
    let buffers = match Buffers::of(&chain, mem) {
        Ok(b) => b,
        Err(e) => return no_status(e),
    };
    if buffers.writable_len == 0 {
        return no_status(RequestError::NoStatus);
    }
    let status_at = buffers.writable_len - 1;
    let result = execute(&buffers, disk);
    let (status, written, data_bytes, error) = match result {
        Ok(done) => (VIRTIO_BLK_S_OK as u8, done.written, done.data_bytes, None),
        Err(e) => (e.status(), 0, 0, Some(e)),
    };
    let status_slice = match sub_slices(&buffers.writable, status_at, 1) {
        Ok(s) => s,
        Err(e) => return no_status(e),
    };
    if let Err(e) = copy_in(&status_slice, &[status]) {
        return no_status(RequestError::InvalidChain(format!("status byte: {e}")));
    }
    Outcome {
        used_len: (written as u32).saturating_add(1),
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

/// The guest memory a chain names, as the device may touch it: the device-readable
/// descriptors and the device-writable ones, each list in chain order (as virtio-queue's
/// own readers take them), each resolved to host slices of guest memory. Resolving
/// fails for any buffer outside guest memory, so the data path below only ever touches
/// memory the guest owns.
struct Buffers<'m> {
    readable: Vec<VolatileSlice<'m>>,
    readable_len: usize,
    writable: Vec<VolatileSlice<'m>>,
    writable_len: usize,
}

impl<'m> Buffers<'m> {
    fn of(chain: &Chain<'m>, mem: &'m GuestMemoryMmap) -> Result<Self, RequestError> {
        let mut b = Buffers {
            readable: Vec::new(),
            readable_len: 0,
            writable: Vec::new(),
            writable_len: 0,
        };
        // virtio-queue's iterator ends a chain that loops or is longer than the queue,
        // so this loop is bounded by the queue size whatever the guest wrote.
        for desc in chain.clone() {
            let writable = desc.is_write_only();
            let (list, total, access) = if writable {
                (&mut b.writable, &mut b.writable_len, Permissions::Write)
            } else {
                (&mut b.readable, &mut b.readable_len, Permissions::Read)
            };
            *total = total
                .checked_add(desc.len() as usize)
                .ok_or_else(|| RequestError::InvalidChain("total length overflows".into()))?;
            let slices = mem
                .get_slices(desc.addr(), desc.len() as usize, access)
                .map_err(|e| RequestError::InvalidChain(e.to_string()))?;
            for slice in slices {
                list.push(slice.map_err(|e| RequestError::InvalidChain(e.to_string()))?);
            }
        }
        Ok(b)
    }
}

/// The part `[skip, skip + len)` of a list of slices, as slices.
fn sub_slices<'m>(
    slices: &[VolatileSlice<'m>],
    mut skip: usize,
    mut len: usize,
) -> Result<Vec<VolatileSlice<'m>>, RequestError> {
    let mut out = Vec::new();
    for s in slices {
        if len == 0 {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(len);
        out.push(
            s.subslice(skip, n)
                .map_err(|e| RequestError::InvalidChain(e.to_string()))?,
        );
        skip = 0;
        len -= n;
    }
    if len != 0 {
        return Err(RequestError::InvalidChain(
            "buffer shorter than expected".into(),
        ));
    }
    Ok(out)
}

/// Copies `data` into the slices (small fields: the status byte, the serial).
fn copy_in(slices: &[VolatileSlice<'_>], data: &[u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for s in slices {
        let n = s.len().min(data.len() - done);
        s.copy_from(&data[done..done + n]);
        done += n;
    }
    if done != data.len() {
        return Err(RequestError::InvalidChain("buffer too short".into()));
    }
    Ok(())
}

/// Copies the slices' bytes out (small fields: the request header).
fn copy_out(slices: &[VolatileSlice<'_>], out: &mut [u8]) {
    let mut done = 0;
    for s in slices {
        let n = s.len().min(out.len() - done);
        s.copy_to(&mut out[done..done + n]);
        done += n;
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

/// Which way a transfer goes between the backing file and guest memory.
#[derive(Clone, Copy)]
enum Direction {
    /// File to guest (`preadv`).
    Read,
    /// Guest to file (`pwritev`).
    Write,
}

/// Moves `len` bytes between the file at `offset` and the guest slices with `preadv` /
/// `pwritev` straight into or out of guest memory: no bounce buffer, one system call for
/// the whole chain in the common case. Hand-written because neither vm-memory
/// (`ReadVolatile` for `File` reads at the file position, one slice at a time) nor
/// virtio-queue (its Reader/Writer copy through a byte buffer) offers a positioned,
/// vectored transfer. Short transfers continue where they stopped; every round moves at
/// least one byte or fails, so the loop ends.
fn transfer(
    file: &File,
    offset: u64,
    slices: &[VolatileSlice<'_>],
    dir: Direction,
) -> Result<u64, RequestError> {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let mut done = 0usize;
    while done < total {
        let rest = sub_slices(slices, done, total - done)?;
        // The guards keep each slice's mapping valid for the call (they own nothing for
        // the plain mmap backend, but the contract is theirs to keep).
        let guards: Vec<_> = rest.iter().map(|s| s.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&rest)
            .take(IOV_MAX)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| RequestError::Io("offset out of range".into()))?;
        // SAFETY: every iovec points into guest memory that stays mapped while `rest`
        // and `guards` live (the device holds the memory object), with the slice's own
        // length; the kernel reads or writes only within them.
        let n = unsafe {
            match dir {
                Direction::Read => {
                    libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at)
                }
                Direction::Write => {
                    libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at)
                }
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(RequestError::Io(
                    "backing file ended early (was it truncated?)".into(),
                ))
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RequestError::Io(e.to_string()));
                }
            }
        }
    }
    Ok(total as u64)
}

/// Most iovecs one system call takes (Linux's `UIO_MAXIOV`); longer lists go in rounds.
const IOV_MAX: usize = 1024;

/// What a request did to the chain.
struct Done {
    /// Bytes written into device-writable buffers before the status byte.
    written: usize,
    /// Data bytes moved (for the counters).
    data_bytes: u64,
}

/// Runs the request.
fn execute(buffers: &Buffers<'_>, disk: &mut Disk<'_>) -> Result<Done, RequestError> {
    if buffers.readable_len < 16 {
        return Err(RequestError::ShortHeader);
    }
    let mut raw = [0u8; 16];
    copy_out(&sub_slices(&buffers.readable, 0, 16)?, &mut raw);
    let header = RequestHeader::from_slice(&raw)
        .copied()
        .ok_or(RequestError::ShortHeader)?;
    // Data lies between the header and the status byte.
    let readable_data = buffers.readable_len - 16;
    let writable_data = buffers.writable_len - 1;
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = writable_data;
            if len == 0 || readable_data != 0 {
                return Err(RequestError::WrongDirection("read"));
            }
            let offset = check_range(header.sector, len, disk.capacity)?;
            let data = sub_slices(&buffers.writable, 0, len)?;
            let n = transfer(disk.file, offset, &data, Direction::Read)?;
            Ok(Done {
                written: len,
                data_bytes: n,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = readable_data;
            if len == 0 || writable_data != 0 {
                return Err(RequestError::WrongDirection("write"));
            }
            let offset = check_range(header.sector, len, disk.capacity)?;
            let data = sub_slices(&buffers.readable, 16, len)?;
            let n = transfer(disk.file, offset, &data, Direction::Write)?;
            Ok(Done {
                written: 0,
                data_bytes: n,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file
                    .sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            Ok(Done {
                written: 0,
                data_bytes: 0,
            })
        }
        VIRTIO_BLK_T_GET_ID => {
            let room = writable_data.min(VIRTIO_BLK_ID_BYTES as usize);
            if room == 0 {
                return Err(RequestError::WrongDirection("get-id"));
            }
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = disk.id.len().min(id.len());
            id[..n].copy_from_slice(&disk.id[..n]);
            copy_in(&sub_slices(&buffers.writable, 0, room)?, &id[..room])?;
            Ok(Done {
                written: room,
                data_bytes: 0,
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
