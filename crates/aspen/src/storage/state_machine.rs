//! The key-value state machine of one shard in redb (`shard-N/state-machine.db`).
//!
//! Owns: the key space (value, create/mod revision, version per key) and how each write command
//! changes it (put, delete, CAS, batch, prefix delete, txn with its compares; docs/design.md
//! §6.3), the client session table for exactly-once writes, `last_applied`, the last
//! membership, and the current snapshot file. Every read and write reaches the file through
//! `db_file`'s handle, which a defragmentation swaps (§6.6).
//!
//! Durability: applies commit with `Durability::None` — allowed only because the Raft log is
//! durable and openraft re-applies the log after the durable `last_applied` on restart.
//! `build_snapshot` first forces a durable commit (openraft purges the log up to the snapshot),
//! and `install_snapshot` replaces the whole state in one durable transaction, so a crash leaves
//! the old or the new state, never a mix.
//!
//! Never: make a decision that differs between replicas (no local clock, no randomness; session
//! expiry uses the leader's timestamp carried in the log entry).
//!
//! # State digest
//!
//! Every replica keeps a digest of its replicated state so that tests (and operators, through
//! `cluster status`) can check that replicas are equal, not only that a leader answers. It is a
//! function of the logical state alone (never of redb's pages), so every replica that applied the
//! same log has the same digest, whether it applied entry by entry or installed a snapshot.
//!
//! All integers below are little-endian; `len(x)` is `x`'s length as a `u64`;
//! `H(context, bytes)` is BLAKE3 in key-derivation mode (`blake3::derive_key`-style hasher made
//! with `Hasher::new_derive_key(context)`).
//!
//! - a key: `H("aspen state digest v1 kv", len(key) ‖ key ‖ len(value) ‖ value ‖ create_revision ‖
//!   mod_revision ‖ version)`;
//! - a client session: `H("aspen state digest v1 session", client_id (16 bytes as stored) ‖ seq ‖
//!   last_seen_ms ‖ len(o) ‖ o)` with `o` the postcard encoding of the session's last outcome;
//! - `sum`: the sum modulo 2^256 of the item hashes of every key and every session, each hash read
//!   as a 256-bit little-endian integer. Addition is order-independent and, unlike XOR, does not
//!   cancel equal items. It is kept incrementally in the `meta` table (`digest_sum`), in the same
//!   write transaction as every apply (subtract the old item's hash, add the new one), rebuilt
//!   from the items on snapshot install and when a database without it is opened;
//! - the digest: `H("aspen state digest v1", a ‖ clock_ms ‖ len(m) ‖ m ‖ sum)` where `a` is the
//!   byte 0 if nothing was applied, else the byte 1 followed by the `last_applied` index, and `m`
//!   is the postcard encoding of the last membership (default if none).
//!
//! The session expiry index (`session_age`) is derived from the sessions and not hashed
//! separately. [`StateReader::digest`] reads `last_applied`, clock, membership and `sum` in one
//! read transaction, so a digest always describes exactly the index it names;
//! [`StateReader::recompute_digest`] recomputes `sum` from the items instead (O(n)), to check the
//! incremental one.

use std::{
    ops::Bound,
    path::{Path, PathBuf},
    sync::Arc,
};

use openraft::{
    storage::RaftStateMachine, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftSnapshotBuilder,
    Snapshot,
};
use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    begin_write,
    leases::{
        self, lease_item_hash, tombstone_item_hash, LeaseChange, LeaseDeadlines, LeaseRecord, LEASES, LEASE_KEYS,
        TOMBSTONES, TOMBSTONE_AGE,
    },
    log_store::{wait_durable, DurableWatch},
    open_db, open_db_with_backend, to_raft_err,
    watch::WatchHub,
    StorageError,
};
use crate::api::{
    raft::{
        ApplyResult, Entry, LogId, OpenraftStorageError, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
        WriteBatch, WriteRequest,
    },
    BatchOp, Compare, EventKind, KeyValue, StateDigest, TxnOp, TxnOpResult, WatchEvent, WriteCommand, WriteOutcome,
    STRICT_SEQ_BASE,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// client id → last write of that session.
const SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("sessions");
/// (last seen timestamp, client id) → (): expiry order of sessions.
const SESSION_AGE: TableDefinition<(u64, u128), ()> = TableDefinition::new("session_age");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_CLOCK: &str = "clock";
/// The 32-byte sum of item hashes (see the module docs).
const KEY_DIGEST_SUM: &str = "digest_sum";

const DIGEST_CONTEXT: &str = "aspen state digest v1";
const DIGEST_KV_CONTEXT: &str = "aspen state digest v1 kv";
const DIGEST_SESSION_CONTEXT: &str = "aspen state digest v1 session";

/// Room on the disk an apply asks for per write beyond its keys and values (`storage::space`):
/// its session record, revisions, index entries.
const APPLY_SPACE_PER_WRITE: usize = 256;

/// A session idle for longer than this (by the leaders' clocks in the log) is forgotten.
pub const SESSION_TTL_MS: u64 = 60 * 60 * 1000;
/// At most this many sessions are remembered; the least recently used go first.
pub const MAX_SESSIONS: u64 = 100_000;
/// At most this many sessions per namespace — a session id's high 64 bits, which for a client's
/// session are its token's id (`auth::bind_session`): one token's new sessions beyond it push
/// out one of that token's own sessions, never another token's.
pub const MAX_SESSIONS_PER_TOKEN: u64 = 10_000;
/// namespace → how many sessions it holds (derived from `sessions`, rebuilt with it).
const SESSION_NS: TableDefinition<u64, u64> = TableDefinition::new("session_ns");

pub mod backup;
mod db_file;
mod kv;
mod snapshot;

pub use db_file::Defragmented;
use db_file::{SmDb, SmRead};

pub use kv::MAX_RANGE_ANSWER_BYTES;

pub use snapshot::IncomingSnapshot;

/// The whole-state snapshot file older versions kept beside the database (removed at open).
const LEGACY_SNAPSHOT_FILE: &str = "snapshot.bin";

/// A key's stored record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredValue {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    /// The lease the key is attached to (0: none).
    lease: u64,
}

/// A key's record as written before leases existed (read, never written).
#[derive(Deserialize)]
struct StoredValueV1 {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

impl From<StoredValueV1> for StoredValue {
    fn from(v: StoredValueV1) -> Self {
        StoredValue {
            value: v.value,
            create_revision: v.create_revision,
            mod_revision: v.mod_revision,
            version: v.version,
            lease: 0,
        }
    }
}

/// Decodes a key's record, also in the format written before leases existed.
fn decode_value(bytes: &[u8]) -> Result<StoredValue, StorageError> {
    match postcard::from_bytes::<StoredValue>(bytes) {
        Ok(v) => Ok(v),
        Err(e) => postcard::from_bytes::<StoredValueV1>(bytes).map(Into::into).map_err(|_| e.into()),
    }
}

/// The last write of one client session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SessionRecord {
    seq: u64,
    outcome: WriteOutcome,
    last_seen_ms: u64,
}

/// Read access to a shard's applied state, shared with the request path.
#[derive(Clone, Debug)]
pub struct StateReader {
    db: Arc<SmDb>,
}

impl StateReader {
    /// Starts receiving the snapshot `meta` into this state machine's staging tables, deleting
    /// what an unfinished transfer staged (blocking; docs/design.md §6.4).
    pub fn receive_snapshot(&self, meta: SnapshotMeta) -> Result<IncomingSnapshot, StorageError> {
        IncomingSnapshot::begin(self.db.clone(), meta)
    }

    /// The state machine's file (`None`: not on a file, e.g. a simulated disk in tests).
    pub fn file_path(&self) -> Option<&Path> {
        self.db.file_path()
    }

    /// Rewrites this replica's state machine file in key order and swaps it in (blocking): the
    /// shard's writes on this node wait meanwhile, reads do not (docs/design.md §6.6).
    pub fn defragment(&self) -> Result<Defragmented, StorageError> {
        db_file::defragment(&self.db)
    }

    /// An etcd-shaped range read (`api::kv`), with the revision it saw.
    pub fn kv_range(&self, query: &crate::api::RangeQuery) -> Result<crate::api::RangePage, StorageError> {
        kv::read_range(&self.db.db(), query)
    }

    /// An etcd-shaped txn that writes nothing, evaluated on one read of the state: the revision
    /// read, the branch taken, and its results.
    pub fn kv_txn_read(
        &self,
        txn: crate::api::KvTxn,
    ) -> Result<(crate::api::Revision, bool, Vec<crate::api::KvOpResult>), StorageError> {
        kv::read_txn(&self.db.db(), txn)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StorageError> {
        #[cfg(feature = "fault-injection")]
        if key == PANIC_IN_READ_KEY {
            panic!("injected: a read of the key that fails (a stand-in for a damaged page)");
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        match table.get(key)? {
            Some(v) => Ok(Some(to_kv(key.to_vec(), decode_value(v.value())?))),
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
        self.range_filtered(lower, upper, limit, max_bytes, false)
    }

    /// [`Self::range`], passing over the reserved keys (`crate::api::RESERVED_PREFIX`) when
    /// `skip_reserved`.
    pub fn range_filtered(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
        max_bytes: usize,
        skip_reserved: bool,
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
            if skip_reserved && crate::api::is_reserved_key(k.value()) {
                continue;
            }
            let kv = to_kv(k.value().to_vec(), decode_value(v.value())?);
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

    /// The session clock applied so far (ms; 0: no write applied yet).
    pub fn clock(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(read_meta(&table, KEY_CLOCK)?.unwrap_or(0))
    }

    /// Number of keys stored.
    pub fn key_count(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(KV)?.len()?)
    }

    /// Bytes of data this replica stores, as redb reports them: keys and values, client sessions,
    /// leases and their key lists, lease tombstones (stored plus tree bytes; not free or
    /// fragmented pages). Reads every page of those tables: call it seldom (`cluster::alarm`).
    pub fn stored_bytes(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        let mut total = 0;
        let mut add = |stats: redb::TableStats| total += stats.stored_bytes() + stats.metadata_bytes();
        add(txn.open_table(KV)?.stats()?);
        add(txn.open_table(SESSIONS)?.stats()?);
        add(txn.open_table(LEASES)?.stats()?);
        add(txn.open_table(LEASE_KEYS)?.stats()?);
        add(txn.open_table(TOMBSTONES)?.stats()?);
        Ok(total)
    }

    /// The digest of the applied state and the index it describes, read in one transaction
    /// (O(1): the incrementally kept sum).
    pub fn digest(&self) -> Result<StateDigest, StorageError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let sum = read_sum(&meta)?.ok_or_else(|| StorageError::Corrupt("state digest sum missing".into()))?;
        final_digest(&meta, &sum)
    }

    /// The same digest, with the sum recomputed from every stored key and session (O(n)); equal
    /// to [`Self::digest`] unless the incremental sum went wrong.
    pub fn recompute_digest(&self) -> Result<StateDigest, StorageError> {
        let txn = self.db.begin_read()?;
        let sum = sum_of_tables(
            &txn.open_table(KV)?,
            &txn.open_table(SESSIONS)?,
            &txn.open_table(LEASES)?,
            &txn.open_table(TOMBSTONES)?,
        )?;
        final_digest(&txn.open_table(META)?, &sum)
    }

    /// Lease `id`, if this shard is its home and it was not forgotten.
    pub fn lease(&self, id: u64) -> Result<Option<LeaseRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LEASES)?;
        table.get(id)?.map(|v| leases::decode_record(v.value())).transpose()
    }

    /// Every lease whose home is this shard, by id.
    pub fn leases(&self) -> Result<Vec<(u64, LeaseRecord)>, StorageError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in txn.open_table(LEASES)?.iter()? {
            let (k, v) = item?;
            out.push((k.value(), leases::decode_record(v.value())?));
        }
        Ok(out)
    }

    /// This shard's keys attached to lease `id`, in key order.
    pub fn lease_keys(&self, id: u64) -> Result<Vec<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        leases::keys_of(&txn.open_table(LEASE_KEYS)?, id)
    }
}

/// A 256-bit integer (four little-endian `u64` limbs), added and subtracted modulo 2^256.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DigestSum([u64; 4]);

impl DigestSum {
    fn limbs(h: &[u8; 32]) -> [u64; 4] {
        let mut out = [0u64; 4];
        for (i, limb) in out.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i * 8..i * 8 + 8]);
            *limb = u64::from_le_bytes(b);
        }
        out
    }

    fn add(&mut self, h: &[u8; 32]) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(Self::limbs(h)) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(carry as u64);
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, h: &[u8; 32]) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(Self::limbs(h)) {
            let (d1, b1) = a.overflowing_sub(b);
            let (d2, b2) = d1.overflowing_sub(borrow as u64);
            *a = d2;
            borrow = b1 || b2;
        }
    }

    fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, StorageError> {
        let h: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| StorageError::Corrupt(format!("state digest sum of {} bytes", bytes.len())))?;
        Ok(DigestSum(Self::limbs(h)))
    }
}

fn update_len_prefixed(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The item hash of one key (see the module docs).
fn kv_item_hash(key: &[u8], v: &StoredValue) -> [u8; 32] {
    let mut h = crate::api::derive_key_hasher!(DIGEST_KV_CONTEXT);
    update_len_prefixed(&mut h, key);
    update_len_prefixed(&mut h, &v.value);
    h.update(&v.create_revision.to_le_bytes());
    h.update(&v.mod_revision.to_le_bytes());
    h.update(&v.version.to_le_bytes());
    // Only when attached: a key without a lease hashes as it did before leases existed.
    if v.lease != 0 {
        h.update(&v.lease.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The item hash of one client session (see the module docs).
fn session_item_hash(client: u128, rec: &SessionRecord) -> Result<[u8; 32], StorageError> {
    let mut h = crate::api::derive_key_hasher!(DIGEST_SESSION_CONTEXT);
    h.update(&client.to_be_bytes());
    h.update(&rec.seq.to_le_bytes());
    h.update(&rec.last_seen_ms.to_le_bytes());
    update_len_prefixed(&mut h, &postcard::to_stdvec(&rec.outcome)?);
    Ok(*h.finalize().as_bytes())
}

fn read_sum(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Option<DigestSum>, StorageError> {
    match meta.get(KEY_DIGEST_SUM)? {
        Some(v) => Ok(Some(DigestSum::from_bytes(v.value())?)),
        None => Ok(None),
    }
}

fn write_sum(meta: &mut redb::Table<'_, &'static str, &'static [u8]>, sum: &DigestSum) -> Result<(), StorageError> {
    meta.insert(KEY_DIGEST_SUM, sum.to_bytes().as_slice())?;
    Ok(())
}

/// The sum over every stored key, session, lease and tombstone.
fn sum_of_tables(
    kv: &impl ReadableTable<&'static [u8], &'static [u8]>,
    sessions: &impl ReadableTable<u128, &'static [u8]>,
    lease_records: &impl ReadableTable<u64, &'static [u8]>,
    tombstones: &impl ReadableTable<u64, u64>,
) -> Result<DigestSum, StorageError> {
    let mut sum = DigestSum::default();
    for item in lease_records.iter()? {
        let (k, v) = item?;
        sum.add(&lease_item_hash(k.value(), &leases::decode_record(v.value())?));
    }
    for item in tombstones.iter()? {
        let (k, v) = item?;
        sum.add(&tombstone_item_hash(k.value(), v.value()));
    }
    for item in kv.iter()? {
        let (k, v) = item?;
        sum.add(&kv_item_hash(k.value(), &decode_value(v.value())?));
    }
    for item in sessions.iter()? {
        let (k, v) = item?;
        sum.add(&session_item_hash(k.value(), &postcard::from_bytes(v.value())?)?);
    }
    Ok(sum)
}

/// The digest from the meta table's `last_applied`, clock and membership, and `sum`.
fn final_digest(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    sum: &DigestSum,
) -> Result<StateDigest, StorageError> {
    let last_applied: Option<LogId> = read_meta(meta, KEY_LAST_APPLIED)?;
    let clock: u64 = read_meta(meta, KEY_CLOCK)?.unwrap_or(0);
    let membership: StoredMembership = read_meta(meta, KEY_MEMBERSHIP)?.unwrap_or_default();
    let mut h = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
    match last_applied {
        Some(l) => {
            h.update(&[1]);
            h.update(&l.index.to_le_bytes());
        }
        None => {
            h.update(&[0]);
        }
    }
    h.update(&clock.to_le_bytes());
    update_len_prefixed(&mut h, &postcard::to_stdvec(&membership)?);
    h.update(&sum.to_bytes());
    Ok(StateDigest { applied_index: last_applied.map(|l| l.index).unwrap_or(0), digest: *h.finalize().as_bytes() })
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

/// The redb-backed state machine of one shard.
#[derive(Debug)]
pub struct RedbStateMachine {
    db: Arc<SmDb>,
    /// Where snapshot temp files are made.
    dir: PathBuf,
    /// When set, an entry is applied only once the Raft log holds it durably.
    log: Option<DurableWatch>,
    /// The deadlines of the leases whose home is this shard, kept in step with apply.
    deadlines: Arc<LeaseDeadlines>,
    /// Where apply publishes its events for watches (none: events are not collected).
    hub: Option<Arc<WatchHub>>,
    /// The shard's metrics: apply times, snapshots built, installed and sent.
    metrics: Arc<crate::metrics::ShardMetrics>,
    /// Applies wait here for room on the disk rather than fail (`storage::space`).
    space: Option<super::space::SpaceGate>,
}

impl RedbStateMachine {
    /// Opens or creates the state machine at `path`, with a page cache of `cache_bytes`;
    /// snapshots are kept beside it.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StorageError> {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        db_file::remove_leftover(path)?;
        Self::from_db(open_db(path, cache_bytes)?, dir, Some((path.to_path_buf(), cache_bytes)))
    }

    /// Opens or creates the state machine on any redb storage backend (tests put it on a
    /// simulated disk); the snapshot file is kept in `snapshot_dir` on the real file system.
    pub fn open_with_backend(backend: impl redb::StorageBackend, snapshot_dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(snapshot_dir)?;
        Self::from_db(open_db_with_backend(backend)?, snapshot_dir.to_path_buf(), None)
    }

    fn from_db(db: redb::Database, dir: PathBuf, file: Option<(PathBuf, usize)>) -> Result<Self, StorageError> {
        snapshot::remove_leftovers(&dir)?;
        let txn = begin_write(&db, Durability::Immediate)?;
        // A transfer a crash interrupted starts over.
        snapshot::drop_staging(&txn)?;
        txn.open_table(SESSION_AGE)?;
        txn.open_table(LEASE_KEYS)?;
        txn.open_table(TOMBSTONE_AGE)?;
        {
            let kv = txn.open_table(KV)?;
            let sessions = txn.open_table(SESSIONS)?;
            let lease_records = txn.open_table(LEASES)?;
            let tombstones = txn.open_table(TOMBSTONES)?;
            let mut ns = txn.open_table(SESSION_NS)?;
            // Written before per-token session counts existed: count what it holds.
            if ns.is_empty()? && !sessions.is_empty()? {
                count_namespaces(&sessions, &mut ns)?;
            }
            let mut meta = txn.open_table(META)?;
            // A new database, or one written before digests existed: sum what it holds.
            if read_sum(&meta)?.is_none() {
                write_sum(&mut meta, &sum_of_tables(&kv, &sessions, &lease_records, &tombstones)?)?;
            }
        }
        txn.commit()?;
        let sm = RedbStateMachine {
            db: Arc::new(SmDb::new(db, file)),
            dir,
            log: None,
            deadlines: Default::default(),
            hub: None,
            metrics: Default::default(),
            space: None,
        };
        sm.deadlines.reset(sm.reader().leases()?);
        Ok(sm)
    }

    /// The deadlines of the leases whose home is this shard (the shard's leader counts them).
    pub fn deadlines(&self) -> Arc<LeaseDeadlines> {
        self.deadlines.clone()
    }

    /// Publishes every applied change of shard `shard` to a [`WatchHub`] keeping at most
    /// `max_events` events and `max_bytes` bytes of history, whose watchers may fall `max_lag`
    /// batches behind; returns the hub.
    pub fn watch(
        &mut self,
        shard: crate::api::ShardId,
        max_events: usize,
        max_bytes: usize,
        max_lag: usize,
    ) -> Result<Arc<WatchHub>, StorageError> {
        let applied = self.reader().last_applied()?.map_or(0, |l| l.index);
        let hub = Arc::new(WatchHub::new(shard, applied, max_events, max_bytes, max_lag));
        self.hub = Some(hub.clone());
        Ok(hub)
    }

    /// Applies an entry only once `log` says the Raft log holds it durably: the leader's log
    /// store acknowledges its own appends before their fsync
    /// ([`super::RedbLogStore::overlap_own_appends`]), and no client may see a write the leader
    /// could still lose.
    pub fn wait_for_log(mut self, log: DurableWatch) -> Self {
        self.log = Some(log);
        self
    }

    /// Makes applies wait at `gate` for room on the disk rather than fail.
    pub fn wait_for_space(mut self, gate: super::space::SpaceGate) -> Self {
        self.space = Some(gate);
        self
    }

    /// Records apply times and snapshots into `metrics` (the shard's).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::ShardMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A read handle for the request path.
    pub fn reader(&self) -> StateReader {
        StateReader { db: self.db.clone() }
    }
}

#[cfg(test)]
impl RedbStateMachine {
    /// Everything the state machine holds (including the session expiry index and the state
    /// digest), canonically encoded: two replicas in the same state have equal fingerprints.
    /// Fails if the incrementally kept digest differs from a recount of the items.
    pub(crate) fn fingerprint(&self) -> Result<Vec<u8>, StorageError> {
        let txn = self.db.begin_read()?;
        let (last_applied, membership, data) = {
            let meta = txn.open_table(META)?;
            let last_applied: Option<LogId> = read_meta(&meta, KEY_LAST_APPLIED)?;
            let membership: StoredMembership = read_meta(&meta, KEY_MEMBERSHIP)?.unwrap_or_default();
            let clock: u64 = read_meta(&meta, KEY_CLOCK)?.unwrap_or(0);
            let mut kv = Vec::new();
            for item in txn.open_table(KV)?.iter()? {
                let (k, v) = item?;
                kv.push((k.value().to_vec(), decode_value(v.value())?));
            }
            let mut sessions: Vec<(u128, SessionRecord)> = Vec::new();
            for item in txn.open_table(SESSIONS)?.iter()? {
                let (k, v) = item?;
                sessions.push((k.value(), postcard::from_bytes(v.value())?));
            }
            let mut lease_records = Vec::new();
            for item in txn.open_table(LEASES)?.iter()? {
                let (k, v) = item?;
                lease_records.push((k.value(), leases::decode_record(v.value())?));
            }
            let mut tombstones = Vec::new();
            for item in txn.open_table(TOMBSTONES)?.iter()? {
                let (k, v) = item?;
                tombstones.push((k.value(), v.value()));
            }
            (last_applied, membership, postcard::to_stdvec(&(kv, sessions, clock, lease_records, tombstones))?)
        };
        let mut ages = Vec::new();
        for item in txn.open_table(SESSION_AGE)?.iter()? {
            ages.push(item?.0.value());
        }
        let meta = txn.open_table(META)?;
        let kept = read_sum(&meta)?.ok_or_else(|| StorageError::Corrupt("state digest sum missing".into()))?;
        let digest = final_digest(&meta, &kept)?;
        let recount = final_digest(
            &meta,
            &sum_of_tables(
                &txn.open_table(KV)?,
                &txn.open_table(SESSIONS)?,
                &txn.open_table(LEASES)?,
                &txn.open_table(TOMBSTONES)?,
            )?,
        )?;
        if digest != recount {
            return Err(StorageError::Corrupt(format!("state digest {digest} differs from a recount {recount}")));
        }
        Ok(postcard::to_stdvec(&(last_applied, membership, data, ages, digest.digest))?)
    }

    /// Adds a table the state machine does not know (as a newer version might have left).
    pub(crate) fn add_foreign_table(&self, name: &str) -> Result<(), StorageError> {
        let txn = begin_write(&self.db.writer(), Durability::Immediate)?;
        txn.open_table(TableDefinition::<u64, u64>::new(name))?.insert(1, 2)?;
        txn.commit()?;
        Ok(())
    }

    /// Removes the stored digest sum, as in a database written before digests existed.
    pub(crate) fn forget_digest_sum(&self) -> Result<(), StorageError> {
        let txn = begin_write(&self.db.writer(), Durability::Immediate)?;
        txn.open_table(META)?.remove(KEY_DIGEST_SUM)?;
        txn.commit()?;
        Ok(())
    }
}

/// Most client writes an `apply` call runs on the async task itself; bigger batches go to a
/// blocking thread. The hand-off to a blocking thread and back (two wake-ups and thread
/// switches per apply) cost more than the apply of a few dozen writes: at 64 clients, where an
/// entry holds ~20 writes, running them here took 6–11 % off a put's server CPU (benches/
/// RESULTS.md, Session 32). It was 8 before the write batcher made entries of ~20 writes.
const INLINE_APPLY_WRITES: usize = 64;
/// Most bytes of keys and values an `apply` call runs on the async task itself: large values
/// take long enough to copy that they go to a blocking thread whatever their number.
const INLINE_APPLY_BYTES: usize = 256 * 1024;

/// The client writes in `entries` (a prefix delete or a lease revocation counting as more than
/// run inline: it may delete any number of keys) and their keys' and values' bytes.
fn writes_in(entries: &[Entry]) -> (usize, usize) {
    let mut writes = 0;
    let mut bytes = 0;
    for e in entries {
        match &e.payload {
            EntryPayload::Normal(WriteBatch(reqs)) => {
                for w in reqs {
                    writes += match w.command {
                        WriteCommand::DeletePrefix { .. }
                        | WriteCommand::LeaseRevoke { .. }
                        | WriteCommand::LeaseDrop { .. } => INLINE_APPLY_WRITES + 1,
                        WriteCommand::Batch { ref ops } => ops.len(),
                        _ => 1,
                    };
                    bytes += w.command.payload_bytes();
                }
            }
            _ => writes += 1,
        }
    }
    (writes, bytes)
}

/// What an apply changed besides its results, for after it committed: leases (for
/// [`LeaseDeadlines`]) and, when collected, each entry's events (for the [`WatchHub`]).
#[derive(Default)]
struct Applied {
    changes: Vec<LeaseChange>,
    events: Vec<(u64, Vec<WatchEvent>)>,
    last_index: u64,
}

/// Fault injection only: a put of this key panics inside the apply, as redb does on a damaged
/// page, so that tests can check what a failing apply does to the shard.
#[cfg(feature = "fault-injection")]
pub const PANIC_IN_APPLY_KEY: &[u8] = b"\0aspen-fault:panic-in-apply";

/// Fault injection only: a read of this key panics inside the state machine's read, as redb does
/// on a damaged page, so that tests can check what a failing read does (a get of it, and a
/// snapshot or backup stream that reaches it).
#[cfg(feature = "fault-injection")]
pub const PANIC_IN_READ_KEY: &[u8] = b"\0aspen-fault:panic-in-read";

/// Fault injection only: the apply of an entry holding a put of this key waits while
/// [`STALL_APPLY`] is set, as an apply stuck on a slow or hung disk would, so that tests can check
/// how a stuck apply is reported.
#[cfg(feature = "fault-injection")]
pub const STALL_APPLY_KEY: &[u8] = b"\0aspen-fault:stall-apply";

/// Fault injection only: see [`STALL_APPLY_KEY`].
#[cfg(feature = "fault-injection")]
pub static STALL_APPLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Applies a batch of entries in one transaction. Returns one result per entry, and what else
/// changed ([`Applied`]; events only if `collect_events`).
fn apply_entries(
    db: &redb::Database,
    entries: Vec<Entry>,
    collect_events: bool,
) -> Result<(Vec<ApplyResult>, Applied), StorageError> {
    let txn = begin_write(db, Durability::None)?;
    let mut results = Vec::with_capacity(entries.len());
    let mut changes = Vec::new();
    let mut batches = Vec::new();
    let mut last_index = 0;
    {
        let mut kv = txn.open_table(KV)?;
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut ages = txn.open_table(SESSION_AGE)?;
        let mut ns = txn.open_table(SESSION_NS)?;
        // Opened by the first write that needs them (most applies touch no lease).
        let mut lease_tables: Option<LeaseTables<'_>> = None;
        let mut meta = txn.open_table(META)?;
        let mut clock: u64 = read_meta(&meta, KEY_CLOCK)?.unwrap_or(0);
        let mut sum = read_sum(&meta)?.ok_or_else(|| StorageError::Corrupt("state digest sum missing".into()))?;
        let mut last_applied: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        for entry in entries {
            let log_id = *entry.get_log_id();
            last_applied = Some(log_id);
            last_index = log_id.index;
            match entry.payload {
                EntryPayload::Blank => results.push(ApplyResult(Vec::new())),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                    results.push(ApplyResult(Vec::new()));
                }
                EntryPayload::Normal(WriteBatch(writes)) => {
                    let mut outcomes = Vec::with_capacity(writes.len());
                    let mut events = Vec::new();
                    for (place, req) in writes.into_iter().enumerate() {
                        #[cfg(feature = "fault-injection")]
                        if matches!(&req.command, crate::api::WriteCommand::Put { key, .. } if key == PANIC_IN_APPLY_KEY)
                        {
                            panic!("injected: a put of the key that fails its apply (a stand-in for a damaged page)");
                        }
                        clock = clock.max(req.timestamp_ms);
                        // Expire per write (not per apply call): replicas hand entries to apply
                        // in different groups, and every replica must make the same dedup
                        // decision for every write.
                        expire_sessions(&mut sessions, &mut ages, &mut ns, &mut sum, clock)?;
                        let mut tables = WriteTables {
                            kv: &mut kv,
                            sessions: &mut sessions,
                            ages: &mut ages,
                            ns: &mut ns,
                            txn: &txn,
                            lease_tables: &mut lease_tables,
                            sum: &mut sum,
                            clock,
                            changes: &mut changes,
                            events: collect_events.then_some(&mut events),
                        };
                        outcomes.push(apply_write(&mut tables, crate::api::write_revision(log_id.index, place), req)?);
                    }
                    results.push(ApplyResult(outcomes));
                    if !events.is_empty() {
                        batches.push((log_id.index, events));
                    }
                }
            }
        }
        meta.insert(KEY_CLOCK, postcard::to_stdvec(&clock)?.as_slice())?;
        write_sum(&mut meta, &sum)?;
        if let Some(la) = last_applied {
            meta.insert(KEY_LAST_APPLIED, postcard::to_stdvec(&la)?.as_slice())?;
        }
        if let Some(m) = membership {
            meta.insert(KEY_MEMBERSHIP, postcard::to_stdvec(&m)?.as_slice())?;
        }
    }
    txn.commit()?;
    Ok((results, Applied { changes, events: batches, last_index }))
}

type KvTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;
type SessionTable<'t> = redb::Table<'t, u128, &'static [u8]>;
type AgeTable<'t> = redb::Table<'t, (u64, u128), ()>;
type NsTable<'t> = redb::Table<'t, u64, u64>;

/// The tables a write changes, and the digest sum kept in step with them.
struct WriteTables<'a, 't> {
    kv: &'a mut KvTable<'t>,
    sessions: &'a mut SessionTable<'t>,
    ages: &'a mut AgeTable<'t>,
    ns: &'a mut NsTable<'t>,
    txn: &'t redb::WriteTransaction,
    lease_tables: &'a mut Option<LeaseTables<'t>>,
    sum: &'a mut DigestSum,
    /// The session clock of this write (ms, the leaders' stamps).
    clock: u64,
    changes: &'a mut Vec<LeaseChange>,
    /// The entry's events so far, when collected (an event's index is its place here).
    events: Option<&'a mut Vec<WatchEvent>>,
}

/// The lease tables of §16, open in one apply transaction.
struct LeaseTables<'t> {
    leases: redb::Table<'t, u64, &'static [u8]>,
    lease_keys: redb::Table<'t, (u64, &'static [u8]), ()>,
    tombstones: redb::Table<'t, u64, u64>,
    tombstone_age: redb::Table<'t, (u64, u64), ()>,
}

impl<'t> WriteTables<'_, 't> {
    /// The lease tables, opened on first use (opening a table costs a lookup per apply).
    fn lt(&mut self) -> Result<&mut LeaseTables<'t>, StorageError> {
        if self.lease_tables.is_none() {
            *self.lease_tables = Some(LeaseTables {
                leases: self.txn.open_table(LEASES)?,
                lease_keys: self.txn.open_table(LEASE_KEYS)?,
                tombstones: self.txn.open_table(TOMBSTONES)?,
                tombstone_age: self.txn.open_table(TOMBSTONE_AGE)?,
            });
        }
        match self.lease_tables.as_mut() {
            Some(t) => Ok(t),
            None => Err(StorageError::Corrupt("lease tables not open".into())),
        }
    }
}

impl WriteTables<'_, '_> {
    /// Records an event of the entry being applied (when events are collected); `prev`: the
    /// key as it was, if it existed; `now`: its create revision, version and lease after it
    /// (none for a delete).
    fn event(
        &mut self,
        kind: EventKind,
        key: &[u8],
        value: Vec<u8>,
        prev: Option<StoredValue>,
        now: Option<(u64, u64, u64)>,
        revision: u64,
    ) {
        let Some(events) = self.events.as_deref_mut() else { return };
        let (prev_value, prev_meta) = match prev {
            Some(p) => (
                Some(p.value),
                Some(crate::api::PrevMeta {
                    create_revision: p.create_revision,
                    mod_revision: p.mod_revision,
                    version: p.version,
                    lease: p.lease,
                }),
            ),
            None => (None, None),
        };
        events.push(WatchEvent {
            kind,
            key: key.to_vec(),
            value,
            prev_value,
            prev_meta,
            shard: 0,
            revision,
            index: events.len() as u32,
            create_revision: now.map_or(0, |v| v.0),
            version: now.map_or(0, |v| v.1),
            lease: now.map_or(0, |v| v.2),
        });
    }
}

/// The namespace of a session id: its high 64 bits (a client's token id).
fn namespace(client: u128) -> u64 {
    (client >> 64) as u64
}

/// Adds `delta` (±1) to `client`'s namespace count; a count of 0 is removed.
fn count_session(ns: &mut NsTable<'_>, client: u128, delta: i64) -> Result<u64, StorageError> {
    let key = namespace(client);
    let now = ns.get(key)?.map(|v| v.value()).unwrap_or(0);
    let next = now.saturating_add_signed(delta);
    if next == 0 {
        ns.remove(key)?;
    } else {
        ns.insert(key, next)?;
    }
    Ok(next)
}

/// Counts the sessions of every namespace into `ns` (empty before).
fn count_namespaces(
    sessions: &impl ReadableTable<u128, &'static [u8]>,
    ns: &mut NsTable<'_>,
) -> Result<(), StorageError> {
    let mut counts: std::collections::BTreeMap<u64, u64> = Default::default();
    for item in sessions.iter()? {
        *counts.entry(namespace(item?.0.value())).or_default() += 1;
    }
    for (k, n) in counts {
        ns.insert(k, n)?;
    }
    Ok(())
}

/// Forgets one session of `client`'s namespace other than `client` (the lowest id: session ids
/// of a token are hashes, so effectively any one of them).
fn evict_one_of_namespace(t: &mut WriteTables<'_, '_>, client: u128) -> Result<(), StorageError> {
    let key = namespace(client);
    let (lo, hi) = ((key as u128) << 64, ((key as u128) << 64) | u64::MAX as u128);
    let victim = {
        let mut range = t.sessions.range(lo..=hi)?;
        loop {
            match range.next() {
                Some(item) => {
                    let (k, v) = item?;
                    if k.value() != client {
                        break Some((k.value(), postcard::from_bytes::<SessionRecord>(v.value())?));
                    }
                }
                None => break None,
            }
        }
    };
    if let Some((id, rec)) = victim {
        t.sessions.remove(id)?;
        t.ages.remove((rec.last_seen_ms, id))?;
        t.sum.sub(&session_item_hash(id, &rec)?);
        count_session(t.ns, id, -1)?;
    }
    Ok(())
}

fn apply_write(t: &mut WriteTables<'_, '_>, revision: u64, req: WriteRequest) -> Result<WriteOutcome, StorageError> {
    let client = u128::from_be_bytes(req.session.client_id.0);
    // A node's own idempotent step (a lease revocation's parts): no session to check or keep.
    let sessionless = client == 0;
    let previous: Option<SessionRecord> = match (sessionless, t.sessions.get(client)?) {
        (false, Some(v)) => Some(postcard::from_bytes(v.value())?),
        _ => None,
    };
    if let Some(prev) = &previous {
        if req.session.seq == prev.seq {
            // A retry of a write that was applied already: answer with its first outcome.
            return Ok(prev.outcome.clone());
        }
        if req.session.seq < prev.seq {
            return Ok(WriteOutcome::StaleSequence { last_seq: prev.seq });
        }
    } else if !sessionless && req.session.seq > STRICT_SEQ_BASE + 1 {
        // A per-shard session's write past its first, yet the session is unknown: it was
        // forgotten, and this may be a retry of a write applied before. Refused, not applied a
        // second time. (Numbers at or below the base keep the old rule: logs replay alike.)
        return Ok(WriteOutcome::UnknownSession { seq: req.session.seq - STRICT_SEQ_BASE });
    }
    let outcome = match req.command {
        WriteCommand::Put { key, value } => {
            put(t, &key, value, revision, 0)?;
            WriteOutcome::Put { revision }
        }
        WriteCommand::Delete { key } => {
            let deleted = remove(t, &key, revision)?;
            WriteOutcome::Delete { revision, deleted }
        }
        WriteCommand::Cas { key, expected, new_value } => {
            let current: Option<Vec<u8>> = match t.kv.get(key.as_slice())? {
                Some(v) => Some(decode_value(v.value())?.value),
                None => None,
            };
            if current == expected {
                put(t, &key, new_value, revision, 0)?;
                WriteOutcome::Cas { revision, succeeded: true, current: None }
            } else {
                WriteOutcome::Cas { revision, succeeded: false, current }
            }
        }
        WriteCommand::Batch { ops } => {
            for op in ops {
                match op {
                    BatchOp::Put { key, value } => put(t, &key, value, revision, 0)?,
                    BatchOp::Delete { key } => {
                        remove(t, &key, revision)?;
                    }
                }
            }
            WriteOutcome::Batch { revision }
        }
        WriteCommand::DeletePrefix { prefix } => {
            let deleted = remove_prefix(t, &prefix, revision)?;
            WriteOutcome::DeletePrefix { revision, deleted }
        }
        WriteCommand::Txn { compares, success, failure } => {
            let succeeded = all_hold(t.kv, &compares)?;
            let ops = if succeeded { success } else { failure };
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    TxnOp::Put { key, value } => {
                        put(t, &key, value, revision, 0)?;
                        TxnOpResult::Put { revision }
                    }
                    TxnOp::Delete { key } => TxnOpResult::Delete { deleted: remove(t, &key, revision)? },
                    TxnOp::Get { key } => TxnOpResult::Get(read_kv(t.kv, key)?),
                });
            }
            WriteOutcome::Txn { revision, succeeded, results }
        }
        WriteCommand::LeaseGrant { id, ttl_secs } => {
            let lt = t.lt()?;
            if lt.leases.get(id)?.is_some() || lt.tombstones.get(id)?.is_some() {
                WriteOutcome::LeaseExists { id }
            } else {
                let rec = LeaseRecord { ttl_secs, revoking: false };
                lt.leases.insert(id, postcard::to_stdvec(&rec)?.as_slice())?;
                t.sum.add(&lease_item_hash(id, &rec));
                t.changes.push(LeaseChange::Granted { id, ttl_secs });
                WriteOutcome::LeaseGranted { revision, id, ttl_secs }
            }
        }
        WriteCommand::LeaseRevoke { id } => match lease_record(t, id)? {
            Some(rec) if !rec.revoking => {
                let revoking = LeaseRecord { revoking: true, ..rec };
                t.sum.sub(&lease_item_hash(id, &rec));
                t.sum.add(&lease_item_hash(id, &revoking));
                t.lt()?.leases.insert(id, postcard::to_stdvec(&revoking)?.as_slice())?;
                t.changes.push(LeaseChange::Revoking { id });
                let deleted = drop_lease(t, id, revision)?;
                WriteOutcome::LeaseRevoked { revision, deleted }
            }
            _ => WriteOutcome::LeaseNotFound { id },
        },
        WriteCommand::LeaseDrop { id } => {
            let deleted = drop_lease(t, id, revision)?;
            WriteOutcome::LeaseRevoked { revision, deleted }
        }
        WriteCommand::LeaseForget { id } => match lease_record(t, id)? {
            Some(rec) if rec.revoking => {
                t.lt()?.leases.remove(id)?;
                t.sum.sub(&lease_item_hash(id, &rec));
                t.changes.push(LeaseChange::Forgotten { id });
                WriteOutcome::LeaseRevoked { revision, deleted: 0 }
            }
            // A live lease is never forgotten; a forgotten one stays so.
            Some(_) => WriteOutcome::LeaseNotFound { id },
            None => WriteOutcome::LeaseRevoked { revision, deleted: 0 },
        },
        WriteCommand::PutLease { key, value, lease, checked } => {
            match lease_known(t, lease, checked)? {
                Some(true) => {
                    put(t, &key, value, revision, lease)?;
                    WriteOutcome::Put { revision }
                }
                Some(false) => WriteOutcome::LeaseNotFound { id: lease },
                // Not applied and not recorded: the node asks the lease's home and resends.
                None => return Ok(WriteOutcome::LeaseUnchecked { id: lease }),
            }
        }
        WriteCommand::KvTxn { txn, leases_checked } => match kv::apply_kv_txn(t, revision, txn, leases_checked)? {
            // Not applied and not recorded, as a put's (above).
            unchecked @ WriteOutcome::LeaseUnchecked { .. } => return Ok(unchecked),
            outcome => outcome,
        },
    };
    if sessionless {
        return Ok(outcome);
    }
    if let Some(prev) = &previous {
        t.ages.remove((prev.last_seen_ms, client))?;
        t.sum.sub(&session_item_hash(client, prev)?);
    } else if count_session(t.ns, client, 1)? > MAX_SESSIONS_PER_TOKEN {
        evict_one_of_namespace(t, client)?;
    }
    let record = SessionRecord { seq: req.session.seq, outcome: outcome.clone(), last_seen_ms: req.timestamp_ms };
    t.sum.add(&session_item_hash(client, &record)?);
    t.sessions.insert(client, postcard::to_stdvec(&record)?.as_slice())?;
    t.ages.insert((req.timestamp_ms, client), ())?;
    Ok(outcome)
}

/// Whether lease `id` lives as far as this shard can tell: `Some(false)` revoked or revoking,
/// `Some(true)` live here (its home), attached to a key here, or `checked` (its home said it
/// lives); `None`: this shard knows nothing of it.
fn lease_known(t: &mut WriteTables<'_, '_>, id: u64, checked: bool) -> Result<Option<bool>, StorageError> {
    Ok(if t.lt()?.tombstones.get(id)?.is_some() {
        Some(false)
    } else if let Some(rec) = lease_record(t, id)? {
        Some(!rec.revoking)
    } else if checked || leases::has_keys(&t.lt()?.lease_keys, id)? {
        // A revocation would have reached this shard (and left a tombstone) first.
        Some(true)
    } else {
        None
    })
}

/// Lease `id`'s record, if this shard is its home.
fn lease_record(t: &mut WriteTables<'_, '_>, id: u64) -> Result<Option<LeaseRecord>, StorageError> {
    t.lt()?.leases.get(id)?.map(|v| leases::decode_record(v.value())).transpose()
}

/// Deletes this shard's keys attached to lease `id` and leaves a tombstone (after forgetting
/// old ones); returns how many keys went.
fn drop_lease(t: &mut WriteTables<'_, '_>, id: u64, revision: u64) -> Result<u64, StorageError> {
    let keys = leases::keys_of(&t.lt()?.lease_keys, id)?;
    for key in &keys {
        remove(t, key, revision)?;
    }
    let clock = t.clock;
    let lt = t.lt()?;
    let gone = leases::expire_tombstones(&mut lt.tombstones, &mut lt.tombstone_age, clock)?;
    let old = lt.tombstones.insert(id, clock)?.map(|v| v.value());
    if let Some(old) = old {
        lt.tombstone_age.remove((old, id))?;
    }
    lt.tombstone_age.insert((clock, id), ())?;
    for g in gone {
        t.sum.sub(&g);
    }
    if let Some(old) = old {
        t.sum.sub(&tombstone_item_hash(id, old));
    }
    t.sum.add(&tombstone_item_hash(id, t.clock));
    Ok(keys.len() as u64)
}

/// Sets `key` to `value` at `revision`, attached to `lease` (0: none; a put without a lease
/// detaches the key from the one it had, as in etcd).
fn put(t: &mut WriteTables<'_, '_>, key: &[u8], value: Vec<u8>, revision: u64, lease: u64) -> Result<(), StorageError> {
    let old: Option<StoredValue> = match t.kv.get(key)? {
        Some(v) => Some(decode_value(v.value())?),
        None => None,
    };
    let stored = match &old {
        Some(o) => {
            t.sum.sub(&kv_item_hash(key, o));
            StoredValue {
                value,
                create_revision: o.create_revision,
                mod_revision: revision,
                version: o.version + 1,
                lease,
            }
        }
        None => StoredValue { value, create_revision: revision, mod_revision: revision, version: 1, lease },
    };
    let old_lease = old.as_ref().map_or(0, |o| o.lease);
    if old_lease != lease {
        if old_lease != 0 {
            t.lt()?.lease_keys.remove((old_lease, key))?;
        }
        if lease != 0 {
            t.lt()?.lease_keys.insert((lease, key), ())?;
        }
    }
    t.sum.add(&kv_item_hash(key, &stored));
    t.kv.insert(key, postcard::to_stdvec(&stored)?.as_slice())?;
    if t.events.is_some() {
        // Encoded above: the value moves into the event, no copy.
        let StoredValue { value, create_revision, version, lease, .. } = stored;
        t.event(EventKind::Put, key, value, old, Some((create_revision, version, lease)), revision);
    }
    Ok(())
}

/// Removes `key` at `revision`; returns whether it existed.
fn remove(t: &mut WriteTables<'_, '_>, key: &[u8], revision: u64) -> Result<bool, StorageError> {
    let old: Option<StoredValue> = match t.kv.remove(key)? {
        Some(v) => Some(decode_value(v.value())?),
        None => None,
    };
    match old {
        Some(o) => {
            t.sum.sub(&kv_item_hash(key, &o));
            if o.lease != 0 {
                t.lt()?.lease_keys.remove((o.lease, key))?;
            }
            t.event(EventKind::Delete, key, Vec::new(), Some(o), None, revision);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Removes every key starting with `prefix` (every key if it is empty), each exactly as
/// [`remove`] would; returns how many there were.
fn remove_prefix(t: &mut WriteTables<'_, '_>, prefix: &[u8], revision: u64) -> Result<u64, StorageError> {
    let end = super::scan::prefix_end(prefix);
    let upper = match &end {
        Some(e) if !prefix.is_empty() => Bound::Excluded(e.as_slice()),
        _ => Bound::Unbounded,
    };
    let mut deleted = 0u64;
    let mut attached = Vec::new();
    let mut gone = Vec::new();
    let collect = t.events.is_some();
    // A client's prefix delete (even of every key) leaves the cluster's reserved keys alone.
    let internal = crate::api::is_reserved_key(prefix);
    let keep = |k: &[u8]| !internal && crate::api::is_reserved_key(k);
    for item in t.kv.extract_from_if::<&[u8], _>((Bound::Included(prefix), upper), |k, _| !keep(k))? {
        let (k, v) = item?;
        let old = decode_value(v.value())?;
        t.sum.sub(&kv_item_hash(k.value(), &old));
        if old.lease != 0 {
            attached.push((old.lease, k.value().to_vec()));
        }
        if collect {
            gone.push((k.value().to_vec(), old));
        }
        deleted += 1;
    }
    for (lease, key) in attached {
        t.lt()?.lease_keys.remove((lease, key.as_slice()))?;
    }
    for (key, prev) in gone {
        t.event(EventKind::Delete, &key, Vec::new(), Some(prev), None, revision);
    }
    Ok(deleted)
}

/// `key` as stored now, if present.
fn read_kv(kv: &KvTable<'_>, key: Vec<u8>) -> Result<Option<KeyValue>, StorageError> {
    let stored: Option<StoredValue> = match kv.get(key.as_slice())? {
        Some(v) => Some(postcard::from_bytes(v.value())?),
        None => None,
    };
    Ok(stored.map(|s| to_kv(key, s)))
}

/// Whether every compare of a txn holds against the stored keys (see [`Compare::holds`]).
fn all_hold(kv: &KvTable<'_>, compares: &[Compare]) -> Result<bool, StorageError> {
    for c in compares {
        if !c.holds(read_kv(kv, c.key.clone())?.as_ref()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Forgets sessions idle longer than [`SESSION_TTL_MS`] and the oldest beyond [`MAX_SESSIONS`].
fn expire_sessions(
    sessions: &mut SessionTable<'_>,
    ages: &mut AgeTable<'_>,
    ns: &mut NsTable<'_>,
    sum: &mut DigestSum,
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
        let expired: Option<SessionRecord> = match sessions.remove(oldest.1)? {
            Some(v) => Some(postcard::from_bytes(v.value())?),
            None => None,
        };
        if let Some(rec) = expired {
            sum.sub(&session_item_hash(oldest.1, &rec)?);
            count_session(ns, oldest.1, -1)?;
        }
    }
    Ok(())
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

/// Builds snapshots: a durable commit of everything applied, nothing copied (the state machine
/// is the snapshot; docs/design.md §6.4).
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<SmDb>,
    dir: PathBuf,
    metrics: Arc<crate::metrics::ShardMetrics>,
}

/// A snapshot of the state `txn` sees, its stream written only if someone reads it; `None` if
/// nothing was ever applied, unless `even_empty`.
fn lazy_snapshot(
    txn: SmRead,
    dir: PathBuf,
    even_empty: bool,
    metrics: Arc<crate::metrics::ShardMetrics>,
) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
    let Some(meta) = snapshot::meta_of(&txn, even_empty)? else { return Ok(None) };
    let id = meta.snapshot_id.clone();
    let write = move |out: &mut dyn std::io::Write| {
        let started = std::time::Instant::now();
        let bytes = snapshot::write_to(&txn, out).map_err(std::io::Error::other)?;
        drop(txn);
        metrics.snapshot_bytes_sent.add(bytes);
        tracing::info!(snapshot = %id, bytes, secs = started.elapsed().as_secs_f64(), "snapshot stream written");
        Ok(())
    };
    let temp = move || snapshot::temp_file(&dir);
    Ok(Some(Snapshot { meta, snapshot: Box::new(SnapshotData::lazy(Box::new(write), Box::new(temp))) }))
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, OpenraftStorageError> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let metrics = self.metrics.clone();
        metrics.snapshots_built.inc();
        blocking(move || {
            // Read first, then make durable: `apply` runs concurrently, and a durable commit
            // persists every earlier commit, so everything this read sees is on disk before
            // openraft may purge the log behind the snapshot.
            let writer = db.writer();
            let read = db.begin_read()?;
            begin_write(&writer, Durability::Immediate)?.commit()?;
            drop(writer);
            lazy_snapshot(read, dir, true, metrics)?
                .ok_or_else(|| StorageError::Task("no snapshot of an empty state".into()))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))
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
        let Some(last) = entries.last() else { return Ok(Vec::new()) };
        if let Some(log) = self.log.as_mut() {
            wait_durable(log, last.log_id.index).await.map_err(|e| sm_err(ErrorVerb::Write, e))?;
        }
        if let Some(gate) = &self.space {
            // About what the commit adds: the keys and values the entries carry.
            let bytes: usize = entries
                .iter()
                .map(|e| match &e.payload {
                    EntryPayload::Normal(WriteBatch(reqs)) => {
                        reqs.iter().map(|r| r.command.payload_bytes() + APPLY_SPACE_PER_WRITE).sum()
                    }
                    _ => APPLY_SPACE_PER_WRITE,
                })
                .sum();
            gate.wait(bytes as u64, "applying committed entries").await;
        }
        #[cfg(feature = "fault-injection")]
        if entries.iter().any(|e| {
            matches!(&e.payload, EntryPayload::Normal(WriteBatch(reqs))
                if reqs.iter().any(|r| matches!(&r.command, crate::api::WriteCommand::Put { key, .. } if key == STALL_APPLY_KEY)))
        }) {
            while STALL_APPLY.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let collect = self.hub.is_some();
        let started = std::time::Instant::now();
        // Up to a few dozen small writes: a non-durable commit of well under a millisecond,
        // cheaper to run here than the round trip to a blocking thread (unless a
        // defragmentation holds the writes: then wait for it there).
        let mut entries = entries;
        let (writes, bytes) = writes_in(&entries);
        let inline = if writes <= INLINE_APPLY_WRITES && bytes <= INLINE_APPLY_BYTES {
            self.db.try_writer().map(|writer| {
                let entries = std::mem::take(&mut entries);
                super::catch_storage_panic("applying entries", || apply_entries(&writer, entries, collect))
            })
        } else {
            None
        };
        let (results, applied) = match inline {
            Some(done) => done,
            None => {
                let db = self.db.clone();
                blocking(move || {
                    super::catch_storage_panic("applying entries", || apply_entries(&db.writer(), entries, collect))
                })
                .await
            }
        }
        .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.metrics.apply.observe_since(started);
        self.deadlines.applied(&applied.changes);
        if let Some(hub) = &self.hub {
            hub.publish(applied.events, applied.last_index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), dir: self.dir.clone(), metrics: self.metrics.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, OpenraftStorageError> {
        let dir = self.dir.clone();
        let file = blocking(move || Ok(snapshot::temp_file(&dir)?)).await.map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Box::new(SnapshotData::file(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), OpenraftStorageError> {
        let db = self.db.clone();
        let installed = meta.last_log_id.map_or(0, |l| l.index);
        let meta = meta.clone();
        let leases = async {
            let started = std::time::Instant::now();
            let id = meta.snapshot_id.clone();
            let leases = if let Some(transfer) = snapshot.as_staged() {
                // Received by the node's network into the staging tables already.
                blocking(move || snapshot::install_staged(&db.writer(), &meta, transfer)).await?
            } else {
                let file = snapshot.into_std().await?;
                blocking(move || snapshot::install_file(&db, &meta, file)).await?
            };
            tracing::info!(snapshot = %id, secs = started.elapsed().as_secs_f64(), "snapshot installed");
            Ok(leases)
        }
        .await
        .map_err(|e: StorageError| snap_err(ErrorVerb::Write, e))?;
        self.deadlines.reset(leases);
        self.metrics.snapshots_installed.inc();
        if let Some(hub) = &self.hub {
            hub.reset(installed);
        }
        Ok(())
    }

    /// The state machine as it is now (the last snapshot openraft built or installed, or later):
    /// its metadata at once, its file only when read.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, OpenraftStorageError> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let metrics = self.metrics.clone();
        blocking(move || lazy_snapshot(db.begin_read()?, dir, false, metrics))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))
    }
}
