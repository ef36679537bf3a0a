//! The Raft log of one shard: redb (`shard-N/raft-log.db`) behind a journal — on a node, the
//! node's journal shared by all its shards ([`super::shared_journal`], so that one fsync covers
//! several shards' appends); standalone, a journal file of its own ([`super::journal`]). Both
//! take records of the shard's current epoch and lose them at its next checkpoint; "the journal"
//! below is either.
//!
//! Owns: log entries, the vote, the committed log id and the last purged log id, the writer
//! thread that makes them durable, and the [`DurableWatch`] that tells the rest of the shard how
//! far the log is durable. An append is acknowledged to openraft (`log_io_completed`) only once
//! it is durable — in the journal or in redb — with one exception, below. The vote is fsync'd
//! in redb before `save_vote` returns. The committed id is kept by the writer and written with
//! the next checkpoint (openraft 0.9 awaits `save_committed` inside its core loop on every
//! commit, so it must not wait for a disk): losing it only makes a restart re-apply less eagerly.
//!
//! Group commit: `append` hands the encoded entries to the store's writer thread and returns at
//! once (openraft 0.9 calls `append` once per client write); the entries are readable from
//! memory until they are in redb. The writer takes every job queued since its last write. When
//! they are only appends, it writes them as one journal record with one fsync of a page or two
//! and acknowledges them. Otherwise — a truncation, purge or vote among them — and about once a
//! second, and when the journal is full, it *checkpoints*: one fsync'd redb transaction holding
//! everything the journal held, then the jobs in order, the committed id and the next journal
//! epoch; the journal then starts over. So redb holds the log up to the last checkpoint, the
//! journal's records of the current epoch hold the rest, and opening the log moves those into
//! redb first (`recover_journal`). Truncation, purge and vote wait for their checkpoint before
//! returning, so readers never see a truncated entry. Under concurrent writes many entries
//! share one fsync; a single writer sees no added latency.
//!
//! The leader's own appends ([`RedbLogStore::overlap_own_appends`]): openraft 0.9 awaits the
//! fsync of every append inside its core loop before it even starts replicating the entries, so
//! the leader's fsync and the followers' fsync would run one after the other on every write. A
//! store told its node id acknowledges an append of normal entries that its own node created as
//! leader of the current term at once, and fsyncs it in the background, overlapping the
//! followers' appends. What keeps "every acknowledged write is fsync'd on a quorum" true:
//! nothing acts on such an entry before it is durable here — the state machine applies an entry
//! only once the log holds it durably (`RedbStateMachine::wait_for_log`), and the commit index
//! the leader sends to followers is capped at its durable log (`IrohNetworkFactory::cap_commit_at`),
//! so neither a client acknowledgement nor a follower's apply can run ahead of the leader's
//! disk. Membership and blank entries are never acknowledged early (openraft acts on a committed
//! membership at once), and neither is anything a follower appends. A failed background fsync
//! is reported through the watch: the state machine then refuses to apply and the shard stops.
//!
//! Never: interpret entries beyond their kind and leader id (that is the state machine's job)
//! or block the async runtime on fsync.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    ops::{Bound, RangeBounds},
    sync::{mpsc, Arc, Mutex},
};

use openraft::{
    storage::{LogFlushed, RaftLogStorage},
    EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogId, RaftLogReader,
};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    begin_log_write,
    journal::{self, Encoded, Journal},
    open_db, open_db_with_backend,
    shared_journal::{ShardJournal, SharedJournal},
    sync_dir_of, to_raft_err, StorageError,
};
use crate::api::raft::{Entry, LogId, OpenraftStorageError, TypeConfig, Vote};
use crate::api::ShardId;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
/// The journal epoch: the journal's records of this epoch are the log's entries after those in
/// redb (see [`super::journal`]).
const KEY_JOURNAL_EPOCH: &str = "journal_epoch";

/// How often, at most, the journal is checkpointed into redb while it holds entries (or a newer
/// committed id).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Most jobs the writer folds into one transaction.
const MAX_JOBS_PER_COMMIT: usize = 4096;

/// Entries handed to `append` and not yet durable: index → (log id, encoded entry).
type Pending = BTreeMap<u64, (LogId, Vec<u8>)>;

/// The encoded size of every entry the log holds (index → bytes), so that the node can
/// snapshot once the log after the last snapshot holds `[raft] snapshot_log_bytes` (docs/design.md
/// §6): the entry count alone does not bound the log when batching packs many writes into an
/// entry. One small record per entry; the log is purged behind each snapshot.
#[derive(Debug, Default)]
struct LogSizes {
    sizes: BTreeMap<u64, u32>,
}

impl LogSizes {
    fn insert(&mut self, index: u64, bytes: usize) {
        self.sizes.insert(index, u32::try_from(bytes).unwrap_or(u32::MAX));
    }

    fn truncate(&mut self, from: u64) {
        self.sizes.split_off(&from);
    }

    fn purge(&mut self, upto: u64) {
        self.sizes = self.sizes.split_off(&(upto + 1));
    }

    fn bytes_after(&self, index: Option<u64>) -> u64 {
        let from = index.map_or(0, |i| i + 1);
        self.sizes.range(from..).map(|(_, b)| u64::from(*b)).sum()
    }

    /// The index to purge up to (inclusive) so that the entries kept up to `snapshot` hold at
    /// most `keep_bytes`; `None` if they already do.
    fn purge_point(&self, snapshot: u64, keep_bytes: u64) -> Option<u64> {
        let mut kept = 0u64;
        for (&index, &bytes) in self.sizes.range(..=snapshot).rev() {
            kept += u64::from(bytes);
            if kept > keep_bytes {
                return Some(index);
            }
        }
        None
    }
}

/// One unit of work for the writer thread.
enum Job {
    Append {
        entries: Vec<(LogId, Vec<u8>)>,
        /// `None`: openraft was already told (the leader's own entries, see the module docs).
        callback: Option<LogFlushed<TypeConfig>>,
    },
    /// Delete every entry from this index on.
    Truncate { from: u64, done: tokio::sync::oneshot::Sender<Result<(), Arc<StorageError>>> },
    /// Delete every entry up to this log id and record it as the last purged.
    Purge { upto: LogId, done: tokio::sync::oneshot::Sender<Result<(), Arc<StorageError>>> },
    /// Record the committed log id (needs no fsync of its own).
    Committed { value: Vec<u8> },
    /// Write a meta key.
    Meta { key: &'static str, value: Vec<u8>, done: tokio::sync::oneshot::Sender<Result<(), Arc<StorageError>>> },
}

/// How far the log file is durable: the last log id it holds after the writer's latest commit,
/// or the error that stopped the writer.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    pub last: Option<LogId>,
    pub failed: Option<Arc<StorageError>>,
}

/// Follows [`Durable`] as the writer commits.
pub type DurableWatch = tokio::sync::watch::Receiver<Durable>;

/// Waits until the log holds every entry up to `index` durably.
pub async fn wait_durable(watch: &mut DurableWatch, index: u64) -> Result<(), StorageError> {
    let durable = watch
        .wait_for(|d| d.failed.is_some() || d.last.is_some_and(|l| l.index >= index))
        .await
        .map_err(|_| StorageError::LogWriterStopped)?;
    match &durable.failed {
        Some(e) => Err(StorageError::LogWrite(e.clone())),
        None => Ok(()),
    }
}

/// The redb-backed log store. Cloning shares the database, the in-memory pending entries and the
/// writer (the clone serves as log reader).
#[derive(Clone)]
pub struct RedbLogStore {
    db: Arc<redb::Database>,
    pending: Arc<Mutex<Pending>>,
    writer: Arc<WriterHandle>,
    durable: Arc<tokio::sync::watch::Sender<Durable>>,
    /// This node's Raft id, when its own appends as leader may be acknowledged before their fsync.
    own_id: Option<u64>,
    /// The last vote saved (the leader id of the current term).
    vote: Arc<Mutex<Option<Vote>>>,
    /// The last committed id handed to `save_committed` (it may not be in redb yet).
    committed: Arc<Mutex<Option<Option<LogId>>>>,
    /// Cap on the payload bytes returned by one `limited_get_log_entries` (one AppendEntries).
    max_batch_bytes: u64,
    /// The encoded size of each entry held.
    sizes: Arc<Mutex<LogSizes>>,
    /// Shared with the writer: where its commits wait for room ([`Self::wait_for_space`]).
    space: Arc<std::sync::OnceLock<super::space::SpaceGate>>,
}

impl Debug for RedbLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLogStore").field("max_batch_bytes", &self.max_batch_bytes).finish()
    }
}

impl RedbLogStore {
    /// Opens or creates the log at `path` (page cache: `cache_bytes`), with its journal beside
    /// it ([`journal::path_beside`]).
    pub fn open(path: &std::path::Path, max_batch_bytes: u64, cache_bytes: usize) -> Result<Self, StorageError> {
        let db = open_db(path, cache_bytes)?;
        let journal_path = journal::path_beside(path);
        let existed = journal_path.exists();
        let journal = Journal::open(journal::FileDisk::open(&journal_path)?, journal::CAPACITY)?;
        if !existed {
            // The new file's directory entry must be durable before anything in it is acknowledged.
            sync_dir_of(path)?;
        }
        Self::from_db(db, LogJournal::Own(journal), max_batch_bytes)
    }

    /// Opens or creates the log of `shard` at `path` (page cache: `cache_bytes`), its new
    /// entries journaled in the node's journal (see [`super::shared_journal`]). A journal of its
    /// own left beside `path` by an earlier version is moved into the database first, then
    /// removed.
    pub fn open_shared(
        path: &std::path::Path,
        journal: &SharedJournal,
        shard: ShardId,
        max_batch_bytes: u64,
        cache_bytes: usize,
    ) -> Result<Self, StorageError> {
        let db = open_db(path, cache_bytes)?;
        let own = journal::path_beside(path);
        if own.exists() {
            let old = Journal::open(journal::FileDisk::open(&own)?, journal::CAPACITY)?;
            recover_journal(&db, &LogJournal::Own(old))?;
            std::fs::remove_file(&own)?;
            sync_dir_of(path)?;
        }
        Self::from_db(db, LogJournal::Shared(journal.shard(shard)), max_batch_bytes)
    }

    /// Opens or creates the log on any redb storage backends, one for the database and one for
    /// its journal of `journal_capacity` bytes (tests put them on simulated disks, and use small
    /// journals to make them fill up).
    pub fn open_with_backends(
        backend: impl redb::StorageBackend,
        journal: impl redb::StorageBackend,
        journal_capacity: u64,
        max_batch_bytes: u64,
    ) -> Result<Self, StorageError> {
        let db = open_db_with_backend(backend)?;
        Self::from_db(db, LogJournal::Own(Journal::open(journal, journal_capacity)?), max_batch_bytes)
    }

    /// Opens or creates the log of `shard` on any redb storage backend, journaled in `journal`.
    pub fn open_shared_with_backend(
        backend: impl redb::StorageBackend,
        journal: &SharedJournal,
        shard: ShardId,
        max_batch_bytes: u64,
    ) -> Result<Self, StorageError> {
        let db = open_db_with_backend(backend)?;
        Self::from_db(db, LogJournal::Shared(journal.shard(shard)), max_batch_bytes)
    }

    fn from_db(db: redb::Database, mut journal: LogJournal, max_batch_bytes: u64) -> Result<Self, StorageError> {
        let epoch = recover_journal(&db, &journal)?;
        journal.reset(epoch);
        let db = Arc::new(db);
        let durable = Arc::new(tokio::sync::watch::Sender::new(Durable { last: last_log_id(&db)?, failed: None }));
        let vote = Arc::new(Mutex::new(read_meta(&db, KEY_VOTE)?));
        let mut sizes = LogSizes::default();
        {
            let read = db.begin_read()?;
            let log = read.open_table(LOG)?;
            for item in log.iter()? {
                let (index, entry) = item?;
                sizes.insert(index.value(), entry.value().len());
            }
        }
        let pending: Arc<Mutex<Pending>> = Default::default();
        let (jobs, rx) = mpsc::channel();
        let space: Arc<std::sync::OnceLock<super::space::SpaceGate>> = Default::default();
        let closing: Arc<std::sync::atomic::AtomicBool> = Default::default();
        let writer = Writer {
            space: space.clone(),
            closing: closing.clone(),
            db: db.clone(),
            pending: pending.clone(),
            durable: durable.clone(),
            journal,
            journaled: BTreeMap::new(),
            committed: None,
            dirty_since: None,
        };
        let thread = std::thread::Builder::new().name("aspen-log-writer".into()).spawn(move || writer.run(rx))?;
        let writer = Arc::new(WriterHandle { jobs: Some(jobs), thread: Some(thread), closing });
        Ok(RedbLogStore {
            db,
            pending,
            writer,
            durable,
            own_id: None,
            vote,
            committed: Default::default(),
            max_batch_bytes,
            sizes: Arc::new(Mutex::new(sizes)),
            space,
        })
    }

    /// Encoded bytes of the entries the log holds after `index` (all of them for `None`):
    /// what the log grew by since the snapshot at `index`.
    pub fn bytes_after(&self, index: Option<u64>) -> u64 {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).bytes_after(index)
    }

    /// The index to purge the log up to (inclusive) so that the entries it keeps up to and
    /// including `snapshot` hold at most `keep_bytes` encoded bytes; `None` if they already do.
    pub fn purge_point(&self, snapshot: u64, keep_bytes: u64) -> Option<u64> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).purge_point(snapshot, keep_bytes)
    }

    /// Lets the store acknowledge the appends node `own_id` makes as leader of the current term
    /// before their fsync (see the module docs). Only for a store whose state machine waits for
    /// [`Self::durable`] and whose network caps the commit index it sends at it.
    /// Makes the writer's redb commits wait at `gate` for room on the disk rather than fail.
    pub fn wait_for_space(self, gate: super::space::SpaceGate) -> Self {
        let _ = self.space.set(gate);
        self
    }

    pub fn overlap_own_appends(mut self, own_id: u64) -> Self {
        self.own_id = Some(own_id);
        self
    }

    /// How far the file is durable, updated after every commit of the writer.
    pub fn durable(&self) -> DurableWatch {
        self.durable.subscribe()
    }

    /// Whether `entries` may be acknowledged before their fsync: normal entries created by this
    /// node as leader of the term of the last saved vote.
    fn own_fresh_entries(&self, entries: &[Entry]) -> bool {
        let Some(me) = self.own_id else { return false };
        let Some(vote) = *self.vote.lock().unwrap_or_else(|p| p.into_inner()) else { return false };
        let leader = vote.leader_id();
        leader.node_id == me
            && entries.iter().all(|e| {
                matches!(e.payload, EntryPayload::Normal(_))
                    && e.log_id.leader_id.node_id == me
                    && e.log_id.leader_id.term == leader.term
            })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        read_meta(&self.db, key)
    }

    /// Queues `make(done)` for the writer and waits until it is committed.
    async fn run_job(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), Arc<StorageError>>>) -> Job,
    ) -> Result<(), StorageError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.writer.send(make(done)).map_err(|_| StorageError::LogWriterStopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError::LogWrite(e)),
            Err(_) => Err(StorageError::LogWriterStopped),
        }
    }

    async fn write_meta<T: serde::Serialize>(&self, key: &'static str, value: &T) -> Result<(), StorageError> {
        let value = postcard::to_stdvec(value)?;
        self.run_job(|done| Job::Meta { key, value, done }).await
    }

    /// Entries in `range` (durable ones from redb, newer ones from memory), at most `byte_cap`
    /// encoded bytes (but at least one entry).
    fn read_range<RB: RangeBounds<u64>>(&self, range: RB, byte_cap: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let bounds = (clone_bound(range.start_bound()), clone_bound(range.end_bound()));
        // Pending first: an entry that becomes durable after this copy is in the read below.
        let pending: Vec<(u64, Vec<u8>)> =
            self.pending().range(bounds).map(|(i, (_, bytes))| (*i, bytes.clone())).collect();
        let first_pending = pending.first().map(|(i, _)| *i);
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut push = |raw: &[u8], out: &mut Vec<Entry>| -> Result<bool, StorageError> {
            if let Some(cap) = byte_cap {
                if !out.is_empty() && bytes + raw.len() as u64 > cap {
                    return Ok(false);
                }
            }
            bytes += raw.len() as u64;
            out.push(postcard::from_bytes(raw)?);
            Ok(true)
        };
        for item in table.range(bounds)? {
            let (k, v) = item?;
            // From the first pending index on, memory is newer than redb.
            if first_pending.is_some_and(|p| k.value() >= p) {
                break;
            }
            if !push(v.value(), &mut out)? {
                return Ok(out);
            }
        }
        for (_, raw) in &pending {
            if !push(raw, &mut out)? {
                break;
            }
        }
        Ok(out)
    }

    fn last_durable_id(&self) -> Result<Option<LogId>, StorageError> {
        let txn = self.db.begin_read()?;
        last_entry_id(&txn.open_table(LOG)?)
    }
}

/// Moves what the journal holds for the stored epoch into redb, bumping the epoch in the same
/// transaction (so the records just moved can never be replayed again), and returns the new
/// epoch. Runs at open, before anything reads the log.
fn recover_journal(db: &redb::Database, journal: &LogJournal) -> Result<u64, StorageError> {
    let txn = begin_log_write(db, Durability::Immediate)?;
    let epoch = {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        let epoch: u64 = match meta.get(KEY_JOURNAL_EPOCH)? {
            Some(v) => postcard::from_bytes(v.value())?,
            None => 0,
        };
        let mut next = last_id_in(&log, &meta)?.map(|l| l.index + 1);
        for record in journal.recover(epoch)? {
            let Some((first, _)) = record.first() else { continue };
            // Records continue the log: a gap means the journal does not belong to this file.
            if next.is_some_and(|n| first.index > n) {
                return Err(StorageError::Corrupt(format!(
                    "the log journal continues at index {} but the log ends before index {}",
                    first.index,
                    next.unwrap_or(0)
                )));
            }
            // Inserted exactly as the writer inserted them at its checkpoint.
            for (id, bytes) in &record {
                log.insert(id.index, bytes.as_slice())?;
            }
            next = next.max(record.last().map(|(id, _)| id.index + 1));
        }
        let epoch = epoch + 1;
        meta.insert(KEY_JOURNAL_EPOCH, postcard::to_stdvec(&epoch)?.as_slice())?;
        epoch
    };
    txn.commit()?;
    Ok(epoch)
}

fn read_meta<T: serde::de::DeserializeOwned>(db: &redb::Database, key: &str) -> Result<Option<T>, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    match table.get(key)? {
        Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
        None => Ok(None),
    }
}

fn last_entry_id(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<LogId>, StorageError> {
    match table.last()? {
        Some((_, v)) => Ok(Some(*postcard::from_bytes::<Entry>(v.value())?.get_log_id())),
        None => Ok(None),
    }
}

/// The last log id the file holds: its last entry, or the last purged id when it holds none.
fn last_log_id(db: &redb::Database) -> Result<Option<LogId>, StorageError> {
    let txn = db.begin_read()?;
    last_id_in(&txn.open_table(LOG)?, &txn.open_table(META)?)
}

/// [`last_log_id`] of the given tables (of a read or a write transaction).
fn last_id_in(
    log: &impl ReadableTable<u64, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<LogId>, StorageError> {
    match last_entry_id(log)? {
        Some(id) => Ok(Some(id)),
        None => match meta.get(KEY_LAST_PURGED)? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
            None => Ok(None),
        },
    }
}

fn clone_bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(v) => Bound::Included(*v),
        Bound::Excluded(v) => Bound::Excluded(*v),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Moves the records the node's `journal` holds for shards no store has opened (a node whose
/// `local_shards` changed) into those shards' logs under `data_dir` (`shard-N/raft-log.db`), or
/// releases them when that log is gone; so they no longer hold the journal's room. Returns the
/// shards settled. Call once every hosted shard's log is open.
pub fn settle_unclaimed(
    journal: &SharedJournal,
    data_dir: &std::path::Path,
    max_batch_bytes: u64,
) -> Result<Vec<ShardId>, StorageError> {
    let unclaimed = journal.unclaimed();
    for &shard in &unclaimed {
        let log = data_dir.join(format!("shard-{shard}")).join("raft-log.db");
        if log.exists() {
            // Opened only to move records: a small cache, outside the node's budget.
            drop(RedbLogStore::open_shared(&log, journal, shard, max_batch_bytes, 4 << 20)?);
            tracing::info!(
                "moved the node journal's entries of shard {shard}, not hosted here, into {}",
                log.display()
            );
        } else {
            journal.release(shard);
            tracing::warn!("the node journal held log entries of shard {shard}, which has no log here: dropped");
        }
    }
    Ok(unclaimed)
}

/// Where a store's new entries are journaled: a file of its own, or the node's journal.
enum LogJournal {
    Own(Journal),
    Shared(ShardJournal),
}

impl LogJournal {
    fn recover(&self, epoch: u64) -> Result<Vec<Encoded>, StorageError> {
        match self {
            LogJournal::Own(j) => j.recover(epoch),
            LogJournal::Shared(j) => Ok(j.recover(epoch)),
        }
    }

    fn reset(&mut self, epoch: u64) {
        match self {
            LogJournal::Own(j) => j.reset(epoch),
            LogJournal::Shared(j) => j.reset(epoch),
        }
    }

    fn epoch(&self) -> u64 {
        match self {
            LogJournal::Own(j) => j.epoch(),
            LogJournal::Shared(j) => j.epoch(),
        }
    }

    /// Writes `entries` as one record and fsyncs it; `Ok(false)`: no room (nothing written).
    fn append(&mut self, entries: &[&[u8]]) -> Result<bool, StorageError> {
        match self {
            LogJournal::Own(j) if !j.fits(journal::record_len(entries)) => Ok(false),
            LogJournal::Own(j) => j.append(entries).map(|()| true),
            LogJournal::Shared(j) => j.append(entries),
        }
    }
}

/// The writer thread's queue; dropping the last store handle drains the queue, stops the thread
/// and so closes the database before the drop returns (a reopen right after must not find it
/// still open).
struct WriterHandle {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set when the store closes: a checkpoint waiting for disk space stops waiting.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl WriterHandle {
    fn send(&self, job: Job) -> Result<(), ()> {
        self.jobs.as_ref().ok_or(())?.send(job).map_err(|_| ())
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.jobs.take();
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread that owns every write to the log database and its journal.
struct Writer {
    db: Arc<redb::Database>,
    pending: Arc<Mutex<Pending>>,
    durable: Arc<tokio::sync::watch::Sender<Durable>>,
    journal: LogJournal,
    /// Entries durable in the journal and not yet in redb: index → (log id, encoded entry).
    journaled: Pending,
    /// The newest committed id not yet in redb.
    committed: Option<Vec<u8>>,
    /// Since when the journal (or `committed`) holds something redb does not.
    dirty_since: Option<std::time::Instant>,
    /// Checkpoints wait here for room on the disk (set by [`RedbLogStore::wait_for_space`]).
    space: Arc<std::sync::OnceLock<super::space::SpaceGate>>,
    /// Set when the store closes ([`WriterHandle`]).
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// Where a batch of jobs went.
enum Route {
    /// Appends only (and committed ids): one journal record.
    Journal,
    /// Into redb, with everything the journal held (a checkpoint).
    Redb,
    /// Nothing to write now (only a committed id, kept for the next checkpoint).
    Nothing,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = match self.dirty_since {
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
                Some(since) => match rx.recv_timeout(CHECKPOINT_EVERY.saturating_sub(since.elapsed())) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.process(Vec::new(), true);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_JOBS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.process(jobs, false);
            if self.dirty_since.is_some_and(|since| since.elapsed() >= CHECKPOINT_EVERY) {
                self.process(Vec::new(), true);
            }
        }
        // Closing: leave everything in redb, so the next open has nothing to replay.
        if self.dirty_since.is_some() {
            self.process(Vec::new(), true);
        }
    }

    /// Makes `jobs` durable — in the journal when they are only appends, else (or when
    /// `checkpoint` is asked for, or the journal is full) in redb together with everything the
    /// journal holds — and then acknowledges each of them.
    fn process(&mut self, mut jobs: Vec<Job>, checkpoint: bool) {
        for job in &jobs {
            if let Job::Committed { value } = job {
                self.committed = Some(value.clone());
                self.dirty_since.get_or_insert_with(std::time::Instant::now);
            }
        }
        let appended: Vec<&[u8]> = jobs
            .iter()
            .flat_map(|j| match j {
                Job::Append { entries, .. } => entries.iter().map(|(_, b)| b.as_slice()).collect(),
                _ => Vec::new(),
            })
            .collect();
        let last_appended = jobs.iter().rev().find_map(|j| match j {
            Job::Append { entries, .. } => entries.last().map(|(id, _)| *id),
            _ => None,
        });
        let to_redb =
            checkpoint || jobs.iter().any(|j| matches!(j, Job::Truncate { .. } | Job::Purge { .. } | Job::Meta { .. }));
        let mut route = if to_redb {
            Route::Redb
        } else if appended.is_empty() {
            Route::Nothing
        } else {
            Route::Journal
        };
        let result = match route {
            Route::Redb => self.checkpoint(&jobs),
            Route::Journal => match self.journal.append(&appended) {
                Ok(true) => Ok(Some(last_appended)),
                // The journal is full: everything goes into redb now.
                Ok(false) => {
                    route = Route::Redb;
                    self.checkpoint(&jobs)
                }
                Err(e) => Err(e),
            },
            Route::Nothing => Ok(None),
        };
        drop(appended);
        let result = result.map_err(Arc::new);
        match &result {
            Ok(Some(last)) => self.durable.send_if_modified(|d| {
                let changed = d.last != *last;
                d.last = *last;
                changed
            }),
            Ok(None) => false,
            Err(e) => {
                tracing::error!("the Raft log could not be written: {e}");
                self.durable.send_modify(|d| d.failed = Some(e.clone()));
                true
            }
        };
        if result.is_ok() {
            match route {
                Route::Journal => {
                    for job in &mut jobs {
                        if let Job::Append { entries, .. } = job {
                            // Insert, as a redb commit of the same append would (openraft
                            // truncates before it appends over a conflicting entry). Moved: the
                            // acknowledgements below need only the callbacks.
                            for (id, bytes) in std::mem::take(entries) {
                                self.journaled.insert(id.index, (id, bytes));
                            }
                        }
                    }
                    self.dirty_since.get_or_insert_with(std::time::Instant::now);
                }
                Route::Redb => {
                    // Entries now in redb leave memory (unless a later append replaced them).
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    let moved = std::mem::take(&mut self.journaled);
                    let appended = jobs.iter().flat_map(|j| match j {
                        Job::Append { entries, .. } => entries.as_slice(),
                        _ => &[],
                    });
                    for id in moved.values().map(|(id, _)| id).chain(appended.map(|(id, _)| id)) {
                        if pending.get(&id.index).is_some_and(|(p, _)| p == id) {
                            pending.remove(&id.index);
                        }
                    }
                    self.journal.reset(self.journal.epoch() + 1);
                    self.committed = None;
                    self.dirty_since = None;
                }
                Route::Nothing => {}
            }
        } else if matches!(route, Route::Redb) && self.dirty_since.is_some() {
            // A failed checkpoint is retried a full interval later, not in a tight loop.
            self.dirty_since = Some(std::time::Instant::now());
        }
        let result = result.map(|_| ());
        for job in jobs {
            match job {
                Job::Append { callback, .. } => {
                    if let Some(callback) = callback {
                        callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                    }
                }
                Job::Truncate { done, .. } | Job::Purge { done, .. } | Job::Meta { done, .. } => {
                    let _ = done.send(result.clone());
                }
                Job::Committed { .. } => {
                    if let Err(e) = &result {
                        tracing::warn!("could not record the committed log id: {e}");
                    }
                }
            }
        }
    }

    /// One fsync'd redb transaction: everything the journal holds, then `jobs` in order, the
    /// newest committed id, and the next journal epoch. Returns the log's last id when the jobs
    /// changed the log.
    fn checkpoint(&self, jobs: &[Job]) -> Result<Option<Option<LogId>>, StorageError> {
        if let Some(gate) = self.space.get() {
            let journaled: usize = self.journaled.values().map(|(_, b)| b.len()).sum();
            let appended: usize = jobs
                .iter()
                .map(|j| match j {
                    Job::Append { entries, .. } => entries.iter().map(|(_, b)| b.len()).sum(),
                    _ => 0,
                })
                .sum();
            gate.wait_blocking((journaled + appended) as u64, "a Raft log checkpoint", || {
                self.closing.load(std::sync::atomic::Ordering::SeqCst)
            });
        }
        let mut last = None;
        let txn = begin_log_write(&self.db, Durability::Immediate)?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            for (index, (_, bytes)) in &self.journaled {
                log.insert(*index, bytes.as_slice())?;
            }
            for job in jobs {
                match job {
                    Job::Append { entries, .. } => {
                        for (id, bytes) in entries {
                            log.insert(id.index, bytes.as_slice())?;
                        }
                    }
                    Job::Truncate { from, .. } => {
                        log.retain_in(*from.., |_, _| false)?;
                    }
                    Job::Purge { upto, .. } => {
                        meta.insert(KEY_LAST_PURGED, postcard::to_stdvec(upto)?.as_slice())?;
                        log.retain_in(..=upto.index, |_, _| false)?;
                    }
                    Job::Meta { key, value, .. } => {
                        meta.insert(*key, value.as_slice())?;
                    }
                    Job::Committed { .. } => {}
                }
            }
            if let Some(value) = &self.committed {
                meta.insert(KEY_COMMITTED, value.as_slice())?;
            }
            meta.insert(KEY_JOURNAL_EPOCH, postcard::to_stdvec(&(self.journal.epoch() + 1))?.as_slice())?;
            // The log's new end: known from the appends, unless a truncation or purge moved it
            // (then read back, once). Commits that only hold a vote or meta leave it alone.
            if jobs.iter().any(|j| matches!(j, Job::Truncate { .. } | Job::Purge { .. })) {
                last = Some(last_id_in(&log, &meta)?);
            } else if let Some(Job::Append { entries, .. }) =
                jobs.iter().rev().find(|j| matches!(j, Job::Append { .. }))
            {
                last = entries.last().map(|(id, _)| Some(*id));
            }
        }
        txn.commit()?;
        Ok(last)
    }
}

fn logs_err(verb: ErrorVerb, e: impl std::fmt::Display) -> OpenraftStorageError {
    to_raft_err(ErrorSubject::Logs, verb, e)
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, OpenraftStorageError> {
        self.read_range(range, None).map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, OpenraftStorageError> {
        self.read_range(start..end, Some(self.max_batch_bytes)).map_err(|e| logs_err(ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = RedbLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, OpenraftStorageError> {
        let last_purged: Option<LogId> = self.read_meta(KEY_LAST_PURGED).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        let last_pending = self.pending().last_key_value().map(|(_, (id, _))| *id);
        let last = match last_pending {
            Some(id) => Some(id),
            None => self.last_durable_id().map_err(|e| logs_err(ErrorVerb::Read, e))?,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), OpenraftStorageError> {
        self.write_meta(KEY_VOTE, vote).await.map_err(|e| to_raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, OpenraftStorageError> {
        self.read_meta(KEY_VOTE).map_err(|e| to_raft_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), OpenraftStorageError> {
        let err = |e: String| to_raft_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let value = postcard::to_stdvec(&committed).map_err(|e| err(e.to_string()))?;
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(committed);
        self.writer.send(Job::Committed { value }).map_err(|_| err("log writer stopped".into()))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, OpenraftStorageError> {
        if let Some(c) = *self.committed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(c);
        }
        let c: Option<Option<LogId>> =
            self.read_meta(KEY_COMMITTED).map_err(|e| to_raft_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), OpenraftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let early = self.own_fresh_entries(&entries);
        let mut encoded = Vec::with_capacity(entries.len());
        for entry in &entries {
            let bytes = postcard::to_stdvec(entry).map_err(|e| logs_err(ErrorVerb::Write, e))?;
            encoded.push((*entry.get_log_id(), bytes));
        }
        {
            let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
            for (id, bytes) in &encoded {
                sizes.insert(id.index, bytes.len());
            }
        }
        // Readable at once (openraft requires it), durable when the writer acknowledges.
        {
            let mut pending = self.pending();
            for (id, bytes) in &encoded {
                pending.insert(id.index, (*id, bytes.clone()));
            }
        }
        let (callback, early) = if early { (None, Some(callback)) } else { (Some(callback), None) };
        self.writer
            .send(Job::Append { entries: encoded, callback })
            .map_err(|_| logs_err(ErrorVerb::Write, "log writer stopped"))?;
        // The leader's own entries: durable in the background; see the module docs for why
        // nothing acts on them before.
        if let Some(callback) = early {
            callback.log_io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), OpenraftStorageError> {
        self.pending().split_off(&log_id.index);
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).truncate(log_id.index);
        self.run_job(|done| Job::Truncate { from: log_id.index, done })
            .await
            .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), OpenraftStorageError> {
        {
            let mut pending = self.pending();
            let keep = pending.split_off(&(log_id.index + 1));
            *pending = keep;
        }
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).purge(log_id.index);
        self.run_job(|done| Job::Purge { upto: log_id, done }).await.map_err(|e| logs_err(ErrorVerb::Delete, e))
    }
}
