//! The one interface both backends (SQLite, PostgreSQL) implement: [`Store`] for the
//! writer thread, [`Reader`] for reads, exports and reports.

use std::time::Duration;

use super::row::{RowFilter, StoredEvent, StoredRow};
use super::writer::Command;
use super::RepoError;

/// The writing side of a backend, owned by the writer thread.
pub(crate) trait Store: Send {
    /// `sqlite` or `postgresql`.
    fn backend(&self) -> &'static str;

    /// Whether the store can write now (SQLite always; PostgreSQL while connected).
    fn connected(&self) -> bool;

    /// (Re)connects and migrates the schema when not connected; nothing when connected.
    fn connect(&mut self) -> Result<(), RepoError>;

    /// Writes `batch` in one transaction, in order (an outcome after its row). On an error
    /// [`Store::connected`] tells whether the connection was lost (the batch is then kept
    /// and written again after a reconnect) or the batch itself failed.
    fn write_batch(&mut self, batch: &[Command]) -> Result<(), RepoError>;

    /// Deletes rows and events received before `now_wall_ns - max_age` and all but the
    /// newest `max_rows` rows; returns how many were deleted.
    fn retention(
        &mut self,
        now_wall_ns: i64,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<u64, RepoError>;
}

/// The reading side of a backend.
pub(crate) trait Reader: Send {
    /// Committed rows matching `filter`, VM by VM, each in time order.
    fn rows(&mut self, filter: &RowFilter) -> Result<Vec<StoredRow>, RepoError>;

    /// Committed events with `ts_ns >= since_ns`, of one VM or of all, oldest first.
    fn events(&mut self, vm_id: Option<&str>, since_ns: u64)
        -> Result<Vec<StoredEvent>, RepoError>;

    /// Number of committed rows.
    fn count(&mut self) -> Result<u64, RepoError>;

    /// Whether the connection is gone (the server went away): the next read reconnects.
    fn lost(&self) -> bool {
        false
    }

    /// Streams every committed row (insertion order) in chunks of `chunk`; returns the
    /// number of rows.
    fn for_each_chunk(
        &mut self,
        chunk: usize,
        f: &mut dyn FnMut(&[StoredRow]) -> Result<(), RepoError>,
    ) -> Result<u64, RepoError>;
}

/// Hands the rows `next` yields to `f` in chunks of at most `chunk` (the last one may be
/// shorter); returns how many rows there were. Both backends' `for_each_chunk` read
/// through it.
pub(super) fn in_chunks(
    chunk: usize,
    mut next: impl FnMut() -> Result<Option<StoredRow>, RepoError>,
    f: &mut dyn FnMut(&[StoredRow]) -> Result<(), RepoError>,
) -> Result<u64, RepoError> {
    let chunk = chunk.max(1);
    let mut buf = Vec::with_capacity(chunk);
    let mut n = 0u64;
    while let Some(row) = next()? {
        buf.push(row);
        if buf.len() >= chunk {
            f(&buf)?;
            n += buf.len() as u64;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        f(&buf)?;
        n += buf.len() as u64;
    }
    Ok(n)
}
