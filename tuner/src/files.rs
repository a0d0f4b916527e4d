//! Opening the files a user names (configuration, kernel, initrd, models, cards, state
//! repositories) without trusting them: the open never blocks (a FIFO with no writer),
//! anything but a regular file is refused (a FIFO, `/dev/zero`, a directory, a socket),
//! and what is read whole is read up to a cap, so a huge or endless file cannot grow the
//! monitor's memory. Shared by the monitor, the tuner and the learner.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Largest ONNX model read (64 MiB; the shipped models are a few KiB).
pub const MODEL_CAP: u64 = 64 << 20;
/// Largest model card or JSON configuration read (1 MiB).
pub const TEXT_CAP: u64 = 1 << 20;

/// Why a file was refused.
#[derive(Debug, Error)]
pub enum FileError {
    /// The open failed (missing, no permission, ...).
    #[error("cannot read {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// It is not a regular file.
    #[error("{} is not a regular file (it is {kind})", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// It is larger than the cap.
    #[error("{} is too large: more than {cap} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap.
        cap: u64,
    },
    /// Reading it failed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A plain name for a file type, for messages.
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

/// Opens `path` read-only without blocking (O_NONBLOCK, O_CLOEXEC) and checks, on the
/// open descriptor (no race with a rename), that it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| FileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok(file)
}

/// Checks that `path`, if it exists, is a regular file (for files another library
/// opens, such as SQLite databases). A missing file passes.
pub fn check_regular_if_exists(path: &Path) -> Result<(), FileError> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(m.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the regular file `path` whole, refusing it when it holds more than `cap` bytes
/// (checked on the size first, then while reading, in case it grows).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path)?;
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        cap,
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > cap {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(len as usize);
    file.take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if out.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(out)
}

/// [`read_capped`] for UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64) -> Result<String, FileError> {
    let bytes = read_capped(path, cap)?;
    String::from_utf8(bytes).map_err(|e| FileError::Read {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_fifo_is_refused_at_once_without_a_writer() {
        let dir = tmp("fifo");
        let fifo = dir.join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = Instant::now();
        let e = read_capped(&fifo, TEXT_CAP).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }

    #[test]
    fn devices_and_directories_are_refused_and_big_files_capped() {
        let e = read_capped(Path::new("/dev/zero"), MODEL_CAP).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let dir = tmp("dir");
        let e = read_capped(&dir, TEXT_CAP).unwrap_err();
        assert!(matches!(e, FileError::NotRegular { .. }), "{e}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 1025]).unwrap();
        assert!(matches!(
            read_capped(&big, 1024),
            Err(FileError::TooLarge { cap: 1024, .. })
        ));
        assert_eq!(read_capped(&big, 1025).unwrap().len(), 1025);
        assert!(read_capped(&dir.join("missing"), 1)
            .unwrap_err()
            .is_not_found());
        assert!(check_regular_if_exists(&dir.join("missing")).is_ok());
        assert!(check_regular_if_exists(&big).is_ok());
        assert!(check_regular_if_exists(Path::new("/dev/null")).is_err());
    }
}
