//! The log journal of one shard (`shard-N/raft-log.journal`): where new log entries become
//! durable before they move into `raft-log.db`.
//!
//! Why: a redb commit is copy-on-write — one fsync'd commit of a single entry rewrites ~9 pages
//! scattered over the file (the table's leaf and branches, the table tree, the freed tree, the
//! header), and on this kind of disk each page costs an I/O inside the fsync (measured: one page
//! ~0.15 ms, eight scattered pages ~0.77 ms). An append to this journal writes the entries once,
//! next to the previous ones, and fsyncs one or two pages. The log writer
//! (`super::log_store`) checkpoints the journal into redb in one transaction now and then
//! (about once a second, when the journal is full, and with every truncation, purge or vote),
//! so redb keeps holding the log as before and the journal stays small.
//!
//! Owns: the file format and its recovery. The file is preallocated (zero-filled, so that later
//! writes overwrite allocated blocks and `fdatasync` has no metadata to flush) and written from
//! offset 0 again after every checkpoint. Each record is
//! `magic (4) | epoch (8) | payload length (4) | checksum (8) | payload`, the checksum (BLAKE3 of
//! epoch, length and payload) guarding against torn writes, and the payload is a sequence of
//! `length (4) | encoded entry`. The *epoch* of the journal is stored in redb (`super::log_store`)
//! and bumped by every checkpoint, in the same transaction that moves the entries: recovery
//! reads records from offset 0 while they carry the current epoch and a valid checksum, so a
//! record from before the last checkpoint (older epoch), a torn record, or the zeros of a fresh
//! file all end the scan. A record is acknowledged only after its fsync, and the next one is
//! written only after that, so only the last record can be torn — and it was never acknowledged.
//!
//! Never: decide what belongs in the log (truncation, purge and the epoch are the log store's),
//! or hold entries after a checkpoint.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use redb::StorageBackend;

use super::StorageError;
use crate::api::raft::{Entry, LogId};

const MAGIC: [u8; 4] = *b"AJL1";
const HEADER: usize = 4 + 8 + 4 + 8;

/// Size of a journal file: records that do not fit make the writer checkpoint first.
pub const CAPACITY: u64 = 4 << 20;

/// Encoded log entries with their ids, in log order.
pub type Encoded = Vec<(LogId, Vec<u8>)>;

/// A journal file on any storage backend (tests put it on a simulated disk).
pub struct Journal {
    file: Box<dyn StorageBackend>,
    capacity: u64,
    /// Where the next record goes.
    offset: u64,
    epoch: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("offset", &self.offset).field("epoch", &self.epoch).finish()
    }
}

/// The journal's path beside the log database.
pub fn path_beside(log_db: &Path) -> PathBuf {
    log_db.with_extension("journal")
}

/// A journal in a plain file.
#[derive(Debug)]
pub struct FileDisk(File);

impl FileDisk {
    /// Opens (creating if missing) the journal file at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(FileDisk(file))
    }
}

impl StorageBackend for FileDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_exact_at(out, offset)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_all_at(data, offset)
    }
}

fn checksum(epoch: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// The bytes of the payload that holds `entries`.
pub(super) fn payload_len(entries: &[&[u8]]) -> usize {
    entries.iter().map(|b| 4 + b.len()).sum()
}

/// Appends a record's payload to `out`: `length (4) | encoded entry` for each of `entries`.
pub(super) fn encode_payload(out: &mut Vec<u8>, entries: &[&[u8]]) {
    for bytes in entries {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
}

/// The entries of a payload whose checksum held: one that does not decode is corruption (`what`
/// names the record in the error).
pub(super) fn decode_payload(payload: &[u8], what: impl Fn() -> String) -> Result<Encoded, StorageError> {
    let mut entries = Vec::new();
    let mut p = 0usize;
    while p < payload.len() {
        let bad = || StorageError::Corrupt(format!("{} holds a malformed entry", what()));
        let n = payload.get(p..p + 4).ok_or_else(bad)?;
        let n = u32::from_le_bytes(n.try_into().map_err(|_| bad())?) as usize;
        let bytes = payload.get(p + 4..p + 4 + n).ok_or_else(bad)?;
        let entry: Entry = postcard::from_bytes(bytes)?;
        entries.push((entry.log_id, bytes.to_vec()));
        p += 4 + n;
    }
    Ok(entries)
}

/// Grows `file` from `len` to `capacity` bytes of real zeros (a sparse file would make every
/// later write allocate) and syncs it.
pub(super) fn zero_fill(file: &dyn StorageBackend, len: u64, capacity: u64) -> Result<(), StorageError> {
    file.set_len(capacity)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = len;
    while at < capacity {
        let n = (capacity - at).min(zeros.len() as u64);
        file.write(at, &zeros[..n as usize])?;
        at += n;
    }
    file.sync_data()?;
    Ok(())
}

/// One record holding `entries` (encoded), stamped with `epoch`.
fn encode_record(epoch: u64, entries: &[&[u8]]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(payload_len(entries));
    encode_payload(&mut payload, entries);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(epoch, &payload));
    out.extend_from_slice(&payload);
    out
}

/// The bytes a record of `entries` takes.
pub fn record_len(entries: &[&[u8]]) -> u64 {
    (HEADER + entries.iter().map(|b| 4 + b.len()).sum::<usize>()) as u64
}

/// The records of `epoch` at the start of `image`, in order: the scan ends at the first record
/// that is not one (zeros, an older epoch, a torn or corrupt record). A record whose checksum
/// holds but whose entries do not decode is corruption, not a torn write: an error.
fn scan(image: &[u8], epoch: u64) -> Result<Vec<Encoded>, StorageError> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while image.len() - at >= HEADER {
        let h = &image[at..at + HEADER];
        let rec_epoch = u64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default()) as usize;
        if h[..4] != MAGIC || rec_epoch != epoch || len > image.len() - at - HEADER {
            break;
        }
        let payload = &image[at + HEADER..at + HEADER + len];
        if h[16..24] != checksum(epoch, payload) {
            break;
        }
        records.push(decode_payload(payload, || format!("journal record at offset {at}"))?);
        at += HEADER + len;
    }
    Ok(records)
}

impl Journal {
    /// Opens the journal on `file`, sized to `capacity` (a new or short file is zero-filled and
    /// synced first). Call [`Self::recover`] before appending.
    pub fn open(file: impl StorageBackend, capacity: u64) -> Result<Self, StorageError> {
        let file: Box<dyn StorageBackend> = Box::new(file);
        let len = file.len()?;
        if len < capacity {
            zero_fill(file.as_ref(), len, capacity)?;
        }
        Ok(Journal { file, capacity: capacity.max(len), offset: 0, epoch: 0 })
    }

    /// The entries the journal holds for `epoch`, record by record in the order written.
    pub fn recover(&self, epoch: u64) -> Result<Vec<Encoded>, StorageError> {
        let mut image = vec![0u8; self.capacity as usize];
        self.file.read(0, &mut image)?;
        scan(&image, epoch)
    }

    /// Starts the journal over (after a checkpoint): records go from offset 0, with `epoch`.
    pub fn reset(&mut self, epoch: u64) {
        self.offset = 0;
        self.epoch = epoch;
    }

    /// The epoch records are written with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a record of `bytes` (see [`record_len`]) fits after the current end.
    pub fn fits(&self, bytes: u64) -> bool {
        self.offset + bytes <= self.capacity
    }

    /// Writes `entries` as one record and fsyncs it. The caller checked [`Self::fits`].
    pub fn append(&mut self, entries: &[&[u8]]) -> Result<(), StorageError> {
        let record = encode_record(self.epoch, entries);
        self.file.write(self.offset, &record)?;
        self.file.sync_data()?;
        self.offset += record.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entries(first: u64, n: u64) -> Encoded {
        (first..first + n)
            .map(|i| {
                let e = Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), i), payload: EntryPayload::Blank };
                (e.log_id, postcard::to_stdvec(&e).unwrap())
            })
            .collect()
    }

    fn bytes(e: &Encoded) -> Vec<&[u8]> {
        e.iter().map(|(_, b)| b.as_slice()).collect()
    }

    fn indexes(records: &[Encoded]) -> Vec<Vec<u64>> {
        records.iter().map(|r| r.iter().map(|(id, _)| id.index).collect()).collect()
    }

    #[test]
    fn records_of_the_current_epoch_come_back_in_order() {
        let disk = redb::backends::InMemoryBackend::new();
        let mut j = Journal::open(disk, 4096).unwrap();
        assert!(j.recover(0).unwrap().is_empty(), "a fresh (zeroed) journal holds nothing");
        j.reset(3);
        j.append(&bytes(&entries(1, 2))).unwrap();
        j.append(&bytes(&entries(3, 1))).unwrap();
        assert_eq!(indexes(&j.recover(3).unwrap()), vec![vec![1, 2], vec![3]]);
        assert!(j.recover(2).unwrap().is_empty(), "another epoch's records are not this epoch's");
        // After a checkpoint the file is written from the start again: the new epoch's record
        // ends the scan before the old records behind it.
        j.reset(4);
        j.append(&bytes(&entries(4, 1))).unwrap();
        assert_eq!(indexes(&j.recover(4).unwrap()), vec![vec![4]]);
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_scan() {
        let mut image = Vec::new();
        image.extend(encode_record(7, &bytes(&entries(1, 1))));
        let second = encode_record(7, &bytes(&entries(2, 3)));
        let cut = image.len() + second.len() - 5;
        image.extend(second);
        image.extend(encode_record(7, &bytes(&entries(5, 1))));
        assert_eq!(indexes(&scan(&image, 7).unwrap()), vec![vec![1], vec![2, 3, 4], vec![5]]);
        let mut torn = image.clone();
        torn[cut] ^= 0xff;
        assert_eq!(indexes(&scan(&torn, 7).unwrap()), vec![vec![1]], "a bad checksum ends the scan");
        let mut short = image.clone();
        short.truncate(cut);
        assert_eq!(indexes(&scan(&short, 7).unwrap()), vec![vec![1]], "a record cut short ends the scan");
        let mut lying_len = image.clone();
        lying_len[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(scan(&lying_len, 7).unwrap().is_empty(), "a length past the end ends the scan");
    }

    #[test]
    fn a_record_with_a_valid_checksum_but_garbage_entries_is_an_error() {
        let payload = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        let mut image = Vec::new();
        image.extend_from_slice(&MAGIC);
        image.extend_from_slice(&1u64.to_le_bytes());
        image.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&checksum(1, &payload));
        image.extend_from_slice(&payload);
        assert!(scan(&image, 1).is_err());
    }

    #[test]
    fn a_record_too_big_for_the_file_does_not_fit() {
        let j = Journal::open(redb::backends::InMemoryBackend::new(), 256).unwrap();
        assert!(j.fits(record_len(&bytes(&entries(1, 1)))));
        assert!(!j.fits(record_len(&bytes(&entries(1, 100)))));
    }
}
