//! The snapshot stream of one shard (docs/design.md §6.4): how a consistent read of the state
//! machine becomes a file of records, and how such a file replaces a state machine's state.
//!
//! Owns: the stream format and its checks, the temp files that hold a stream while it is sent or
//! received. Memory is bounded by one record and the I/O buffers: the state is never one buffer.
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
    io::{self, BufReader, BufWriter, Read, Seek, Write},
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

/// Writes the state `txn` sees to a new temp file in `dir`; returns it positioned at its start.
pub(super) fn write_file(dir: &Path, txn: &redb::ReadTransaction) -> Result<std::fs::File, StorageError> {
    let mut file = temp_file(dir)?;
    // Hashed below the buffer: the hasher sees 1 MiB blocks, not every small write.
    let mut out = BufWriter::with_capacity(IO_BUFFER, HashingWriter { inner: &mut file, hash: hasher() });
    write_stream(txn, &mut out)?;
    let hashed = out.into_inner().map_err(|e| e.into_error())?;
    let hash = *hashed.hash.finalize().as_bytes();
    hashed.inner.write_all(&hash)?;
    file.rewind()?;
    Ok(file)
}

fn hasher() -> blake3::Hasher {
    blake3::Hasher::new_derive_key(HASH_CONTEXT)
}

struct HashingWriter<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes the first `left` bytes read through it (the stream without its final hash).
struct HashingReader<R> {
    inner: R,
    hash: blake3::Hasher,
    left: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let hashed = (n as u64).min(self.left) as usize;
        self.hash.update(&buf[..hashed]);
        self.left -= hashed as u64;
        Ok(n)
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

/// Reads records into one reused buffer.
struct RecordReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> RecordReader<R> {
    fn exact(&mut self, n: usize) -> Result<&[u8], StorageError> {
        self.buf.resize(n, 0);
        self.inner.read_exact(&mut self.buf).map_err(truncated)?;
        Ok(&self.buf)
    }

    /// The next record: its tag and bytes.
    fn next(&mut self) -> Result<(u8, &[u8]), StorageError> {
        let head = self.exact(5)?;
        let tag = head[0];
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            return Err(corrupt(format!("a record of {len} bytes")));
        }
        Ok((tag, self.exact(len)?))
    }
}

fn truncated(e: io::Error) -> StorageError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt("the file ends early".into())
    } else {
        e.into()
    }
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

/// Replaces the whole state in `db` with the stream in `file` (from its start), in one durable
/// transaction that commits only if the stream is whole, in order, of `meta`'s log id and
/// membership, and matches its hash: otherwise nothing changes. Returns the leases it holds.
pub(super) fn install_file(
    db: &redb::Database,
    meta: &SnapshotMeta,
    mut file: std::fs::File,
) -> Result<Vec<(u64, LeaseRecord)>, StorageError> {
    file.rewind()?;
    let len = file.metadata()?.len();
    if len < 32 {
        return Err(corrupt(format!("{len} bytes")));
    }
    let hashing = HashingReader { inner: file, hash: hasher(), left: len - 32 };
    let mut r = RecordReader { inner: BufReader::with_capacity(IO_BUFFER, hashing), buf: Vec::new() };
    if r.exact(8)? != MAGIC {
        return Err(corrupt("not an Aspen snapshot (no ASPNSNAP magic)".into()));
    }
    let version = u32::from_le_bytes(r.exact(4)?.try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(corrupt(format!("format version {version}; this node reads version {FORMAT_VERSION}")));
    }
    let (tag, header) = r.next()?;
    if tag != TAG_HEADER {
        return Err(corrupt(format!("first record has tag {tag}, not the header")));
    }
    let (last_applied, membership, clock_ms): (Option<LogId>, StoredMembership, u64) = postcard::from_bytes(header)?;
    if last_applied != meta.last_log_id || membership != meta.last_membership {
        return Err(corrupt(format!(
            "it holds the state at {last_applied:?} but was sent as the snapshot at {:?}",
            meta.last_log_id
        )));
    }

    let txn = begin_write(db, Durability::Immediate)?;
    txn.delete_table(KV)?;
    txn.delete_table(LEASES)?;
    txn.delete_table(SESSIONS)?;
    txn.delete_table(SESSION_AGE)?;
    txn.delete_table(SESSION_NS)?;
    txn.delete_table(LEASE_KEYS)?;
    txn.delete_table(TOMBSTONES)?;
    txn.delete_table(TOMBSTONE_AGE)?;
    let mut leases_held = Vec::new();
    {
        let mut kv = txn.open_table(KV)?;
        let mut lease_keys = txn.open_table(LEASE_KEYS)?;
        let mut lease_records = txn.open_table(LEASES)?;
        let mut tombstones = txn.open_table(TOMBSTONES)?;
        let mut tombstone_age = txn.open_table(TOMBSTONE_AGE)?;
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut ages = txn.open_table(SESSION_AGE)?;
        let mut sum = DigestSum::default();
        // The last item of each kind, to check the order; tags must not go back either.
        let mut last_tag = TAG_HEADER;
        let mut last_key: Option<Vec<u8>> = None;
        let mut last_id: Option<u128> = None;
        loop {
            let (tag, bytes) = r.next()?;
            if tag < last_tag {
                return Err(corrupt(format!("a record with tag {tag} after tag {last_tag}")));
            }
            if tag != last_tag {
                last_id = None;
            }
            last_tag = tag;
            match tag {
                TAG_KV => {
                    let (len, rest) = split_u64_u32(bytes)?;
                    if rest.len() < len {
                        return Err(corrupt("a key record shorter than its key".into()));
                    }
                    let (key, value) = rest.split_at(len);
                    if last_key.as_deref().is_some_and(|l| l >= key) {
                        return Err(corrupt("keys out of order or repeated".into()));
                    }
                    let v = decode_value(value)?;
                    sum.add(&kv_item_hash(key, &v));
                    kv.insert(key, value)?;
                    if v.lease != 0 {
                        lease_keys.insert((v.lease, key), ())?;
                    }
                    let last = last_key.get_or_insert_with(Vec::new);
                    last.clear();
                    last.extend_from_slice(key);
                }
                TAG_SESSION => {
                    if bytes.len() < 16 {
                        return Err(corrupt(format!("a session record of {} bytes", bytes.len())));
                    }
                    let (id, value) = bytes.split_at(16);
                    let id = u128::from_be_bytes(id.try_into().expect("16 bytes"));
                    check_order(&mut last_id, id, "sessions")?;
                    let rec: SessionRecord = postcard::from_bytes(value)?;
                    sum.add(&session_item_hash(id, &rec)?);
                    sessions.insert(id, value)?;
                    ages.insert((rec.last_seen_ms, id), ())?;
                }
                TAG_LEASE => {
                    let (id, value) = split_u64(bytes, "lease")?;
                    check_order(&mut last_id, id as u128, "leases")?;
                    let rec = leases::decode_record(value)?;
                    sum.add(&lease_item_hash(id, &rec));
                    lease_records.insert(id, value)?;
                    leases_held.push((id, rec));
                }
                TAG_TOMBSTONE => {
                    let (id, rest) = split_u64(bytes, "tombstone")?;
                    let (at, _) = split_u64(rest, "tombstone")?;
                    check_order(&mut last_id, id as u128, "tombstones")?;
                    sum.add(&tombstone_item_hash(id, at));
                    tombstones.insert(id, at)?;
                    tombstone_age.insert((at, id), ())?;
                }
                TAG_END => break,
                other => return Err(corrupt(format!("unknown record tag {other}"))),
            }
        }
        let mut stored = [0u8; 32];
        r.inner.read_exact(&mut stored).map_err(truncated)?;
        if r.inner.read(&mut [0u8; 1])? != 0 {
            return Err(corrupt("bytes after its hash".into()));
        }
        // Everything but the last 32 bytes went through the hasher (all was read).
        if stored != *r.inner.get_ref().hash.finalize().as_bytes() {
            return Err(corrupt("its hash does not match its contents".into()));
        }
        count_namespaces(&sessions, &mut txn.open_table(SESSION_NS)?)?;
        let mut m = txn.open_table(META)?;
        m.insert(KEY_CLOCK, postcard::to_stdvec(&clock_ms)?.as_slice())?;
        write_sum(&mut m, &sum)?;
        // Stored as a plain `LogId` everywhere (not `Option<LogId>`).
        match &last_applied {
            Some(l) => {
                m.insert(KEY_LAST_APPLIED, postcard::to_stdvec(l)?.as_slice())?;
            }
            None => {
                m.remove(KEY_LAST_APPLIED)?;
            }
        }
        m.insert(KEY_MEMBERSHIP, postcard::to_stdvec(&membership)?.as_slice())?;
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
