//! The snapshot stream of one shard (docs/design.md §6.4): how a consistent read of the state
//! machine becomes a file of records, and how such a file replaces a state machine's state.
//!
//! Owns: the stream format and its checks, writing a stream from one read transaction, receiving
//! one into the staging tables ([`IncomingSnapshot`]) and moving them in place
//! ([`install_staged`]), and the temp files that hold a stream when it is asked for as a file.
//! Memory is bounded by one chunk and the I/O buffers: the state is never one buffer.
//!
//! The format (all integers little-endian): the 8 bytes `ASPNSNAP`; the format version (`u32`,
//! 2); the header record; any number of data records; the end record; then the 32-byte BLAKE3
//! hash (key-derivation context `aspen snapshot v2`) of every byte before it. A record is a tag
//! (`u8`), a length (`u32`) and that many bytes:
//!
//! | tag | record | bytes |
//! |--:|---|---|
//! | 0 | header | postcard of (last applied log id, membership, clock ms) |
//! | 1 | key | key length (`u32`), key, the key's stored record |
//! | 2 | client session | client id (`u128`, big-endian as redb orders it), the session's record |
//! | 3 | lease | lease id (`u64`), the lease record |
//! | 4 | revoked-lease tombstone | lease id (`u64`), clock ms (`u64`) |
//! | 255 | end | none |
//!
//! Data records come in table order (keys, sessions, leases, tombstones each strictly
//! increasing), which install checks: a file that repeats or reorders items is refused.

use std::{
    io::{self, BufWriter, Read, Seek, Write},
    path::Path,
};

use super::*;

const MAGIC: &[u8; 8] = b"ASPNSNAP";
const FORMAT_VERSION: u32 = 2;
const HASH_CONTEXT: &str = "aspen snapshot v2";
const TAG_HEADER: u8 = 0;
const TAG_KV: u8 = 1;
const TAG_SESSION: u8 = 2;
const TAG_LEASE: u8 = 3;
const TAG_TOMBSTONE: u8 = 4;
const TAG_END: u8 = 255;
/// No record is larger (a key and a value within the node's limits are far smaller): a length
/// beyond it is corruption, refused before anything is allocated for it.
const MAX_RECORD: usize = 256 << 20;
/// I/O buffer of the file while it is written or read.
const IO_BUFFER: usize = 1 << 20;
/// Temp files of snapshots start with this (and are removed at open if a crash left one).
pub(super) const TEMP_PREFIX: &str = "snapshot-";
pub(super) const TEMP_SUFFIX: &str = ".tmp";

/// What a snapshot of the state `txn` sees is of; `None` if nothing was ever applied, unless
/// `even_empty`.
pub(super) fn meta_of(txn: &redb::ReadTransaction, even_empty: bool) -> Result<Option<SnapshotMeta>, StorageError> {
    let meta = txn.open_table(META)?;
    let last_applied: Option<LogId> = read_meta(&meta, KEY_LAST_APPLIED)?;
    let membership: StoredMembership = read_meta(&meta, KEY_MEMBERSHIP)?.unwrap_or_default();
    if last_applied.is_none() && membership == StoredMembership::default() && !even_empty {
        return Ok(None);
    }
    // A function of the state: asked for twice, the same state is the same snapshot (and the
    // same bytes), and a different state has a different id.
    let sum = read_sum(&meta)?.unwrap_or_default();
    let digest = final_digest(&meta, &sum)?.digest;
    let tag = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let snapshot_id = match last_applied {
        Some(l) => format!("{}-{}-{tag:016x}", l.leader_id.term, l.index),
        None => format!("empty-{tag:016x}"),
    };
    Ok(Some(SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id }))
}

/// A new temp file in `dir`, already unlinked: it disappears with its last handle, even in a
/// crash.
pub(super) fn temp_file(dir: &Path) -> io::Result<std::fs::File> {
    loop {
        let path = dir.join(format!("{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}", rand::random::<u64>()));
        match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes snapshot temp files a crash left in `dir`, and the whole-state `snapshot.bin` that
/// older versions kept (the state machine itself is the snapshot now).
pub(super) fn remove_leftovers(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = (name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX))
            || name == LEGACY_SNAPSHOT_FILE
            || (name.starts_with(LEGACY_SNAPSHOT_FILE) && name.ends_with(".tmp"));
        if ours {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Writes the stream of the state `txn` sees, with its hash, into `out`; returns its length.
pub(super) fn write_to(txn: &redb::ReadTransaction, out: &mut dyn Write) -> Result<u64, StorageError> {
    // Hashed below the buffer: the hasher sees 1 MiB blocks, not every small write.
    let mut buffered = BufWriter::with_capacity(IO_BUFFER, HashingWriter { inner: out, hash: hasher(), bytes: 0 });
    write_stream(txn, &mut buffered)?;
    let hashed = buffered.into_inner().map_err(|e| e.into_error())?;
    let hash = *hashed.hash.finalize().as_bytes();
    hashed.inner.write_all(&hash)?;
    Ok(hashed.bytes + hash.len() as u64)
}

fn hasher() -> blake3::Hasher {
    blake3::Hasher::new_derive_key(HASH_CONTEXT)
}

struct HashingWriter<W> {
    inner: W,
    hash: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn record(out: &mut impl Write, tag: u8, parts: &[&[u8]]) -> Result<(), StorageError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_RECORD {
        return Err(StorageError::Corrupt(format!("a stored item of {len} bytes is larger than a snapshot record")));
    }
    out.write_all(&[tag])?;
    out.write_all(&(len as u32).to_le_bytes())?;
    for p in parts {
        out.write_all(p)?;
    }
    Ok(())
}

/// The whole stream but the final hash.
fn write_stream(txn: &redb::ReadTransaction, out: &mut impl Write) -> Result<(), StorageError> {
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    let meta = txn.open_table(META)?;
    let last_applied: Option<LogId> = read_meta(&meta, KEY_LAST_APPLIED)?;
    let membership: StoredMembership = read_meta(&meta, KEY_MEMBERSHIP)?.unwrap_or_default();
    let clock_ms: u64 = read_meta(&meta, KEY_CLOCK)?.unwrap_or(0);
    record(out, TAG_HEADER, &[&postcard::to_stdvec(&(last_applied, membership, clock_ms))?])?;
    for item in txn.open_table(KV)?.iter()? {
        let (k, v) = item?;
        let key = k.value();
        #[cfg(feature = "fault-injection")]
        if key == super::PANIC_IN_READ_KEY {
            panic!("injected: a read of the key that fails (a stand-in for a damaged page)");
        }
        // As stored (a record written before leases existed too: install reads both formats).
        record(out, TAG_KV, &[&(key.len() as u32).to_le_bytes(), key, v.value()])?;
    }
    for item in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = item?;
        record(out, TAG_SESSION, &[&k.value().to_be_bytes(), v.value()])?;
    }
    for item in txn.open_table(LEASES)?.iter()? {
        let (k, v) = item?;
        record(out, TAG_LEASE, &[&k.value().to_le_bytes(), v.value()])?;
    }
    for item in txn.open_table(TOMBSTONES)?.iter()? {
        let (k, v) = item?;
        record(out, TAG_TOMBSTONE, &[&k.value().to_le_bytes(), &v.value().to_le_bytes()])?;
    }
    record(out, TAG_END, &[])?;
    Ok(())
}

fn corrupt(what: String) -> StorageError {
    StorageError::Corrupt(format!("snapshot file: {what}"))
}

fn split_u64<'a>(bytes: &'a [u8], what: &str) -> Result<(u64, &'a [u8]), StorageError> {
    if bytes.len() < 8 {
        return Err(corrupt(format!("a {what} record of {} bytes", bytes.len())));
    }
    let (id, rest) = bytes.split_at(8);
    Ok((u64::from_le_bytes(id.try_into().expect("8 bytes")), rest))
}

/// Replaces the whole state in `db` with the stream in `file` (from its start): staged as if
/// received ([`IncomingSnapshot`]), then moved in place ([`install_staged`]), so nothing changes
/// unless the stream is whole, in order, of `meta`'s log id and membership, and matches its hash.
/// Returns the leases it holds.
pub(super) fn install_file(
    db: &Arc<SmDb>,
    meta: &SnapshotMeta,
    mut file: std::fs::File,
) -> Result<Vec<(u64, LeaseRecord)>, StorageError> {
    file.rewind()?;
    let mut incoming = IncomingSnapshot::begin(db.clone(), meta.clone())?;
    let mut buf = vec![0u8; STAGE_BYTES];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        incoming.push(&buf[..n])?;
    }
    let transfer = incoming.finish()?;
    install_staged(&db.writer(), meta, transfer)
}

/// Tables a snapshot being received is written into, each beside the live table it replaces.
pub(super) const STAGING_KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("staging.kv");
pub(super) const STAGING_SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("staging.sessions");
pub(super) const STAGING_SESSION_AGE: TableDefinition<(u64, u128), ()> = TableDefinition::new("staging.session_age");
pub(super) const STAGING_LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("staging.leases");
pub(super) const STAGING_LEASE_KEYS: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("staging.lease_keys");
pub(super) const STAGING_TOMBSTONES: TableDefinition<u64, u64> = TableDefinition::new("staging.lease_tombstones");
pub(super) const STAGING_TOMBSTONE_AGE: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("staging.lease_tombstone_age");
/// The transfer the staging tables hold (`transfer`), and once it is whole and checked
/// (`complete`): its applied log id, membership, clock and digest sum.
pub(super) const STAGING_META: TableDefinition<&str, &[u8]> = TableDefinition::new("staging.meta");
pub(super) const STAGED_TRANSFER: &str = "transfer";
pub(super) const STAGED_COMPLETE: &str = "complete";
/// Bytes staged per write transaction when a file is installed.
const STAGE_BYTES: usize = 8 << 20;

/// Deletes whatever a transfer left in the staging tables (a crash, or one given up).
pub(super) fn drop_staging(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    txn.delete_table(STAGING_KV)?;
    txn.delete_table(STAGING_SESSIONS)?;
    txn.delete_table(STAGING_SESSION_AGE)?;
    txn.delete_table(STAGING_LEASES)?;
    txn.delete_table(STAGING_LEASE_KEYS)?;
    txn.delete_table(STAGING_TOMBSTONES)?;
    txn.delete_table(STAGING_TOMBSTONE_AGE)?;
    txn.delete_table(STAGING_META)?;
    Ok(())
}

/// Where the parse of an incoming stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parse {
    /// Expecting the magic and the format version.
    Start,
    /// Expecting the header record.
    Header,
    /// Expecting data records or the end record.
    Records,
    /// The end record was read: only the 32-byte hash may follow.
    Hash,
}

/// A snapshot stream being received into a state machine's staging tables, chunk by chunk as it
/// arrives (docs/design.md §6.4): each chunk's whole records are checked (order, header against
/// the metadata it was sent as) and written in one non-durable transaction, so receiving
/// overlaps with sending, memory holds one chunk, and the live tables do not change until
/// [`install_staged`] moves the staged ones in place. A new transfer, or a restart, deletes
/// what an unfinished one staged.
pub struct IncomingSnapshot {
    db: Arc<SmDb>,
    meta: SnapshotMeta,
    transfer: u64,
    /// Received bytes not yet parsed (the start of a record that continues in the next chunk).
    pending: Vec<u8>,
    parse: Parse,
    /// Hash of every byte before the final hash.
    hash: blake3::Hasher,
    sum: DigestSum,
    clock_ms: u64,
    last_tag: u8,
    last_key: Option<Vec<u8>>,
    last_id: Option<u128>,
    bytes: u64,
}

impl std::fmt::Debug for IncomingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingSnapshot")
            .field("snapshot", &self.meta.snapshot_id)
            .field("transfer", &self.transfer)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl IncomingSnapshot {
    /// Starts receiving the snapshot `meta` into `db`'s staging tables (emptied first). Blocking.
    pub(crate) fn begin(db: Arc<SmDb>, meta: SnapshotMeta) -> Result<Self, StorageError> {
        let transfer = rand::random::<u64>();
        let writer = db.writer();
        let txn = begin_write(&writer, Durability::None)?;
        drop_staging(&txn)?;
        txn.open_table(STAGING_KV)?;
        txn.open_table(STAGING_SESSIONS)?;
        txn.open_table(STAGING_SESSION_AGE)?;
        txn.open_table(STAGING_LEASES)?;
        txn.open_table(STAGING_LEASE_KEYS)?;
        txn.open_table(STAGING_TOMBSTONES)?;
        txn.open_table(STAGING_TOMBSTONE_AGE)?;
        txn.open_table(STAGING_META)?.insert(STAGED_TRANSFER, transfer.to_le_bytes().as_slice())?;
        txn.commit()?;
        drop(writer);
        Ok(IncomingSnapshot {
            db,
            meta,
            transfer,
            pending: Vec::new(),
            parse: Parse::Start,
            hash: hasher(),
            sum: DigestSum::default(),
            clock_ms: 0,
            last_tag: TAG_HEADER,
            last_key: None,
            last_id: None,
            bytes: 0,
        })
    }

    /// The snapshot being received.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Stages the next bytes of the stream: every record they complete, in one non-durable
    /// transaction. Blocking. An error means the stream is not a valid snapshot of `meta` (or
    /// the disk failed): the transfer is over, and the live state is untouched.
    pub fn push(&mut self, data: &[u8]) -> Result<(), StorageError> {
        self.bytes += data.len() as u64;
        self.pending.extend_from_slice(data);
        let db = self.db.clone();
        let writer = db.writer();
        let txn = begin_write(&writer, Durability::None)?;
        let consumed = self.stage_records(&txn)?;
        txn.commit()?;
        drop(writer);
        self.hash.update(&self.pending[..consumed]);
        self.pending.drain(..consumed);
        if self.parse == Parse::Hash && self.pending.len() > 32 {
            return Err(corrupt("bytes after its hash".into()));
        }
        Ok(())
    }

    /// Parses and stages the whole records at the start of `pending`; returns the bytes they
    /// take.
    fn stage_records(&mut self, txn: &redb::WriteTransaction) -> Result<usize, StorageError> {
        let mut kv = txn.open_table(STAGING_KV)?;
        let mut lease_keys = txn.open_table(STAGING_LEASE_KEYS)?;
        let mut lease_records = txn.open_table(STAGING_LEASES)?;
        let mut tombstones = txn.open_table(STAGING_TOMBSTONES)?;
        let mut tombstone_age = txn.open_table(STAGING_TOMBSTONE_AGE)?;
        let mut sessions = txn.open_table(STAGING_SESSIONS)?;
        let mut ages = txn.open_table(STAGING_SESSION_AGE)?;
        let buf = &self.pending;
        let mut at = 0;
        loop {
            if self.parse == Parse::Start {
                if buf.len() - at < 12 {
                    return Ok(at);
                }
                if &buf[at..at + 8] != MAGIC {
                    return Err(corrupt("not an Aspen snapshot (no ASPNSNAP magic)".into()));
                }
                let version = u32::from_le_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
                if version != FORMAT_VERSION {
                    return Err(corrupt(format!("format version {version}; this node reads version {FORMAT_VERSION}")));
                }
                at += 12;
                self.parse = Parse::Header;
                continue;
            }
            if self.parse == Parse::Hash {
                return Ok(at);
            }
            let Some((tag, bytes, len)) = next_record(&buf[at..])? else { return Ok(at) };
            at += len;
            if self.parse == Parse::Header {
                if tag != TAG_HEADER {
                    return Err(corrupt(format!("first record has tag {tag}, not the header")));
                }
                let (last_applied, membership, clock_ms): (Option<LogId>, StoredMembership, u64) =
                    postcard::from_bytes(bytes)?;
                if last_applied != self.meta.last_log_id || membership != self.meta.last_membership {
                    return Err(corrupt(format!(
                        "it holds the state at {last_applied:?} but was sent as the snapshot at {:?}",
                        self.meta.last_log_id
                    )));
                }
                self.clock_ms = clock_ms;
                self.parse = Parse::Records;
                continue;
            }
            if tag < self.last_tag {
                return Err(corrupt(format!("a record with tag {tag} after tag {}", self.last_tag)));
            }
            if tag != self.last_tag {
                self.last_id = None;
            }
            self.last_tag = tag;
            match tag {
                TAG_KV => {
                    let (len, rest) = split_u64_u32(bytes)?;
                    if rest.len() < len {
                        return Err(corrupt("a key record shorter than its key".into()));
                    }
                    let (key, value) = rest.split_at(len);
                    if self.last_key.as_deref().is_some_and(|l| l >= key) {
                        return Err(corrupt("keys out of order or repeated".into()));
                    }
                    let v = decode_value(value)?;
                    self.sum.add(&kv_item_hash(key, &v));
                    kv.insert(key, value)?;
                    if v.lease != 0 {
                        lease_keys.insert((v.lease, key), ())?;
                    }
                    let last = self.last_key.get_or_insert_with(Vec::new);
                    last.clear();
                    last.extend_from_slice(key);
                }
                TAG_SESSION => {
                    if bytes.len() < 16 {
                        return Err(corrupt(format!("a session record of {} bytes", bytes.len())));
                    }
                    let (id, value) = bytes.split_at(16);
                    let id = u128::from_be_bytes(id.try_into().expect("16 bytes"));
                    check_order(&mut self.last_id, id, "sessions")?;
                    let rec: SessionRecord = postcard::from_bytes(value)?;
                    self.sum.add(&session_item_hash(id, &rec)?);
                    sessions.insert(id, value)?;
                    ages.insert((rec.last_seen_ms, id), ())?;
                }
                TAG_LEASE => {
                    let (id, value) = split_u64(bytes, "lease")?;
                    check_order(&mut self.last_id, id as u128, "leases")?;
                    let rec = leases::decode_record(value)?;
                    self.sum.add(&lease_item_hash(id, &rec));
                    lease_records.insert(id, value)?;
                }
                TAG_TOMBSTONE => {
                    let (id, rest) = split_u64(bytes, "tombstone")?;
                    let (at, _) = split_u64(rest, "tombstone")?;
                    check_order(&mut self.last_id, id as u128, "tombstones")?;
                    self.sum.add(&tombstone_item_hash(id, at));
                    tombstones.insert(id, at)?;
                    tombstone_age.insert((at, id), ())?;
                }
                TAG_END => self.parse = Parse::Hash,
                other => return Err(corrupt(format!("unknown record tag {other}"))),
            }
        }
    }

    /// Checks that the stream is whole (end record, then exactly its hash, which matches) and
    /// marks the staged tables complete; returns the transfer number to install them by
    /// ([`install_staged`]). Blocking.
    pub fn finish(&mut self) -> Result<u64, StorageError> {
        if self.parse != Parse::Hash || self.pending.len() < 32 {
            return Err(corrupt("the file ends early".into()));
        }
        if self.pending[..] != *self.hash.finalize().as_bytes() {
            return Err(corrupt("its hash does not match its contents".into()));
        }
        let complete = postcard::to_stdvec(&(
            self.meta.last_log_id,
            &self.meta.last_membership,
            self.clock_ms,
            self.sum.to_bytes().as_slice(),
        ))?;
        let writer = self.db.writer();
        let txn = begin_write(&writer, Durability::None)?;
        txn.open_table(STAGING_META)?.insert(STAGED_COMPLETE, complete.as_slice())?;
        txn.commit()?;
        Ok(self.transfer)
    }
}

/// A record parsed in place: its tag, its bytes, and how many bytes of the stream it took.
type Record<'a> = (u8, &'a [u8], usize);

/// The record at the start of `buf`; `None` if `buf` does not hold all of it yet.
fn next_record(buf: &[u8]) -> Result<Option<Record<'_>>, StorageError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(corrupt(format!("a record of {len} bytes")));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    Ok(Some((buf[0], &buf[5..5 + len], 5 + len)))
}

/// Replaces the whole state in `db` with the snapshot that transfer `transfer` staged, in one
/// durable transaction: the staged tables take the live ones' places. Refused (nothing changes)
/// unless the staging tables hold that transfer, complete, of `meta`'s log id and membership.
/// Returns the leases it holds.
pub(super) fn install_staged(
    db: &redb::Database,
    meta: &SnapshotMeta,
    transfer: u64,
) -> Result<Vec<(u64, LeaseRecord)>, StorageError> {
    let txn = begin_write(db, Durability::Immediate)?;
    let (clock_ms, sum) = {
        let staged = match txn.open_table(STAGING_META) {
            Ok(t) => t,
            Err(e) => return Err(StorageError::Task(format!("no staged snapshot to install: {e}"))),
        };
        let Some(held) = staged.get(STAGED_TRANSFER)?.map(|v| v.value().to_vec()) else {
            return Err(StorageError::Task("no staged snapshot to install".into()));
        };
        if held != transfer.to_le_bytes() {
            return Err(StorageError::Task(format!(
                "the staged snapshot is not transfer {transfer:016x} (another transfer replaced it)"
            )));
        }
        let Some(complete) = staged.get(STAGED_COMPLETE)? else {
            return Err(StorageError::Task(format!("transfer {transfer:016x} is not complete")));
        };
        let (last_applied, membership, clock_ms, sum): (Option<LogId>, StoredMembership, u64, &[u8]) =
            postcard::from_bytes(complete.value())?;
        if last_applied != meta.last_log_id || membership != meta.last_membership {
            return Err(StorageError::Task(format!(
                "the staged snapshot is of {last_applied:?}, not of {:?}",
                meta.last_log_id
            )));
        }
        (clock_ms, DigestSum::from_bytes(sum)?)
    };
    txn.delete_table(KV)?;
    txn.delete_table(LEASES)?;
    txn.delete_table(SESSIONS)?;
    txn.delete_table(SESSION_AGE)?;
    txn.delete_table(SESSION_NS)?;
    txn.delete_table(LEASE_KEYS)?;
    txn.delete_table(TOMBSTONES)?;
    txn.delete_table(TOMBSTONE_AGE)?;
    txn.rename_table(STAGING_KV, KV)?;
    txn.rename_table(STAGING_LEASES, LEASES)?;
    txn.rename_table(STAGING_SESSIONS, SESSIONS)?;
    txn.rename_table(STAGING_SESSION_AGE, SESSION_AGE)?;
    txn.rename_table(STAGING_LEASE_KEYS, LEASE_KEYS)?;
    txn.rename_table(STAGING_TOMBSTONES, TOMBSTONES)?;
    txn.rename_table(STAGING_TOMBSTONE_AGE, TOMBSTONE_AGE)?;
    txn.delete_table(STAGING_META)?;
    let mut leases_held = Vec::new();
    {
        for item in txn.open_table(LEASES)?.iter()? {
            let (id, value) = item?;
            leases_held.push((id.value(), leases::decode_record(value.value())?));
        }
        count_namespaces(&txn.open_table(SESSIONS)?, &mut txn.open_table(SESSION_NS)?)?;
        let mut m = txn.open_table(META)?;
        m.insert(KEY_CLOCK, postcard::to_stdvec(&clock_ms)?.as_slice())?;
        write_sum(&mut m, &sum)?;
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
    Ok(leases_held)
}

fn split_u64_u32(bytes: &[u8]) -> Result<(usize, &[u8]), StorageError> {
    if bytes.len() < 4 {
        return Err(corrupt(format!("a key record of {} bytes", bytes.len())));
    }
    let (len, rest) = bytes.split_at(4);
    Ok((u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize, rest))
}

fn check_order(last: &mut Option<u128>, id: u128, what: &str) -> Result<(), StorageError> {
    if last.is_some_and(|l| l >= id) {
        return Err(corrupt(format!("{what} out of order or repeated")));
    }
    *last = Some(id);
    Ok(())
}
