//! Storage tests of one shard, one file per unit: the redb Raft log ([`RedbLogStore`]) and the redb state machine
//! ([`RedbStateMachine`]), driven through the openraft storage-v2 traits exactly as openraft drives
//! them, plus openraft's own storage conformance suite.
//!
//! Crash tests copy the database files while the store is still open: a clean close (drop) makes
//! every pending non-durable commit durable, so only a copy shows what a power cut would leave.

use std::{collections::BTreeSet, io::Read, ops::Bound, path::Path};

use openraft::{
    storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine},
    testing::{StoreBuilder, Suite},
    CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Snapshot,
};
use tempfile::TempDir;

use super::{state_machine::StateReader, RedbLogStore, RedbStateMachine};
use crate::api::{
    raft::{
        ApplyResult, Entry, LogId, MemberNode, OpenraftStorageError, SnapshotData, SnapshotMeta, StoredMembership,
        TypeConfig, Vote, WriteBatch, WriteRequest,
    },
    BatchOp, Compare, Id128, KeyValue, StateDigest, TxnOp, TxnOpResult, WriteCommand, WriteOutcome, WriteSession,
};

const LEADER: u64 = 1;
const LOG_FILE: &str = "raft-log.db";
const SM_FILE: &str = "state-machine.db";
/// Large enough that no test hits it unless it means to.
const NO_CAP: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, LEADER), index)
}

fn client(n: u8) -> Id128 {
    Id128([n; 16])
}

fn request(client_id: Id128, seq: u64, command: WriteCommand) -> WriteRequest {
    WriteRequest { session: WriteSession { client_id, seq }, command, timestamp_ms: 1_000 }
}

fn normal(term: u64, index: u64, req: WriteRequest) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(req.into()) }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

fn membership_of(voters: &[u64]) -> Membership<u64, MemberNode> {
    Membership::new(vec![voters.iter().copied().collect::<BTreeSet<u64>>()], None)
}

fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Membership(membership_of(voters)) }
}

fn put_cmd(key: &str, value: &[u8]) -> WriteCommand {
    WriteCommand::Put { key: key.as_bytes().to_vec(), value: value.to_vec() }
}

/// A put by a client of its own (one write per session), so sessions never interfere.
fn put(term: u64, index: u64, key: &str, value: &[u8]) -> Entry {
    normal(term, index, request(unique_client(index), 1, put_cmd(key, value)))
}

fn delete(term: u64, index: u64, key: &str) -> Entry {
    let cmd = WriteCommand::Delete { key: key.as_bytes().to_vec() };
    normal(term, index, request(unique_client(index), 1, cmd))
}

fn cas(term: u64, index: u64, key: &str, expected: Option<&[u8]>, new_value: &[u8]) -> Entry {
    let cmd = WriteCommand::Cas {
        key: key.as_bytes().to_vec(),
        expected: expected.map(<[u8]>::to_vec),
        new_value: new_value.to_vec(),
    };
    normal(term, index, request(unique_client(index), 1, cmd))
}

fn batch(term: u64, index: u64, ops: Vec<BatchOp>) -> Entry {
    normal(term, index, request(unique_client(index), 1, WriteCommand::Batch { ops }))
}

fn delete_prefix(term: u64, index: u64, prefix: &[u8]) -> Entry {
    normal(term, index, request(unique_client(index), 1, WriteCommand::DeletePrefix { prefix: prefix.to_vec() }))
}

fn txn(term: u64, index: u64, compares: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Entry {
    normal(term, index, request(unique_client(index), 1, WriteCommand::Txn { compares, success, failure }))
}

fn bput(key: &str, value: &[u8]) -> BatchOp {
    BatchOp::Put { key: key.as_bytes().to_vec(), value: value.to_vec() }
}

fn bdel(key: &str) -> BatchOp {
    BatchOp::Delete { key: key.as_bytes().to_vec() }
}

/// A client id derived from the log index; the leading 0xAA keeps it apart from `client(n)`.
fn unique_client(index: u64) -> Id128 {
    let mut id = [0xAA; 16];
    id[8..].copy_from_slice(&index.to_be_bytes());
    Id128(id)
}

fn open_log(dir: &Path, max_batch_bytes: u64) -> RedbLogStore {
    RedbLogStore::open(&dir.join(LOG_FILE), max_batch_bytes, 1 << 20).expect("open log store")
}

fn open_sm(dir: &Path) -> RedbStateMachine {
    RedbStateMachine::open(&dir.join(SM_FILE), 1 << 20).expect("open state machine")
}

async fn read_all(store: &mut RedbLogStore) -> Vec<Entry> {
    store.try_get_log_entries(..).await.expect("read log")
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

async fn apply(sm: &mut RedbStateMachine, entries: Vec<Entry>) -> Vec<ApplyResult> {
    sm.apply(entries).await.expect("apply")
}

/// Applies one normal entry and returns its outcome.
async fn apply_write(sm: &mut RedbStateMachine, entry: Entry) -> WriteOutcome {
    let mut results = apply(sm, vec![entry]).await;
    assert_eq!(results.len(), 1);
    results.pop().and_then(|r| r.0.into_iter().next()).expect("a normal entry yields an outcome")
}

fn get(reader: &StateReader, key: &str) -> Option<KeyValue> {
    reader.get(key.as_bytes()).expect("get")
}

/// A key as read back; its revisions given as the log indexes of lone writes ([`rev`]).
fn kv(key: &str, value: &[u8], create_index: u64, mod_index: u64, version: u64) -> KeyValue {
    let (create_revision, mod_revision) = (rev(create_index), rev(mod_index));
    KeyValue { key: key.as_bytes().to_vec(), value: value.to_vec(), create_revision, mod_revision, version }
}

/// The revision of the first (or only) write of the entry at log `index`.
fn rev(index: u64) -> u64 {
    crate::api::write_revision(index, 0)
}

/// The incrementally kept digest equals a recount of every key, session, lease and tombstone.
fn assert_digest_recounts(reader: &StateReader) {
    assert_eq!(reader.digest().unwrap(), reader.recompute_digest().unwrap(), "incremental digest = recount");
}

fn all_keys(reader: &StateReader) -> Vec<KeyValue> {
    reader.range(Bound::Unbounded, Bound::Unbounded, usize::MAX, usize::MAX).expect("range")
}

/// The bytes of a snapshot's stream (its file made first if need be).
async fn snapshot_bytes(snap: Snapshot<TypeConfig>) -> Vec<u8> {
    let mut file = snap.snapshot.into_std().await.expect("snapshot file");
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).expect("read snapshot file");
    bytes
}

/// What `sm` receives when sent `bytes`, written the way openraft writes the chunks.
async fn receive(sm: &mut RedbStateMachine, bytes: &[u8]) -> Box<SnapshotData> {
    use tokio::io::AsyncWriteExt;
    let mut rx = sm.begin_receiving_snapshot().await.expect("begin receiving");
    // Odd small pieces for small streams (every boundary case of the records), 1 MiB otherwise.
    let piece = if bytes.len() < 4096 { 7 } else { 1 << 20 };
    for chunk in bytes.chunks(piece) {
        rx.write_all(chunk).await.expect("write chunk");
    }
    rx.shutdown().await.expect("shutdown");
    rx
}

/// Copies the files of a shard directory, as a crash would leave them, to a new directory.
fn copy_dir_files(from: &Path, names: &[&str]) -> TempDir {
    let to = tempfile::tempdir().expect("tempdir");
    for name in names {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.path().join(name)).expect("copy file");
        }
    }
    to
}

mod defrag;
mod digests;
mod kv_txn;
mod leases;
mod log_store;
mod own_appends;
mod snapshots;
mod state_machine;
mod suite;
