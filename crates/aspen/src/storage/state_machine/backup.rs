//! Backups of one shard's state (`aspen-cli snapshot save`, `aspen-node restore`; docs/design.md
//! §6.5): a consistent read written as the snapshot stream (§6.4), the digest of the data in it,
//! and a fresh state machine made from such a stream for a new one-node cluster.
//!
//! Owns: [`BackupSource`] (one read transaction, its stream and data digest), the data digest
//! ([`data_digest_of`]: keys outside the reserved keyspace, leases, lease tombstones — not the
//! client sessions, nor Aspen's own records, which a restored cluster replaces), and
//! [`restore_stream`]. Never: a backup's file format (the client writes it, `client::backup`).

use std::io::{Read, Write};

use super::*;
use crate::api::{is_reserved_key, RESERVED_PREFIX};

const DATA_DIGEST_CONTEXT: &str = "aspen data digest v1";

/// One consistent read of a shard's state, to be written as a backup stream.
pub struct BackupSource {
    txn: SmRead,
    last_applied: Option<LogId>,
}

impl std::fmt::Debug for BackupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSource").field("last_applied", &self.last_applied).finish()
    }
}

impl BackupSource {
    /// The applied entry the read is of (`None`: nothing applied yet).
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// Writes the snapshot stream into `out` (blocking), then returns the data digest of the
    /// same read.
    pub fn write(self, out: &mut dyn Write) -> Result<[u8; 32], StorageError> {
        snapshot::write_to(&self.txn, out)?;
        data_digest_of(&self.txn)
    }
}

impl StateReader {
    /// A consistent read of the applied state for a backup (held until the source drops).
    pub fn backup(&self) -> Result<BackupSource, StorageError> {
        let txn = self.db.begin_read()?;
        let last_applied = read_meta(&txn.open_table(META)?, KEY_LAST_APPLIED)?;
        Ok(BackupSource { txn, last_applied })
    }

    /// The digest of the data this replica holds (O(n): reads every key, lease and tombstone).
    pub fn data_digest(&self) -> Result<[u8; 32], StorageError> {
        let read = self.db.begin_read()?;
        data_digest_of(&read)
    }
}

/// The digest of the data a read sees: BLAKE3 of the sum of the item hashes of the keys outside
/// the reserved keyspace, the lease records and the lease tombstones (the state digest's item
/// hashes, without the client sessions and the applied index).
pub fn data_digest_of(txn: &redb::ReadTransaction) -> Result<[u8; 32], StorageError> {
    let mut sum = DigestSum::default();
    for item in txn.open_table(LEASES)?.iter()? {
        let (k, v) = item?;
        sum.add(&lease_item_hash(k.value(), &leases::decode_record(v.value())?));
    }
    for item in txn.open_table(TOMBSTONES)?.iter()? {
        let (k, v) = item?;
        sum.add(&tombstone_item_hash(k.value(), v.value()));
    }
    for item in txn.open_table(KV)?.iter()? {
        let (k, v) = item?;
        if !is_reserved_key(k.value()) {
            sum.add(&kv_item_hash(k.value(), &decode_value(v.value())?));
        }
    }
    let mut h = blake3::Hasher::new_derive_key(DATA_DIGEST_CONTEXT);
    h.update(&sum.to_bytes());
    Ok(*h.finalize().as_bytes())
}

/// What [`restore_stream`] installed.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// The applied entry of the backup (the restored state machine's last applied).
    pub last_applied: LogId,
    /// The data digest of the installed state.
    pub data_digest: [u8; 32],
}

/// Makes the state machine at `path` (which must not hold any state yet) the state of the
/// backup stream `stream`, checked against its hash, with the membership `membership` makes
/// of its applied log id in place of the old cluster's, and without Aspen's reserved records
/// (the old cluster's signing key, tokens, revocations and join records). Blocking.
pub fn restore_stream(
    path: &Path,
    cache_bytes: usize,
    stream: &mut dyn Read,
    membership: impl FnOnce(&LogId) -> StoredMembership,
) -> Result<Restored, StorageError> {
    let sm = RedbStateMachine::open(path, cache_bytes)?;
    if sm.reader().last_applied()?.is_some() {
        return Err(StorageError::Task(format!("{} holds a state already", path.display())));
    }
    // The stream's header record says what state it is of.
    let mut head = [0u8; 17];
    stream.read_exact(&mut head).map_err(|e| corrupt_stream(format!("its start: {e}")))?;
    let len = u32::from_le_bytes(head[13..17].try_into().expect("4 bytes")) as usize;
    if len > 16 << 20 {
        return Err(corrupt_stream(format!("a header record of {len} bytes")));
    }
    let mut header = vec![0u8; len];
    stream.read_exact(&mut header).map_err(|e| corrupt_stream(format!("its header: {e}")))?;
    let (last_applied, old_membership, _clock): (Option<LogId>, StoredMembership, u64) =
        postcard::from_bytes(&header).map_err(|e| corrupt_stream(format!("its header: {e}")))?;
    let last_applied = last_applied.ok_or_else(|| corrupt_stream("it is of an empty state".into()))?;
    let meta = SnapshotMeta {
        last_log_id: Some(last_applied),
        last_membership: old_membership,
        snapshot_id: format!("restore-{}-{}", last_applied.leader_id.term, last_applied.index),
    };
    let mut incoming = IncomingSnapshot::begin(sm.db.clone(), meta.clone())?;
    incoming.push(&head)?;
    incoming.push(&header)?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        incoming.push(&buf[..n])?;
    }
    let transfer = incoming.finish()?;
    snapshot::install_staged(&sm.db.writer(), &meta, transfer)?;

    // The new cluster's membership, and none of the old cluster's records.
    let writer = sm.db.writer();
    let txn = begin_write(&writer, Durability::Immediate)?;
    {
        let mut kv = txn.open_table(KV)?;
        let mut m = txn.open_table(META)?;
        let mut sum = read_sum(&m)?.unwrap_or_default();
        let mut reserved = Vec::new();
        let end = crate::api::prefix_end(RESERVED_PREFIX);
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        for item in kv.range::<&[u8]>((Bound::Included(RESERVED_PREFIX), upper))? {
            let (k, v) = item?;
            reserved.push((k.value().to_vec(), decode_value(v.value())?));
        }
        for (k, v) in &reserved {
            sum.sub(&kv_item_hash(k, v));
            kv.remove(k.as_slice())?;
        }
        write_sum(&mut m, &sum)?;
        m.insert(KEY_MEMBERSHIP, postcard::to_stdvec(&membership(&last_applied))?.as_slice())?;
    }
    txn.commit()?;
    drop(writer);
    let data_digest = sm.reader().data_digest()?;
    Ok(Restored { last_applied, data_digest })
}

fn corrupt_stream(why: String) -> StorageError {
    StorageError::Corrupt(format!("the backup's snapshot stream is damaged: {why}"))
}
