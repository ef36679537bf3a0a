//! The state machine's database file, and its defragmentation (docs/design.md §6.6).
//!
//! Owns: [`SmDb`], the handle every reader and writer of a shard's `state-machine.db` goes
//! through, so that a defragmentation can replace the file under a running node; and
//! [`defragment`], which rewrites the file in key order into a fresh one (the equivalent of
//! etcd's `defrag`).
//!
//! Why: redb never gives a file's pages back to the file system (it reuses them), and a B-tree
//! filled in random key order leaves its leaves about half full — the state machine of a store
//! loaded by many concurrent writers is ~2 × its live data. redb appends keys inserted in
//! ascending order into packed leaves, so a copy made by iterating each table in order is as
//! small as the data allows (docs/design.md §15).
//!
//! How it stays safe: readers take the current database (a read transaction keeps the file it
//! started on, so reads never wait); every write transaction holds [`SmDb::writer`] for its
//! whole length, and a defragmentation holds the gate exclusively, so no write is lost between
//! the copy and the swap. The copy is written under `state-machine.db.defrag`, made durable,
//! and renamed over the old file (then the directory is synced): a crash leaves the old file or
//! the complete new one, and an open removes a leftover copy.
//!
//! Never: change what the state holds (the copy has the same tables, keys and values; the state
//! digest is unchanged).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard},
    time::Instant,
};

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};

use super::{
    leases::{LEASES, LEASE_KEYS, TOMBSTONES, TOMBSTONE_AGE},
    snapshot::{
        STAGING_KV, STAGING_LEASES, STAGING_LEASE_KEYS, STAGING_META, STAGING_SESSIONS, STAGING_SESSION_AGE,
        STAGING_TOMBSTONES, STAGING_TOMBSTONE_AGE,
    },
    KV, META, SESSIONS, SESSION_AGE, SESSION_NS,
};
use crate::storage::{begin_write, space::free_bytes, sync_dir_of, StorageError};

/// Bytes of keys and values copied per write transaction of a defragmentation (as a snapshot
/// is staged, §6.4).
const COPY_CHUNK_BYTES: usize = 8 << 20;
/// The copy's page cache while it is written (it is reopened with the shard's share before it
/// takes the old file's place): the old file's cache is still held, and the node's memory
/// budget counts one.
const COPY_CACHE_BYTES: usize = 16 << 20;

/// The state machine's database, replaceable while the node runs.
#[derive(Debug)]
pub(crate) struct SmDb {
    current: RwLock<Arc<redb::Database>>,
    /// Held shared by every write transaction, exclusively by a defragmentation.
    writes: RwLock<()>,
    /// The file and its page cache (`None`: not on a file, e.g. on a simulated disk in tests).
    file: Option<(PathBuf, usize)>,
}

/// A read transaction with its database: redb fails the reads of a transaction whose database
/// was dropped ("Database has been closed"), and a defragmentation drops the handle to the old
/// file, so every read that may outlive a call (a snapshot being sent, a backup) keeps its own.
pub(crate) struct SmRead {
    // Dropped first.
    txn: redb::ReadTransaction,
    _db: Arc<redb::Database>,
}

impl std::ops::Deref for SmRead {
    type Target = redb::ReadTransaction;

    fn deref(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

/// A write transaction's hold on the database: no defragmentation starts while it lives.
pub(crate) struct Writer<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    db: Arc<redb::Database>,
}

impl std::ops::Deref for Writer<'_> {
    type Target = redb::Database;

    fn deref(&self) -> &redb::Database {
        &self.db
    }
}

impl SmDb {
    /// The file (`None`: not on a file).
    pub(crate) fn file_path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    pub(crate) fn new(db: redb::Database, file: Option<(PathBuf, usize)>) -> Self {
        SmDb { current: RwLock::new(Arc::new(db)), writes: RwLock::new(()), file }
    }

    /// The database now (for reads; never waits).
    pub(crate) fn db(&self) -> Arc<redb::Database> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A read transaction on the database now; it keeps that database open (a read of a file a
    /// defragmentation replaced goes on on the old file).
    pub(crate) fn begin_read(&self) -> Result<SmRead, StorageError> {
        let db = self.db();
        Ok(SmRead { txn: db.begin_read()?, _db: db })
    }

    /// The database for a write transaction, held until the writer drops (blocks while a
    /// defragmentation runs: call it on a blocking thread).
    pub(crate) fn writer(&self) -> Writer<'_> {
        let gate = self.writes.read().unwrap_or_else(PoisonError::into_inner);
        Writer { _gate: gate, db: self.db() }
    }

    /// [`Self::writer`] if no defragmentation runs or waits (for the async path).
    pub(crate) fn try_writer(&self) -> Option<Writer<'_>> {
        let gate = self.writes.try_read().ok()?;
        Some(Writer { _gate: gate, db: self.db() })
    }
}

/// The name the copy is built under.
pub(crate) fn defrag_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".defrag");
    path.with_file_name(name)
}

/// Removes a copy a crash left unfinished (the old file is whole: it was never replaced).
pub(crate) fn remove_leftover(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(defrag_path(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// What one defragmentation did.
#[derive(Clone, Debug, PartialEq)]
pub struct Defragmented {
    /// The file's size before and after.
    pub before_bytes: u64,
    pub after_bytes: u64,
    /// Keys copied (the `kv` table).
    pub keys: u64,
    /// How long writes waited.
    pub secs: f64,
}

/// Rewrites the state machine's file in key order and swaps it in (blocking; writes to the
/// shard on this node wait meanwhile, reads do not). Fails, changing nothing, if the file
/// system lacks room for the copy (as large as the old file at most; as the data it holds, with
/// slack, when less is free).
pub(crate) fn defragment(sm: &SmDb) -> Result<Defragmented, StorageError> {
    let Some((path, cache_bytes)) = &sm.file else {
        return Err(StorageError::Task("this state machine is not on a file: nothing to defragment".into()));
    };
    let started = Instant::now();
    let _exclusive = sm.writes.write().unwrap_or_else(PoisonError::into_inner);
    let before_bytes = fs::metadata(path)?.len();
    let dir = path.parent().unwrap_or(Path::new("."));
    let free = free_bytes(dir)?;
    if free < before_bytes {
        // Not room for a copy as large as the file: enough for one of the data the file holds?
        // (After deletes — a full disk's remedy — that is much less than the file.)
        let need = copy_bytes_needed(sm, before_bytes)?;
        if free < need {
            return Err(StorageError::NoRoom(format!(
                "defragmenting {} needs up to {need} free bytes for the copy; {free} are free",
                path.display()
            )));
        }
    }
    let tmp = defrag_path(path);
    remove_leftover(path)?;
    let copied = (|| {
        let new = redb::Database::builder().set_cache_size(COPY_CACHE_BYTES.min(*cache_bytes)).create(&tmp)?;
        let read = sm.begin_read()?;
        if read.list_multimap_tables()?.next().is_some() {
            return Err(StorageError::Corrupt("a multimap table in the state machine: not defragmented".into()));
        }
        for table in read.list_tables()? {
            copy_named(table.name(), &read, &new)?;
        }
        let keys = match read.open_table(KV) {
            Ok(t) => t.len()?,
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        // One durable commit makes every chunk durable.
        begin_write(&new, Durability::Immediate)?.commit()?;
        drop(new);
        let new = redb::Database::builder().set_cache_size(*cache_bytes).create(&tmp)?;
        Ok((new, keys))
    })();
    let (new, keys) = match copied {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            let full = |io: &std::io::Error| {
                matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
            };
            return Err(match e {
                StorageError::Redb(redb::Error::Io(ref io)) | StorageError::Io(ref io) if full(io) => {
                    StorageError::NoRoom(format!(
                        "defragmenting {}: the disk filled up during the copy (removed); {} bytes are free now",
                        path.display(),
                        free_bytes(dir).unwrap_or(0)
                    ))
                }
                e => e,
            });
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        drop(new);
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    // The path names the copy now: from here on every write must go to it.
    *sm.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
    sync_dir_of(path)?;
    let after_bytes = fs::metadata(path)?.len();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(file = %path.display(), before_bytes, after_bytes, keys, secs, "state machine defragmented");
    Ok(Defragmented { before_bytes, after_bytes, keys, secs })
}

/// Free space a copy of `sm` (a file of `file_bytes`) needs at most: what its tables' trees
/// take — stored bytes, tree metadata and the waste inside their pages, as redb counts them
/// (reads every page of the trees; the copy packs its pages at least as well) — plus a quarter
/// and 4 MiB of slack, so that the copy never runs the disk down to its last bytes; never more
/// than the file. Pages that deletes freed are not counted, whether redb has reused them yet or
/// not (its allocation counts keep freed pages until a durable commit no reader holds back).
fn copy_bytes_needed(sm: &SmDb, file_bytes: u64) -> Result<u64, StorageError> {
    let read = sm.begin_read()?;
    let mut used = 0u64;
    for table in read.list_tables()? {
        let stats = read.open_untyped_table(table)?.stats()?;
        used = used.saturating_add(stats.stored_bytes() + stats.metadata_bytes() + stats.fragmented_bytes());
    }
    Ok(used.saturating_add(used / 4).saturating_add(4 << 20).min(file_bytes))
}

/// Copies table `name` from `read` into `to`, in key order, if it is one the state machine
/// keeps (an unknown table is an error: the copy would lose it).
fn copy_named(name: &str, read: &redb::ReadTransaction, to: &redb::Database) -> Result<(), StorageError> {
    macro_rules! copy_if_named {
        ($($def:expr),* $(,)?) => {
            $(if name == $def.name() {
                return copy(read, to, $def);
            })*
        };
    }
    copy_if_named!(
        KV,
        SESSIONS,
        SESSION_AGE,
        SESSION_NS,
        META,
        LEASES,
        LEASE_KEYS,
        TOMBSTONES,
        TOMBSTONE_AGE,
        STAGING_KV,
        STAGING_SESSIONS,
        STAGING_SESSION_AGE,
        STAGING_LEASES,
        STAGING_LEASE_KEYS,
        STAGING_TOMBSTONES,
        STAGING_TOMBSTONE_AGE,
        STAGING_META,
    );
    Err(StorageError::Corrupt(format!("unexpected table {name:?} in the state machine: not defragmented")))
}

/// Copies one table in key order, in write transactions of about [`COPY_CHUNK_BYTES`].
fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
    read: &redb::ReadTransaction,
    to: &redb::Database,
    def: TableDefinition<K, V>,
) -> Result<(), StorageError> {
    let source = read.open_table(def)?;
    let mut items = source.iter()?;
    loop {
        let txn = begin_write(to, Durability::None)?;
        let mut more = false;
        {
            let mut target = txn.open_table(def)?;
            let mut bytes = 0;
            for item in items.by_ref() {
                let (k, v) = item?;
                let (k, v) = (k.value(), v.value());
                bytes += K::as_bytes(&k).as_ref().len() + V::as_bytes(&v).as_ref().len();
                target.insert(k, v)?;
                if bytes >= COPY_CHUNK_BYTES {
                    more = true;
                    break;
                }
            }
        }
        txn.commit()?;
        if !more {
            return Ok(());
        }
    }
}
