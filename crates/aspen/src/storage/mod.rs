//! Storage: everything a node keeps on disk, all of it in redb files plus the log journal.
//!
//! Owns: the redb helpers every database uses ([`open_db`], crash-atomic creation, write
//! transactions with the right durability and repair settings) and [`StorageError`]; each
//! shard's Raft log ([`log_store`], its new entries in the node's [`shared_journal`], or in a
//! [`journal`] of its own) and state machine ([`state_machine`]:
//! keys, revisions, sessions, digests, snapshots); the node's metadata store ([`metadata`]).
//! The on-disk layout is described in docs/design.md ("Storage layout").
//!
//! Never: talk to the network or decide anything about Raft roles; openraft calls in through
//! its storage traits and this layer answers.

pub mod journal;
pub mod leases;
pub mod log_store;
pub mod metadata;
pub mod past;
pub mod scan;
pub mod shared_journal;
pub mod space;
pub mod state_machine;
pub mod watch;

#[cfg(test)]
mod powercut;
#[cfg(test)]
mod powercut_tests;
#[cfg(test)]
mod tests;

use std::fmt;

use crate::api::raft::OpenraftStorageError;

pub use log_store::{DurableWatch, RedbLogStore};
pub use metadata::MetadataStore;
pub use state_machine::RedbStateMachine;

/// Errors of the storage layer (redb and encoding), before they are handed to openraft.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("encoding: {0}")]
    Codec(#[from] postcard::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage task failed: {0}")]
    Task(String),
    /// The log writer could not write the Raft log; every later log write fails the same way.
    #[error("the Raft log could not be written: {0}")]
    LogWrite(std::sync::Arc<StorageError>),
    #[error("the Raft log writer has stopped")]
    LogWriterStopped,
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// Reading or writing a store panicked (redb does on some damaged pages; or a bug):
    /// [`catch_storage_panic`].
    #[error("{0}")]
    Panicked(String),
    /// The file system lacks room for what was asked (a defragmentation's copy); nothing changed.
    #[error("not enough disk space: {0}")]
    NoRoom(String),
}

impl StorageError {
    /// Whether the file is not a readable database (damaged or overwritten): redb's "corrupted"
    /// and "not a redb database" (an I/O error of kind `InvalidData`), and Aspen's own checks.
    pub fn is_damaged(&self) -> bool {
        match self {
            StorageError::Redb(redb::Error::Corrupted(_)) | StorageError::Corrupt(_) => true,
            StorageError::Redb(redb::Error::Io(e)) => e.kind() == std::io::ErrorKind::InvalidData,
            _ => false,
        }
    }

    /// What to do about a file that is not a readable database, said after the error that
    /// names it (empty for other errors).
    pub fn damage_hint(&self) -> &'static str {
        if self.is_damaged() {
            " (the file is damaged: replace this member — docs/operations.md, \"A damaged data dir\")"
        } else if matches!(self, StorageError::Panicked(_)) {
            " (the file may be damaged, or this is a bug: docs/operations.md, \"A damaged data dir\")"
        } else {
            ""
        }
    }

    /// Whether the store cannot be opened or written however often it is retried: another
    /// process has the database open (a second node on the same data dir), the files are not
    /// readable or writable, or they are damaged ([`Self::is_damaged`]), of an unknown format, or
    /// reading them panicked ([`StorageError::Panicked`]).
    pub fn is_permanent(&self) -> bool {
        let io_permanent = |e: &std::io::Error| {
            matches!(e.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
        };
        match self {
            StorageError::Redb(redb::Error::DatabaseAlreadyOpen)
            | StorageError::Redb(redb::Error::UpgradeRequired(_))
            | StorageError::Panicked(_) => true,
            _ if self.is_damaged() => true,
            StorageError::Redb(redb::Error::Io(e)) | StorageError::Io(e) => io_permanent(e),
            StorageError::LogWrite(e) => e.is_permanent(),
            _ => false,
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Task(e.to_string())
    }
}

/// Converts a storage error into openraft's, naming what was being done.
pub(crate) fn to_raft_err(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: impl fmt::Display,
) -> OpenraftStorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

/// Opens (or creates) a redb database with the settings every Aspen database uses, and a page
/// cache of `cache_bytes` (its share of the node's `[storage] cache_bytes`; redb holds its read
/// cache and its write buffer within it).
pub(crate) fn open_db(path: &std::path::Path, cache_bytes: usize) -> Result<redb::Database, StorageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !path.try_exists()? {
        create_db_atomically(path)?;
    }
    Ok(redb::Database::builder().set_cache_size(cache_bytes).create(path)?)
}

/// Runs `open` (opening a store at start-up) and turns a panic inside it into
/// [`StorageError::Panicked`]: redb panics ("unreachable", "invalid page type") instead of
/// returning an error when a page of a file is damaged, and a node must not crash-loop on a bad
/// file but stop with a message naming it (exit 2). The panic's own message still goes to stderr
/// through the panic hook. Only for opening: whatever the closure built is dropped.
pub fn open_guarded<T>(open: impl FnOnce() -> Result<T, StorageError>) -> Result<T, StorageError> {
    catch_storage_panic("reading the file", open)
}

/// Runs `f` and turns a panic inside it (redb's, on a damaged page — or a bug) into
/// [`StorageError::Panicked`] "`doing` panicked: <the panic's message>". For work after which the
/// store is not used again: opening it, or applying entries (a failed apply stops the shard).
pub fn catch_storage_panic<T>(doing: &str, f: impl FnOnce() -> Result<T, StorageError>) -> Result<T, StorageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => Err(StorageError::Panicked(format!("{doing} panicked: {}", panic_message(&*panic)))),
    }
}

/// The message a caught panic carried.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The name a new database is built under before it is renamed into place.
pub(crate) fn creating_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    path.with_file_name(name)
}

/// Creates an empty database at `path` so that a crash leaves either no file or a complete one.
///
/// redb's `create` is not crash-atomic: it makes the file's length durable before the header,
/// so a power cut in between leaves a zero-filled file that every later open refuses ("magic
/// number mismatch") and the node could never start again (found by the power-cut tests,
/// `storage::powercut_tests::a_cut_while_creating_the_stores_leaves_them_openable`). So the database
/// is built under a temporary name, synced, renamed into place, and the directory synced.
fn create_db_atomically(path: &std::path::Path) -> Result<(), StorageError> {
    let tmp = creating_path(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    drop(redb::Database::builder().create(&tmp)?);
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir_of(path)
}

/// Makes durable the directory entry of a file just made (or removed) at `path`.
pub(crate) fn sync_dir_of(path: &std::path::Path) -> Result<(), StorageError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Opens (or creates) a redb database over any storage backend, with the same settings as
/// [`open_db`]. Tests use it to put the storage on a simulated disk.
pub(crate) fn open_db_with_backend(backend: impl redb::StorageBackend) -> Result<redb::Database, StorageError> {
    Ok(redb::Database::builder().create_with_backend(backend)?)
}

/// Starts a write transaction of the state machine: quick repair on (a crash never makes a
/// restart walk the whole, possibly large, database), with the given durability.
pub(crate) fn begin_write(
    db: &redb::Database,
    durability: redb::Durability,
) -> Result<redb::WriteTransaction, StorageError> {
    begin(db, durability, true)
}

/// Starts a write transaction of the Raft log: quick repair off. Quick repair saves the
/// allocator state and forces a two-phase commit (two fsyncs) on every commit; without it a
/// durable commit is one fsync (redb's checksummed one-phase commit) and writes fewer pages. The
/// price, a full check of the file when it is opened after a crash, is small for the log: it
/// is purged behind every snapshot.
pub(crate) fn begin_log_write(
    db: &redb::Database,
    durability: redb::Durability,
) -> Result<redb::WriteTransaction, StorageError> {
    begin(db, durability, false)
}

fn begin(
    db: &redb::Database,
    durability: redb::Durability,
    quick_repair: bool,
) -> Result<redb::WriteTransaction, StorageError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    txn.set_quick_repair(quick_repair);
    Ok(txn)
}
