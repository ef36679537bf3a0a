//! The node's log journal (`<data-dir>/node-log.journal`): ONE file and ONE fsync for the new
//! log entries of every shard of the node (group commit across shards).
//!
//! Why: each shard used to have a journal of its own, so a node with four shards paid four
//! `fdatasync`s (and their I/O submissions) where one shard paid one, and with four shards each
//! entry holds a quarter of the writes (measured: at 64 clients 5.8 writes per entry with four
//! shards against 24 with one; the fsync path was 10 % of the nodes' CPU). Here the shards'
//! log writers (`super::log_store`, one thread per shard, unchanged) write their records into
//! this one file, and an fsync covers every record written before it started: a writer whose
//! record is not yet covered either runs the fsync itself (if none is running) or waits for
//! the running one to end and checks again. So while one fsync runs, the other shards' records
//! gather and share the next one.
//!
//! Each shard's state stays in its own `shard-N/` files: a record is only a shard's entries
//! until its next checkpoint into `shard-N/raft-log.db` (about once a second), exactly as with
//! the per-shard journal ([`super::journal`]), so a shard's durable log is its database plus
//! its records of its current *epoch* here.
//!
//! Format. Block 0 is the header: magic, a random 32-byte key, the ring's size in blocks (fixed
//! for the file's life, whatever a later version's default size) and a checksum, written and
//! fsync'd once when the file is made. Records start at block boundaries (512 bytes, a disk
//! sector) of the rest of the file, which is used as a ring: record positions are *logical*
//! block numbers (`lsn`) that only grow, the physical block being `1 + lsn % blocks`; a record
//! that would cross the end of the file starts again at the beginning instead. A record is
//! `magic | shard | shard epoch | lsn | payload length | checksum | payload` with the payload a
//! sequence of `length | encoded entry` as in the per-shard journal, and the checksum a BLAKE3
//! hash *keyed with the file's key* over the payload and then everything before the checksum. Recovery reads
//! the whole file and takes every block that starts a record whose checksum holds and whose
//! lsn names that block: a torn record fails its checksum; stale bytes fail it too; and since
//! the key is secret to the file, a value a client wrote that happens to contain record-shaped
//! bytes cannot pass for a record. A shard takes the records of its current epoch (the epoch
//! is in its database and bumped by every checkpoint), in lsn order.
//!
//! Room. Writing at `lsn` overwrites the block of `lsn - blocks`, so a record is written only
//! if every shard's oldest record of its current epoch (its *live* records) stays ahead of it;
//! otherwise the append reports no room and the shard's writer checkpoints straight into its
//! database instead (as the per-shard journal did when full), which makes its records stale.
//! Records found at open count as live until their shard's store has opened (and moved them
//! into its database), so no shard's writes overwrite another shard's unrecovered entries (the
//! node opens the logs of shards it no longer hosts once at start for that, or releases the
//! records of a shard whose log is gone).
//!
//! Owns: the file, its format and recovery, the ring positions and the group fsync. Never:
//! decide what is in a shard's log or when it checkpoints (`super::log_store` does).

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

use redb::StorageBackend;

use super::{
    journal::{decode_payload, encode_payload, payload_len, zero_fill, Encoded},
    StorageError,
};
use crate::api::ShardId;

/// Records start at multiples of this (one disk sector).
pub const BLOCK: u64 = 512;
/// Size of the node's journal file.
pub const CAPACITY: u64 = 16 << 20;
/// The file name, in the data dir.
pub const FILE_NAME: &str = "node-log.journal";

const FILE_MAGIC: [u8; 8] = *b"AJSHARE1";
const REC_MAGIC: [u8; 4] = *b"AJR2";
/// magic (4) | shard (4) | epoch (8) | lsn (8) | payload length (4) | checksum (8)
const REC_HEADER: usize = 4 + 4 + 8 + 8 + 4 + 8;

/// The node's journal (cheap to clone; clones share the file).
#[derive(Clone)]
pub struct SharedJournal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("SharedJournal").field("next_lsn", &st.next_lsn).field("live", &st.live_from).finish()
    }
}

struct Inner {
    file: Box<dyn StorageBackend>,
    key: [u8; 32],
    /// Record blocks (the file holds one header block more).
    blocks: u64,
    state: Mutex<State>,
    /// Signalled when an fsync ends.
    synced: Condvar,
    /// How long each fsync took (`aspen_journal_fsync_duration_seconds`).
    fsync_times: Arc<crate::metrics::Histogram>,
}

/// A record found at open: the shard's epoch it was written in, its position, its entries.
type Found = (u64, u64, Encoded);

#[derive(Default)]
struct State {
    /// The next free logical block.
    next_lsn: u64,
    /// Per shard, the lsn of its oldest live record.
    live_from: HashMap<ShardId, u64>,
    /// Records written so far, and how many of them an fsync has covered.
    written: u64,
    synced: u64,
    syncing: bool,
    /// A failed fsync: the journal is unusable from then on (as a failed log write stops a shard).
    failed: Option<String>,
    /// The records found at open that no shard has taken yet.
    recovered: HashMap<ShardId, Vec<Found>>,
}

/// The header: magic, the key, the ring's size in blocks (fixed for the file's life: a record's
/// block is its lsn modulo it), and a checksum of those.
fn header(key: &[u8; 32], blocks: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(56);
    h.extend_from_slice(&FILE_MAGIC);
    h.extend_from_slice(key);
    h.extend_from_slice(&blocks.to_le_bytes());
    h.extend_from_slice(&blake3::hash(&h).as_bytes()[..8]);
    h
}

/// The key and the ring's size, if `block` holds a valid header.
fn parse_header(block: &[u8]) -> Option<([u8; 32], u64)> {
    let (body, sum) = (block.get(..48)?, block.get(48..56)?);
    if body[..8] != FILE_MAGIC || blake3::hash(body).as_bytes()[..8] != *sum {
        return None;
    }
    Some((body[8..40].try_into().ok()?, u64::from_le_bytes(body[40..48].try_into().ok()?)))
}

/// A record's checksum: BLAKE3 keyed with the file's key over the payload, then the header
/// fields (payload first, so that a writer hashes it before it takes the lock and learns its lsn).
fn record_checksum(key: &[u8; 32], head: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(payload);
    finish_checksum(h, head)
}

fn finish_checksum(mut payload_hash: blake3::Hasher, head: &[u8]) -> [u8; 8] {
    payload_hash.update(head);
    let mut out = [0u8; 8];
    out.copy_from_slice(&payload_hash.finalize().as_bytes()[..8]);
    out
}

/// Blocks a record of `payload_len` bytes takes.
fn blocks_for(payload_len: usize) -> u64 {
    (REC_HEADER + payload_len).div_ceil(BLOCK as usize) as u64
}

/// Every record of the ring `image` (the file after its header block) whose checksum holds and
/// whose lsn names the block it starts at, by shard.
fn scan(image: &[u8], key: &[u8; 32], blocks: u64) -> Result<HashMap<ShardId, Vec<Found>>, StorageError> {
    let mut found: HashMap<ShardId, Vec<Found>> = HashMap::new();
    for b in 0..blocks {
        let at = (b * BLOCK) as usize;
        let Some(h) = image.get(at..at + REC_HEADER) else { break };
        if h[..4] != REC_MAGIC {
            continue;
        }
        let field = |r: std::ops::Range<usize>| h[r].iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64);
        let (shard, epoch, lsn, len) = (field(4..8) as ShardId, field(8..16), field(16..24), field(24..28) as usize);
        if lsn % blocks != b {
            continue;
        }
        let Some(payload) = image.get(at + REC_HEADER..at + REC_HEADER + len) else { continue };
        if h[28..36] != record_checksum(key, &h[..28], payload) {
            continue;
        }
        let entries = decode_payload(payload, || format!("node journal record at block {b}"))?;
        found.entry(shard).or_default().push((epoch, lsn, entries));
    }
    for records in found.values_mut() {
        records.sort_by_key(|(_, lsn, _)| *lsn);
    }
    Ok(found)
}

impl SharedJournal {
    /// Opens (creating if missing) the node's journal at `path`, [`CAPACITY`] bytes.
    pub fn open_file(path: &Path) -> Result<Self, StorageError> {
        let existed = path.exists();
        let journal = Self::open(super::journal::FileDisk::open(path)?, CAPACITY)?;
        if !existed {
            super::sync_dir_of(path)?;
        }
        Ok(journal)
    }

    /// Opens the journal on any backend (tests put it on a simulated disk), sized to
    /// `capacity`: a new or short file is zero-filled and given a header (synced) first. Reads
    /// every record it holds, for the shards' stores to take ([`Self::shard`]).
    pub fn open(file: impl StorageBackend, capacity: u64) -> Result<Self, StorageError> {
        let file: Box<dyn StorageBackend> = Box::new(file);
        let capacity = capacity.max(2 * BLOCK) / BLOCK * BLOCK;
        let len = file.len()?;
        let mut first = vec![0u8; BLOCK as usize];
        if len >= BLOCK {
            file.read(0, &mut first)?;
        }
        let (key, blocks, found) = match parse_header(&first) {
            Some((key, blocks)) => {
                // The ring keeps the size it was made with, whatever `capacity` says now.
                if len < (blocks + 1) * BLOCK {
                    return Err(StorageError::Corrupt(format!(
                        "the node's log journal is {len} bytes, shorter than its ring of {blocks} blocks"
                    )));
                }
                let mut image = vec![0u8; (blocks * BLOCK) as usize];
                file.read(BLOCK, &mut image)?;
                let found = scan(&image, &key, blocks)?;
                (key, blocks, found)
            }
            None => {
                if len < capacity {
                    zero_fill(file.as_ref(), len, capacity)?;
                }
                let blocks = capacity.max(len / BLOCK * BLOCK) / BLOCK - 1;
                let mut image = vec![0u8; (blocks * BLOCK) as usize];
                file.read(BLOCK, &mut image)?;
                // No header: a new file, or one whose making was cut short (the header, one
                // sector, is written whole or not at all) — then no record was ever written, as
                // the header is synced before the first one. Anything else (a damaged header,
                // records without one, a file of another format) is refused rather than lost.
                let blank = first.iter().all(|b| *b == 0);
                if !blank || image.chunks(BLOCK as usize).any(|b| b.starts_with(&REC_MAGIC)) {
                    return Err(StorageError::Corrupt(
                        "the node's log journal has no valid header but is not blank".into(),
                    ));
                }
                let key: [u8; 32] = rand::random();
                file.write(0, &header(&key, blocks))?;
                file.sync_data()?;
                (key, blocks, HashMap::new())
            }
        };
        let next_lsn = found.values().flatten().map(|(_, lsn, e)| lsn + blocks_for(encoded_len(e))).max().unwrap_or(0);
        let live_from = found.iter().filter_map(|(s, r)| Some((*s, r.first()?.1))).collect();
        let state = State { next_lsn, live_from, recovered: found, ..State::default() };
        Ok(SharedJournal {
            inner: Arc::new(Inner {
                file,
                key,
                blocks,
                state: Mutex::new(state),
                synced: Condvar::new(),
                fsync_times: Arc::new(crate::metrics::Histogram::durations()),
            }),
        })
    }

    /// How long this journal's fsyncs took.
    pub fn fsync_times(&self) -> Arc<crate::metrics::Histogram> {
        self.inner.fsync_times.clone()
    }

    /// The journal of `shard` in this file (its store sets the epoch, [`ShardJournal::reset`]).
    pub fn shard(&self, shard: ShardId) -> ShardJournal {
        ShardJournal { inner: self.inner.clone(), shard, epoch: 0 }
    }

    /// Forgets the records found at open of `shard` (a shard whose log is gone): their room
    /// may be written over.
    pub fn release(&self, shard: ShardId) {
        let mut st = self.inner.lock();
        st.recovered.remove(&shard);
        st.live_from.remove(&shard);
    }

    /// Shards with records found at open that no store has taken yet (their records stay in
    /// the file, and keep the ring from going past them, until one does).
    pub fn unclaimed(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self.inner.lock().recovered.keys().copied().collect();
        shards.sort_unstable();
        shards
    }
}

/// The bytes of the payload that holds the recovered `entries`.
fn encoded_len(entries: &Encoded) -> usize {
    entries.iter().map(|(_, b)| 4 + b.len()).sum()
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(msg: &str) -> StorageError {
        StorageError::Io(std::io::Error::other(format!("the node's log journal failed earlier: {msg}")))
    }
}

/// One shard's view of the node's journal, used by its log writer.
pub struct ShardJournal {
    inner: Arc<Inner>,
    shard: ShardId,
    epoch: u64,
}

impl std::fmt::Debug for ShardJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardJournal").field("shard", &self.shard).field("epoch", &self.epoch).finish()
    }
}

impl ShardJournal {
    /// The shard's entries of `epoch` found at open, record by record in the order written.
    /// Taken once: the store moves them into its database before it writes anything.
    pub fn recover(&self, epoch: u64) -> Vec<Encoded> {
        let found = self.inner.lock().recovered.remove(&self.shard).unwrap_or_default();
        found.into_iter().filter(|(e, _, _)| *e == epoch).map(|(_, _, entries)| entries).collect()
    }

    /// After a checkpoint: the shard's records so far are stale, new ones carry `epoch`.
    pub fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.inner.lock().live_from.remove(&self.shard);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Writes `entries` as one record and waits until an fsync covers it. `Ok(false)`: no room
    /// (the record would overwrite a live one, or is larger than the file); nothing written.
    pub fn append(&mut self, entries: &[&[u8]]) -> Result<bool, StorageError> {
        let inner = &*self.inner;
        // The record is built (and its payload hashed) before the lock; only the header's lsn
        // and the checksum's end are filled in under it.
        let payload_len = payload_len(entries);
        let n = blocks_for(payload_len);
        if n > inner.blocks {
            return Ok(false);
        }
        let mut record = Vec::with_capacity(REC_HEADER + payload_len);
        record.resize(REC_HEADER, 0);
        encode_payload(&mut record, entries);
        let mut payload_hash = blake3::Hasher::new_keyed(&inner.key);
        payload_hash.update(&record[REC_HEADER..]);
        let mut st = inner.lock();
        if let Some(msg) = &st.failed {
            return Err(Inner::failed(msg));
        }
        let mut lsn = st.next_lsn;
        if lsn % inner.blocks + n > inner.blocks {
            lsn = lsn.div_ceil(inner.blocks) * inner.blocks;
        }
        let tail = st.live_from.values().copied().min().unwrap_or(lsn);
        if lsn + n > tail + inner.blocks {
            return Ok(false);
        }
        record[..4].copy_from_slice(&REC_MAGIC);
        record[4..8].copy_from_slice(&self.shard.to_le_bytes());
        record[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        record[16..24].copy_from_slice(&lsn.to_le_bytes());
        record[24..28].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let sum = finish_checksum(payload_hash, &record[..28]);
        record[28..REC_HEADER].copy_from_slice(&sum);
        // Written under the lock, so that an fsync started after the lock is released next
        // covers every record counted in `written` by then.
        inner.file.write(BLOCK * (1 + lsn % inner.blocks), &record)?;
        st.next_lsn = lsn + n;
        st.live_from.entry(self.shard).or_insert(lsn);
        st.written += 1;
        let mine = st.written;
        loop {
            if let Some(msg) = &st.failed {
                return Err(Inner::failed(msg));
            }
            if st.synced >= mine {
                return Ok(true);
            }
            if st.syncing {
                st = inner.synced.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.syncing = true;
            let upto = st.written;
            drop(st);
            let started = std::time::Instant::now();
            let result = inner.file.sync_data();
            inner.fsync_times.observe_since(started);
            st = inner.lock();
            st.syncing = false;
            match result {
                Ok(()) => st.synced = st.synced.max(upto),
                Err(e) => st.failed = Some(e.to_string()),
            }
            inner.synced.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};
    use redb::backends::InMemoryBackend;

    use super::*;
    use crate::api::raft::{Entry, LogId};

    /// The records of `epoch` of one shard in an image, for tests of the format.
    fn shard_records(found: &HashMap<ShardId, Vec<Found>>, shard: ShardId, epoch: u64) -> Vec<Vec<LogId>> {
        found
            .get(&shard)
            .map(|r| {
                r.iter()
                    .filter(|(e, _, _)| *e == epoch)
                    .map(|(_, _, es)| es.iter().map(|(id, _)| *id).collect())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sorted positions, for tests.
    fn positions(found: &HashMap<ShardId, Vec<Found>>) -> std::collections::BTreeMap<ShardId, Vec<u64>> {
        found.iter().map(|(s, r)| (*s, r.iter().map(|(_, lsn, _)| *lsn).collect())).collect()
    }

    fn entries(first: u64, n: u64, pad: usize) -> Encoded {
        (first..first + n)
            .map(|i| {
                let mut e = Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), i), payload: EntryPayload::Blank };
                e.log_id.index = i;
                let mut bytes = postcard::to_stdvec(&e).unwrap();
                // Padding after the entry is ignored by postcard; it makes records longer.
                bytes.extend(std::iter::repeat_n(0u8, pad));
                (e.log_id, bytes)
            })
            .collect()
    }

    fn bytes(e: &Encoded) -> Vec<&[u8]> {
        e.iter().map(|(_, b)| b.as_slice()).collect()
    }

    fn indexes(records: &[Encoded]) -> Vec<Vec<u64>> {
        records.iter().map(|r| r.iter().map(|(id, _)| id.index).collect()).collect()
    }

    /// A backend whose clones share the bytes (a reopen sees what was written).
    #[derive(Debug, Clone, Default)]
    struct Shared(Arc<InMemoryBackend>);

    impl StorageBackend for Shared {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.0.write(offset, data)
        }
    }

    #[test]
    fn each_shard_gets_back_its_records_of_its_epoch_in_order() {
        let disk = Shared::default();
        let j = SharedJournal::open(disk.clone(), 64 * BLOCK).unwrap();
        let (mut a, mut b) = (j.shard(1), j.shard(2));
        a.reset(5);
        b.reset(9);
        assert!(a.append(&bytes(&entries(1, 2, 0))).unwrap());
        assert!(b.append(&bytes(&entries(1, 1, 600))).unwrap());
        assert!(a.append(&bytes(&entries(3, 1, 0))).unwrap());
        a.reset(6); // a checkpoint: shard 1's records so far are stale
        assert!(a.append(&bytes(&entries(4, 1, 0))).unwrap());
        drop((a, b, j));

        let j = SharedJournal::open(disk, 64 * BLOCK).unwrap();
        assert_eq!(j.unclaimed(), vec![1, 2]);
        assert_eq!(indexes(&j.shard(1).recover(6)), vec![vec![4]]);
        assert_eq!(indexes(&j.shard(2).recover(9)), vec![vec![1]], "a record over two blocks comes back whole");
        assert!(j.shard(2).recover(9).is_empty(), "records are taken once");
        assert!(j.unclaimed().is_empty());
    }

    #[test]
    fn the_ring_never_overwrites_a_live_record_and_wraps_past_stale_ones() {
        let disk = Shared::default();
        // 8 record blocks.
        let j = SharedJournal::open(disk.clone(), 9 * BLOCK).unwrap();
        let blocks = j.inner.blocks;
        assert_eq!(blocks, 8);
        let (mut a, mut b) = (j.shard(0), j.shard(1));
        assert!(b.append(&bytes(&entries(1, 1, 0))).unwrap(), "shard 1 holds lsn 0");
        for i in 0..7 {
            assert!(a.append(&bytes(&entries(i, 1, 0))).unwrap(), "lsn {}", i + 1);
        }
        assert!(!a.append(&bytes(&entries(7, 1, 0))).unwrap(), "lsn 8 would overwrite shard 1's live record");
        b.reset(1);
        assert!(a.append(&bytes(&entries(7, 1, 0))).unwrap(), "shard 1's record is stale now: lsn 8");
        assert!(
            !a.append(&bytes(&entries(8, 1, 0))).unwrap(),
            "lsn 9 would overwrite shard 0's own oldest live record"
        );
        a.reset(1);
        assert!(a.append(&bytes(&entries(8, 1, 0))).unwrap(), "lsn 9");
        assert!(!a.append(&bytes(&entries(9, 1, 5000))).unwrap(), "a record larger than the file never fits");
        for i in 0..5 {
            assert!(a.append(&bytes(&entries(10 + i, 1, 0))).unwrap(), "lsn {}", 10 + i);
        }
        assert_eq!(j.inner.lock().next_lsn % blocks, 7);
        a.reset(2);
        // A two-block record that would cross the end of the file starts at its beginning.
        assert!(a.append(&bytes(&entries(20, 1, 600))).unwrap());
        assert_eq!(j.inner.lock().next_lsn, 2 * blocks + 2);
        drop((a, b, j));

        let j = SharedJournal::open(disk, 9 * BLOCK).unwrap();
        assert_eq!(j.inner.lock().next_lsn, 2 * blocks + 2, "new records go after the newest found");
        assert_eq!(indexes(&j.shard(0).recover(2)), vec![vec![20]]);
    }

    #[test]
    fn the_ring_keeps_the_size_it_was_made_with() {
        let disk = Shared::default();
        let j = SharedJournal::open(disk.clone(), 9 * BLOCK).unwrap();
        let mut a = j.shard(0);
        for i in 0..10 {
            a.reset(i);
            assert!(a.append(&bytes(&entries(i, 1, 0))).unwrap());
        }
        drop((a, j));
        // A later default size must not move records to other blocks.
        let j = SharedJournal::open(disk.clone(), 64 * BLOCK).unwrap();
        assert_eq!(j.inner.blocks, 8);
        assert_eq!(indexes(&j.shard(0).recover(9)), vec![vec![9]]);
        disk.set_len(4 * BLOCK).unwrap();
        assert!(matches!(SharedJournal::open(disk, 9 * BLOCK), Err(StorageError::Corrupt(_))), "a cut-off ring");
    }

    #[test]
    fn records_found_at_open_stay_live_until_their_shard_takes_them() {
        let disk = Shared::default();
        let j = SharedJournal::open(disk.clone(), 9 * BLOCK).unwrap();
        let mut a = j.shard(3);
        assert!(a.append(&bytes(&entries(1, 1, 0))).unwrap());
        drop((a, j));
        let j = SharedJournal::open(disk, 9 * BLOCK).unwrap();
        let mut other = j.shard(4);
        let mut written = 0;
        while other.append(&bytes(&entries(written, 1, 0))).unwrap() {
            written += 1;
            other.reset(written);
        }
        assert_eq!(written, 7, "every block but the unrecovered record's");
        let mut three = j.shard(3);
        assert_eq!(indexes(&three.recover(0)), vec![vec![1]]);
        three.reset(1);
        assert!(other.append(&bytes(&entries(99, 1, 0))).unwrap(), "once shard 3 checkpointed, its block is free");
    }

    #[test]
    fn torn_stale_and_forged_records_are_not_records() {
        let key = [7u8; 32];
        let blocks = 16;
        let mut image = vec![0u8; (blocks * BLOCK) as usize];
        let put = |image: &mut Vec<u8>, key: &[u8; 32], shard: u32, lsn: u64, e: &Encoded| {
            let mut payload = Vec::new();
            encode_payload(&mut payload, &bytes(e));
            let mut r = Vec::new();
            r.extend_from_slice(&REC_MAGIC);
            r.extend_from_slice(&shard.to_le_bytes());
            r.extend_from_slice(&0u64.to_le_bytes());
            r.extend_from_slice(&lsn.to_le_bytes());
            r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let sum = record_checksum(key, &r, &payload);
            r.extend_from_slice(&sum);
            r.extend_from_slice(&payload);
            let at = ((lsn % blocks) * BLOCK) as usize;
            image[at..at + r.len()].copy_from_slice(&r);
            r.len()
        };
        put(&mut image, &key, 1, 0, &entries(1, 1, 0));
        let torn_len = put(&mut image, &key, 1, 1, &entries(2, 1, 700));
        put(&mut image, &key, 1, 3, &entries(3, 1, 0));
        // A record written with another key (think: record-shaped bytes inside a client's
        // value) does not count, nor one whose lsn names another block.
        put(&mut image, &[9u8; 32], 1, 5, &entries(50, 1, 0));
        put(&mut image, &key, 1, 6 + blocks, &entries(60, 1, 0));
        let moved: Vec<u8> = image[(6 * BLOCK) as usize..(7 * BLOCK) as usize].to_vec();
        image[(8 * BLOCK) as usize..(9 * BLOCK) as usize].copy_from_slice(&moved);
        assert_eq!(positions(&scan(&image, &key, blocks).unwrap())[&1], vec![0, 1, 3, 6 + blocks]);
        // Tear the two-block record's second half.
        let at = (BLOCK as usize) + torn_len - 3;
        image[at] ^= 0xff;
        let found = scan(&image, &key, blocks).unwrap();
        assert_eq!(positions(&found)[&1], vec![0, 3, 6 + blocks]);
        assert_eq!(shard_records(&found, 1, 0).len(), 3);
    }

    #[test]
    fn a_file_with_records_or_data_but_no_header_is_refused_and_a_blank_one_is_made_anew() {
        let disk = Shared::default();
        let j = SharedJournal::open(disk.clone(), 16 * BLOCK).unwrap();
        assert!(j.shard(0).append(&bytes(&entries(1, 1, 0))).unwrap());
        drop(j);
        disk.write(0, &[0u8; 56]).unwrap();
        assert!(matches!(SharedJournal::open(disk, 16 * BLOCK), Err(StorageError::Corrupt(_))));
        let other = Shared::default();
        other.set_len(16 * BLOCK).unwrap();
        other.write(0, b"AJL1 a file of another format").unwrap();
        assert!(matches!(SharedJournal::open(other, 16 * BLOCK), Err(StorageError::Corrupt(_))));
        let blank = Shared::default();
        blank.set_len(16 * BLOCK).unwrap();
        let j = SharedJournal::open(blank.clone(), 16 * BLOCK).unwrap();
        assert!(j.unclaimed().is_empty());
        let mut first = [0u8; 56];
        blank.read(0, &mut first).unwrap();
        assert!(parse_header(&first).is_some(), "a header was written");
    }
}
