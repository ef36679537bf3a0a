//! The key-value state machine of one shard in redb (`shard-N/state-machine.db`).
//!
//! Owns: the key space (value, create/mod revision, version per key), the client session table
//! for exactly-once writes, `last_applied`, the last membership, and the current snapshot file.
//!
//! Durability: applies commit with `Durability::None` — allowed only because the Raft log is
//! durable and openraft re-applies the log after the durable `last_applied` on restart.
//! `build_snapshot` first forces a durable commit (openraft purges the log up to the snapshot),
//! and `install_snapshot` replaces the whole state in one durable transaction, so a crash leaves
//! the old or the new state, never a mix.
//!
//! Never: make a decision that differs between replicas (no local clock, no randomness; session
//! expiry uses the leader's timestamp carried in the log entry).

use std::{
    io::Cursor,
    ops::Bound,
    path::{Path, PathBuf},
    sync::Arc,
};

use openraft::{
    storage::RaftStateMachine, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftSnapshotBuilder,
    Snapshot,
};
use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    begin_write, open_db, open_db_with_backend, to_raft_err, ApplyResult, Entry, LogId, OpenraftStorageError,
    SnapshotMeta, StorageError, StoredMembership, TypeConfig, WriteRequest,
};
use crate::api::{BatchOp, KeyValue, WriteCommand, WriteOutcome};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// client id → last write of that session.
const SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("sessions");
/// (last seen timestamp, client id) → (): expiry order of sessions.
const SESSION_AGE: TableDefinition<(u64, u128), ()> = TableDefinition::new("session_age");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_CLOCK: &str = "clock";

/// A session idle for longer than this (by the leaders' clocks in the log) is forgotten.
pub const SESSION_TTL_MS: u64 = 60 * 60 * 1000;
/// At most this many sessions are remembered; the least recently used go first.
pub const MAX_SESSIONS: u64 = 100_000;

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// A key's stored record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredValue {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

/// The last write of one client session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SessionRecord {
    seq: u64,
    outcome: WriteOutcome,
    last_seen_ms: u64,
}

/// Everything a snapshot carries (its bytes are this, postcard-encoded).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    kv: Vec<(Vec<u8>, StoredValue)>,
    sessions: Vec<(u128, SessionRecord)>,
    clock_ms: u64,
}

/// A snapshot as kept on disk: its metadata and its bytes.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// Read access to a shard's applied state, shared with the request path.
#[derive(Clone, Debug)]
pub struct StateReader {
    db: Arc<redb::Database>,
}

impl StateReader {
    /// The current value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        match table.get(key)? {
            Some(v) => Ok(Some(to_kv(key.to_vec(), postcard::from_bytes(v.value())?))),
            None => Ok(None),
        }
    }

    /// Keys in `(lower, upper)` in order: at most `limit` of them, and none after their keys and
    /// values reach `max_bytes` (so at least one key is returned if there is one).
    pub fn range(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        let mut out = Vec::new();
        if let (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) = (lower, upper) {
            if l > u {
                return Ok(out);
            }
        }
        let mut bytes = 0usize;
        for item in table.range::<&[u8]>((lower, upper))? {
            if out.len() >= limit || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            let (k, v) = item?;
            let kv = to_kv(k.value().to_vec(), postcard::from_bytes(v.value())?);
            bytes += kv.key.len() + kv.value.len();
            out.push(kv);
        }
        Ok(out)
    }

    /// The log id of the last applied entry (durable or not).
    pub fn last_applied(&self) -> Result<Option<LogId>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        read_meta(&table, KEY_LAST_APPLIED)
    }

    /// Number of keys stored.
    pub fn key_count(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(KV)?.len()?)
    }
}

fn to_kv(key: Vec<u8>, s: StoredValue) -> KeyValue {
    KeyValue {
        key,
        value: s.value,
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StorageError> {
    match table.get(key)? {
        Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
        None => Ok(None),
    }
}

/// Serializes writes of the snapshot file (the builder task and the state machine worker may
/// both write one) and remembers the last log id of the file on disk, so an older snapshot never
/// replaces a newer one.
type SnapshotFileGuard = Arc<std::sync::Mutex<Option<LogId>>>;

/// The redb-backed state machine of one shard.
#[derive(Debug)]
pub struct RedbStateMachine {
    db: Arc<redb::Database>,
    dir: PathBuf,
    snapshot_guard: SnapshotFileGuard,
}

impl RedbStateMachine {
    /// Opens or creates the state machine at `path`; snapshots are kept beside it.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Self::from_db(open_db(path)?, dir)
    }

    /// Opens or creates the state machine on any redb storage backend (tests put it on a
    /// simulated disk); the snapshot file is kept in `snapshot_dir` on the real file system.
    pub fn open_with_backend(backend: impl redb::StorageBackend, snapshot_dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(snapshot_dir)?;
        Self::from_db(open_db_with_backend(backend)?, snapshot_dir.to_path_buf())
    }

    fn from_db(db: redb::Database, dir: PathBuf) -> Result<Self, StorageError> {
        let txn = begin_write(&db, Durability::Immediate)?;
        txn.open_table(KV)?;
        txn.open_table(SESSIONS)?;
        txn.open_table(SESSION_AGE)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(RedbStateMachine { db: Arc::new(db), dir, snapshot_guard: Default::default() })
    }

    /// A read handle for the request path.
    pub fn reader(&self) -> StateReader {
        StateReader { db: self.db.clone() }
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }
}

#[cfg(test)]
impl RedbStateMachine {
    /// Everything the state machine holds (including the session expiry index), canonically
    /// encoded: two replicas in the same state have equal fingerprints.
    pub(crate) fn fingerprint(&self) -> Result<Vec<u8>, StorageError> {
        let txn = self.db.begin_read()?;
        let (last_applied, membership, data) = read_snapshot_payload(&txn)?;
        let mut ages = Vec::new();
        for item in txn.open_table(SESSION_AGE)?.iter()? {
            ages.push(item?.0.value());
        }
        Ok(postcard::to_stdvec(&(last_applied, membership, data, ages))?)
    }
}

/// Applies a batch of entries in one transaction. Returns one result per entry.
fn apply_entries(db: &redb::Database, entries: Vec<Entry>) -> Result<Vec<ApplyResult>, StorageError> {
    let txn = begin_write(db, Durability::None)?;
    let mut results = Vec::with_capacity(entries.len());
    {
        let mut kv = txn.open_table(KV)?;
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut ages = txn.open_table(SESSION_AGE)?;
        let mut meta = txn.open_table(META)?;
        let mut clock: u64 = read_meta(&meta, KEY_CLOCK)?.unwrap_or(0);
        let mut last_applied: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        for entry in entries {
            let log_id = *entry.get_log_id();
            last_applied = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(ApplyResult(None)),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                    results.push(ApplyResult(None));
                }
                EntryPayload::Normal(req) => {
                    clock = clock.max(req.timestamp_ms);
                    // Expire per entry (not per batch): replicas batch entries differently, and
                    // every replica must make the same dedup decision for every entry.
                    expire_sessions(&mut sessions, &mut ages, clock)?;
                    let outcome = apply_write(&mut kv, &mut sessions, &mut ages, log_id.index, req)?;
                    results.push(ApplyResult(Some(outcome)));
                }
            }
        }
        meta.insert(KEY_CLOCK, postcard::to_stdvec(&clock)?.as_slice())?;
        if let Some(la) = last_applied {
            meta.insert(KEY_LAST_APPLIED, postcard::to_stdvec(&la)?.as_slice())?;
        }
        if let Some(m) = membership {
            meta.insert(KEY_MEMBERSHIP, postcard::to_stdvec(&m)?.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(results)
}

type KvTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

fn apply_write(
    kv: &mut KvTable<'_>,
    sessions: &mut redb::Table<'_, u128, &'static [u8]>,
    ages: &mut redb::Table<'_, (u64, u128), ()>,
    revision: u64,
    req: WriteRequest,
) -> Result<WriteOutcome, StorageError> {
    let client = u128::from_be_bytes(req.session.client_id.0);
    let previous: Option<SessionRecord> = match sessions.get(client)? {
        Some(v) => Some(postcard::from_bytes(v.value())?),
        None => None,
    };
    if let Some(prev) = &previous {
        if req.session.seq == prev.seq {
            // A retry of a write that was applied already: answer with its first outcome.
            return Ok(prev.outcome.clone());
        }
        if req.session.seq < prev.seq {
            return Ok(WriteOutcome::StaleSequence { last_seq: prev.seq });
        }
    }
    let outcome = match req.command {
        WriteCommand::Put { key, value } => {
            put(kv, &key, value, revision)?;
            WriteOutcome::Put { revision }
        }
        WriteCommand::Delete { key } => {
            let deleted = kv.remove(key.as_slice())?.is_some();
            WriteOutcome::Delete { revision, deleted }
        }
        WriteCommand::Cas { key, expected, new_value } => {
            let current: Option<Vec<u8>> = match kv.get(key.as_slice())? {
                Some(v) => Some(postcard::from_bytes::<StoredValue>(v.value())?.value),
                None => None,
            };
            if current == expected {
                put(kv, &key, new_value, revision)?;
                WriteOutcome::Cas { revision, succeeded: true, current: None }
            } else {
                WriteOutcome::Cas { revision, succeeded: false, current }
            }
        }
        WriteCommand::Batch { ops } => {
            for op in ops {
                match op {
                    BatchOp::Put { key, value } => put(kv, &key, value, revision)?,
                    BatchOp::Delete { key } => {
                        kv.remove(key.as_slice())?;
                    }
                }
            }
            WriteOutcome::Batch { revision }
        }
    };
    if let Some(prev) = &previous {
        ages.remove((prev.last_seen_ms, client))?;
    }
    let record = SessionRecord { seq: req.session.seq, outcome: outcome.clone(), last_seen_ms: req.timestamp_ms };
    sessions.insert(client, postcard::to_stdvec(&record)?.as_slice())?;
    ages.insert((req.timestamp_ms, client), ())?;
    Ok(outcome)
}

fn put(kv: &mut KvTable<'_>, key: &[u8], value: Vec<u8>, revision: u64) -> Result<(), StorageError> {
    let old: Option<StoredValue> = match kv.get(key)? {
        Some(v) => Some(postcard::from_bytes(v.value())?),
        None => None,
    };
    let stored = match old {
        Some(o) => {
            StoredValue { value, create_revision: o.create_revision, mod_revision: revision, version: o.version + 1 }
        }
        None => StoredValue { value, create_revision: revision, mod_revision: revision, version: 1 },
    };
    kv.insert(key, postcard::to_stdvec(&stored)?.as_slice())?;
    Ok(())
}

/// Forgets sessions idle longer than [`SESSION_TTL_MS`] and the oldest beyond [`MAX_SESSIONS`].
fn expire_sessions(
    sessions: &mut redb::Table<'_, u128, &'static [u8]>,
    ages: &mut redb::Table<'_, (u64, u128), ()>,
    clock: u64,
) -> Result<(), StorageError> {
    let cutoff = clock.saturating_sub(SESSION_TTL_MS);
    loop {
        let over = sessions.len()? > MAX_SESSIONS;
        let oldest = match ages.first()? {
            Some((k, _)) => k.value(),
            None => break,
        };
        if oldest.0 >= cutoff && !over {
            break;
        }
        ages.remove(oldest)?;
        sessions.remove(oldest.1)?;
    }
    Ok(())
}

/// Builds the snapshot bytes from a consistent read of the whole state.
fn read_snapshot_payload(
    txn: &redb::ReadTransaction,
) -> Result<(Option<LogId>, StoredMembership, Vec<u8>), StorageError> {
    let meta = txn.open_table(META)?;
    let last_applied: Option<LogId> = read_meta(&meta, KEY_LAST_APPLIED)?;
    let membership: StoredMembership = read_meta(&meta, KEY_MEMBERSHIP)?.unwrap_or_default();
    let clock_ms: u64 = read_meta(&meta, KEY_CLOCK)?.unwrap_or(0);
    let mut payload = SnapshotPayload { kv: Vec::new(), sessions: Vec::new(), clock_ms };
    for item in txn.open_table(KV)?.iter()? {
        let (k, v) = item?;
        payload.kv.push((k.value().to_vec(), postcard::from_bytes(v.value())?));
    }
    for item in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = item?;
        payload.sessions.push((k.value(), postcard::from_bytes(v.value())?));
    }
    Ok((last_applied, membership, postcard::to_stdvec(&payload)?))
}

/// Replaces the whole state with a snapshot's, in one durable transaction.
fn install_payload(db: &redb::Database, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
    let payload: SnapshotPayload = postcard::from_bytes(data)?;
    let txn = begin_write(db, Durability::Immediate)?;
    txn.delete_table(KV)?;
    txn.delete_table(SESSIONS)?;
    txn.delete_table(SESSION_AGE)?;
    {
        let mut kv = txn.open_table(KV)?;
        for (k, v) in &payload.kv {
            kv.insert(k.as_slice(), postcard::to_stdvec(v)?.as_slice())?;
        }
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut ages = txn.open_table(SESSION_AGE)?;
        for (id, rec) in &payload.sessions {
            sessions.insert(*id, postcard::to_stdvec(rec)?.as_slice())?;
            ages.insert((rec.last_seen_ms, *id), ())?;
        }
        let mut m = txn.open_table(META)?;
        m.insert(KEY_CLOCK, postcard::to_stdvec(&payload.clock_ms)?.as_slice())?;
        // Stored as a plain `LogId` everywhere (not `Option<LogId>`).
        match &meta.last_log_id {
            Some(l) => {
                m.insert(KEY_LAST_APPLIED, postcard::to_stdvec(l)?.as_slice())?;
            }
            None => {
                m.remove(KEY_LAST_APPLIED)?;
            }
        }
        m.insert(KEY_MEMBERSHIP, postcard::to_stdvec(&meta.last_membership)?.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// Writes the snapshot file atomically (temp file, fsync, rename, fsync dir), unless the file
/// on disk is already newer.
fn write_snapshot_file(dir: &Path, file: &SnapshotFile, guard: &SnapshotFileGuard) -> Result<(), StorageError> {
    use std::io::Write;
    let mut current = guard.lock().unwrap_or_else(|p| p.into_inner());
    if current.is_some() && *current > file.meta.last_log_id {
        return Ok(());
    }
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.{}.tmp", file.meta.snapshot_id));
    let bytes = postcard::to_stdvec(file)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    *current = file.meta.last_log_id;
    Ok(())
}

fn read_snapshot_file(path: &Path) -> Result<Option<SnapshotFile>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> OpenraftStorageError {
    to_raft_err(ErrorSubject::StateMachine, verb, e)
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> OpenraftStorageError {
    to_raft_err(ErrorSubject::Snapshot(None), verb, e)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await?
}

/// Builds snapshots: a durable flush, a consistent read, then the snapshot file.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<redb::Database>,
    dir: PathBuf,
    snapshot_guard: SnapshotFileGuard,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, OpenraftStorageError> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let guard = self.snapshot_guard.clone();
        let (meta, data) = blocking(move || {
            // Read first, then make durable: `apply` runs concurrently, and a durable commit
            // persists every earlier commit, so everything this read sees is on disk before
            // openraft may purge the log behind the snapshot.
            let read = db.begin_read()?;
            let txn = begin_write(&db, Durability::Immediate)?;
            txn.commit()?;
            let (last_applied, membership, data) = read_snapshot_payload(&read)?;
            let snapshot_id = match last_applied {
                Some(l) => format!("{}-{}-{:016x}", l.leader_id.term, l.index, rand::random::<u64>()),
                None => format!("empty-{:016x}", rand::random::<u64>()),
            };
            let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
            let file = SnapshotFile { meta, data };
            write_snapshot_file(&dir, &file, &guard)?;
            Ok((file.meta, file.data))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for RedbStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), OpenraftStorageError> {
        let db = self.db.clone();
        (|| -> Result<_, StorageError> {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let last_applied: Option<LogId> = read_meta(&meta, KEY_LAST_APPLIED)?;
            let membership: StoredMembership = read_meta(&meta, KEY_MEMBERSHIP)?.unwrap_or_default();
            Ok((last_applied, membership))
        })()
        .map_err(|e| sm_err(ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, OpenraftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        blocking(move || apply_entries(&db, entries)).await.map_err(|e| sm_err(ErrorVerb::Write, e))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), dir: self.dir.clone(), snapshot_guard: self.snapshot_guard.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, OpenraftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), OpenraftStorageError> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let guard = self.snapshot_guard.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        blocking(move || {
            install_payload(&db, &meta, &data)?;
            write_snapshot_file(&dir, &SnapshotFile { meta, data }, &guard)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, OpenraftStorageError> {
        let path = self.snapshot_path();
        let file = blocking(move || read_snapshot_file(&path)).await.map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(file.map(|f| Snapshot { meta: f.meta, snapshot: Box::new(Cursor::new(f.data)) }))
    }
}
