//! Storage tests of one shard: the redb Raft log ([`RedbLogStore`]) and the redb state machine
//! ([`RedbStateMachine`]), driven through the openraft storage-v2 traits exactly as openraft drives
//! them, plus openraft's own storage conformance suite.
//!
//! Crash tests copy the database files while the store is still open: a clean close (drop) makes
//! every pending non-durable commit durable, so only a copy shows what a power cut would leave.

use std::{collections::BTreeSet, io::Cursor, ops::Bound, path::Path};

use openraft::{
    storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine},
    testing::{StoreBuilder, Suite},
    CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder,
};
use tempfile::TempDir;

use super::{
    state_machine::StateReader, ApplyResult, Entry, LogId, MemberNode, OpenraftStorageError, RedbLogStore,
    RedbStateMachine, StoredMembership, TypeConfig, Vote, WriteBatch, WriteRequest,
};
use crate::api::{BatchOp, Id128, KeyValue, StateDigest, WriteCommand, WriteOutcome, WriteSession};

const LEADER: u64 = 1;
const LOG_FILE: &str = "raft-log.db";
const SM_FILE: &str = "state-machine.db";
const SNAPSHOT_FILE: &str = "snapshot.bin";
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
    RedbLogStore::open(&dir.join(LOG_FILE), max_batch_bytes).expect("open log store")
}

fn open_sm(dir: &Path) -> RedbStateMachine {
    RedbStateMachine::open(&dir.join(SM_FILE)).expect("open state machine")
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

fn kv(key: &str, value: &[u8], create_revision: u64, mod_revision: u64, version: u64) -> KeyValue {
    KeyValue { key: key.as_bytes().to_vec(), value: value.to_vec(), create_revision, mod_revision, version }
}

fn all_keys(reader: &StateReader) -> Vec<KeyValue> {
    reader.range(Bound::Unbounded, Bound::Unbounded, usize::MAX, usize::MAX).expect("range")
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

// ---------------------------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_append_read_truncate_purge() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), NO_CAP);

    let state = store.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None), "a new log is empty");
    assert!(read_all(&mut store).await.is_empty());

    // Two appends: a membership entry and writes of term 1, then writes of term 2.
    let mut first = vec![membership(1, 1, &[1])];
    first.extend((2..=5).map(|i| put(1, i, &format!("k{i}"), b"v")));
    let second: Vec<Entry> = (6..=10).map(|i| put(2, i, &format!("k{i}"), b"v")).collect();
    store.blocking_append(first.clone()).await.unwrap();
    store.blocking_append(second.clone()).await.unwrap();
    let all: Vec<Entry> = first.into_iter().chain(second).collect();

    assert_eq!(read_all(&mut store).await, all, "entries read back as appended");
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(3..6).await.unwrap(), all[2..5].to_vec());
    assert_eq!(indexes(&reader.try_get_log_entries(8..=10).await.unwrap()), vec![8, 9, 10]);
    assert_eq!(indexes(&reader.try_get_log_entries(9..).await.unwrap()), vec![9, 10]);
    assert!(reader.try_get_log_entries(11..20).await.unwrap().is_empty());

    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 10)));
    assert_eq!(state.last_purged_log_id, None);

    // Truncate at 7: 7.. goes, ..7 stays.
    store.truncate(log_id(2, 7)).await.unwrap();
    assert_eq!(read_all(&mut store).await, all[..6].to_vec());
    assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 6)));

    // A new leader's entries replace the truncated ones.
    let replaced: Vec<Entry> = (7..=8).map(|i| put(3, i, &format!("new{i}"), b"w")).collect();
    store.blocking_append(replaced.clone()).await.unwrap();
    let entries = read_all(&mut store).await;
    assert_eq!(indexes(&entries), (1..=8).collect::<Vec<_>>());
    assert_eq!(entries[6..].to_vec(), replaced);
    assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(3, 8)));

    // Purge up to 3: ..=3 goes, 4.. stays.
    store.purge(log_id(1, 3)).await.unwrap();
    assert_eq!(indexes(&read_all(&mut store).await), vec![4, 5, 6, 7, 8]);
    assert!(reader.try_get_log_entries(1..4).await.unwrap().is_empty(), "the reader sees the purge");
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(3, 8)));

    // Purge everything: the last log id is the last purged one.
    store.purge(log_id(3, 8)).await.unwrap();
    assert!(read_all(&mut store).await.is_empty());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 8)));
    assert_eq!(state.last_log_id, Some(log_id(3, 8)));

    // Appending after a full purge continues the log.
    store.blocking_append(vec![blank(4, 9)]).await.unwrap();
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 8)));
    assert_eq!(state.last_log_id, Some(log_id(4, 9)));
    assert_eq!(read_all(&mut store).await, vec![blank(4, 9)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_get_log_entries_respects_byte_cap() {
    let big = vec![b'x'; 600];
    let entries: Vec<Entry> = (1..=5).map(|i| put(1, i, &format!("k{i}"), &big)).collect();

    // Cap below two entries: one entry per call, even though that one alone exceeds the cap.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), 1000);
    store.blocking_append(entries.clone()).await.unwrap();
    let mut reader = store.get_log_reader().await;
    for start in 1..=5 {
        let got = reader.limited_get_log_entries(start, 6).await.unwrap();
        assert_eq!(got, vec![entries[start as usize - 1].clone()], "one entry from {start}");
    }
    // Paging the way replication does returns every entry exactly once, in order.
    let mut paged = Vec::new();
    let mut next = 1;
    while next < 6 {
        let got = reader.limited_get_log_entries(next, 6).await.unwrap();
        assert!(!got.is_empty(), "no progress at {next}");
        next = got.last().unwrap().log_id.index + 1;
        paged.extend(got);
    }
    assert_eq!(paged, entries);
    // A cap smaller than one entry still returns exactly that entry.
    drop((reader, store));
    let mut tiny = open_log(dir.path(), 1);
    assert_eq!(indexes(&tiny.limited_get_log_entries(2, 6).await.unwrap()), vec![2]);
    drop(tiny);

    // A large cap returns the whole range, and never more than the range.
    let mut store = open_log(dir.path(), NO_CAP);
    assert_eq!(store.limited_get_log_entries(1, 6).await.unwrap(), entries);
    assert_eq!(indexes(&store.limited_get_log_entries(2, 4).await.unwrap()), vec![2, 3]);
    drop(store);

    // A cap that fits several entries returns as many as fit, and the next one would not fit.
    let small = vec![b'y'; 250];
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), 1000);
    let entries: Vec<Entry> = (1..=10).map(|i| put(1, i, &format!("s{i}"), &small)).collect();
    store.blocking_append(entries.clone()).await.unwrap();
    let got = store.limited_get_log_entries(1, 11).await.unwrap();
    let size = |e: &Entry| postcard::to_stdvec(e).unwrap().len() as u64;
    let got_bytes: u64 = got.iter().map(size).sum();
    assert!(got.len() > 1 && got.len() < 10, "several but not all entries fit, got {}", got.len());
    assert!(got_bytes <= 1000, "returned {got_bytes} bytes");
    assert!(got_bytes + size(&entries[got.len()]) > 1000, "stopped although the next entry fit");
    assert_eq!(got, entries[..got.len()].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_and_committed_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(3, 2);
    {
        let mut store = open_log(dir.path(), NO_CAP);
        assert_eq!(store.read_vote().await.unwrap(), None);
        assert_eq!(store.read_committed().await.unwrap(), None);
        store.save_vote(&Vote::new(2, 1)).await.unwrap();
        store.save_vote(&vote).await.unwrap();
        store.save_committed(Some(log_id(3, 5))).await.unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 5)));
    }
    {
        let mut store = open_log(dir.path(), NO_CAP);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote), "the latest vote survives a restart");
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 5)));
        store.save_committed(None).await.unwrap();
    }
    let mut store = open_log(dir.path(), NO_CAP);
    assert_eq!(store.read_committed().await.unwrap(), None, "a cleared committed id stays cleared");
    assert_eq!(store.read_vote().await.unwrap(), Some(vote));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_survives_crash() {
    // `save_vote` must be durable when it returns: a copy of the files taken right after it (the
    // store still open) has the vote.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), NO_CAP);
    store.blocking_append(vec![blank(1, 1), put(1, 2, "a", b"1")]).await.unwrap();
    store.save_vote(&Vote::new_committed(7, 3)).await.unwrap();
    let crashed = copy_dir_files(dir.path(), &[LOG_FILE]);
    let mut recovered = open_log(crashed.path(), NO_CAP);
    assert_eq!(recovered.read_vote().await.unwrap(), Some(Vote::new_committed(7, 3)));
    assert_eq!(indexes(&read_all(&mut recovered).await), vec![1, 2], "acknowledged appends are durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_crash_in_the_journal() {
    // Appends are acknowledged once their journal record is fsync'd; redb gets them at the next
    // checkpoint. A copy of the files taken right after the acknowledgement (the store still
    // open: a crash) has them, from the journal; without the journal it does not.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), NO_CAP);
    store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
    store.blocking_append(vec![blank(1, 1), put(1, 2, "a", b"1")]).await.unwrap();
    store.blocking_append(vec![put(1, 3, "b", b"2")]).await.unwrap();
    let journal = super::journal::path_beside(std::path::Path::new(LOG_FILE));
    let journal = journal.file_name().unwrap().to_str().unwrap();
    let crashed = copy_dir_files(dir.path(), &[LOG_FILE, journal]);
    let without_journal = copy_dir_files(dir.path(), &[LOG_FILE]);
    let mut recovered = open_log(crashed.path(), NO_CAP);
    assert_eq!(indexes(&read_all(&mut recovered).await), vec![1, 2, 3], "acknowledged appends are durable");
    assert_eq!(recovered.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
    let mut bare = open_log(without_journal.path(), NO_CAP);
    assert!(read_all(&mut bare).await.is_empty(), "the entries were in the journal only");
    // Recovery moved them into redb: after one more reopen (and a later append) they are still there.
    recovered.blocking_append(vec![put(1, 4, "c", b"3")]).await.unwrap();
    drop(recovered);
    let mut again = open_log(crashed.path(), NO_CAP);
    assert_eq!(indexes(&read_all(&mut again).await), vec![1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = vec![membership(1, 1, &[1, 2, 3])];
    entries.extend((2..=20).map(|i| put(1, i, &format!("k{i}"), format!("v{i}").as_bytes())));
    {
        let mut store = open_log(dir.path(), NO_CAP);
        store.blocking_append(entries[..10].to_vec()).await.unwrap();
        store.blocking_append(entries[10..].to_vec()).await.unwrap();
        store.purge(log_id(1, 4)).await.unwrap();
        let _reader = store.get_log_reader().await;
    }
    let mut store = open_log(dir.path(), NO_CAP);
    assert_eq!(read_all(&mut store).await, entries[4..].to_vec());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(1, 20)));
}

// ---------------------------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_put_delete_cas_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));

    let results = apply(&mut sm, vec![blank(1, 1), membership(1, 2, &[1, 2])]).await;
    assert_eq!(results, vec![ApplyResult(vec![]), ApplyResult(vec![])], "Raft's own entries have no outcome");

    // Put: creates, then modifies; mod_revision is the log index, version counts writes.
    assert_eq!(apply_write(&mut sm, put(1, 3, "a", b"v1")).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v1", 3, 3, 1)));
    assert_eq!(apply_write(&mut sm, put(1, 4, "a", b"v2")).await, WriteOutcome::Put { revision: 4 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v2", 3, 4, 2)));

    // Cas with the current value succeeds.
    assert_eq!(
        apply_write(&mut sm, cas(1, 5, "a", Some(b"v2"), b"v3")).await,
        WriteOutcome::Cas { revision: 5, succeeded: true, current: None }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas with a stale value fails, reports the current value and changes nothing.
    assert_eq!(
        apply_write(&mut sm, cas(1, 6, "a", Some(b"v2"), b"v4")).await,
        WriteOutcome::Cas { revision: 6, succeeded: false, current: Some(b"v3".to_vec()) }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas expecting absence succeeds only when the key is absent.
    assert_eq!(
        apply_write(&mut sm, cas(1, 7, "b", None, b"b1")).await,
        WriteOutcome::Cas { revision: 7, succeeded: true, current: None }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    assert_eq!(
        apply_write(&mut sm, cas(1, 8, "b", None, b"b2")).await,
        WriteOutcome::Cas { revision: 8, succeeded: false, current: Some(b"b1".to_vec()) }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    // Cas expecting a value of an absent key fails and does not create it.
    assert_eq!(
        apply_write(&mut sm, cas(1, 9, "c", Some(b"x"), b"c1")).await,
        WriteOutcome::Cas { revision: 9, succeeded: false, current: None }
    );
    assert_eq!(get(&r, "c"), None);

    // Delete reports whether the key existed; a put after a delete starts a new life.
    assert_eq!(apply_write(&mut sm, delete(2, 10, "a")).await, WriteOutcome::Delete { revision: 10, deleted: true });
    assert_eq!(get(&r, "a"), None);
    assert_eq!(apply_write(&mut sm, delete(2, 11, "a")).await, WriteOutcome::Delete { revision: 11, deleted: false });
    assert_eq!(apply_write(&mut sm, put(2, 12, "a", b"v5")).await, WriteOutcome::Put { revision: 12 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v5", 12, 12, 1)), "version and create_revision reset");

    // Batch: every op at the batch's revision, in order.
    let ops = vec![bput("x", b"x1"), bput("y", b"y1"), bdel("b"), bput("a", b"v6")];
    assert_eq!(apply_write(&mut sm, batch(2, 13, ops)).await, WriteOutcome::Batch { revision: 13 });
    assert_eq!(get(&r, "x"), Some(kv("x", b"x1", 13, 13, 1)));
    assert_eq!(get(&r, "y"), Some(kv("y", b"y1", 13, 13, 1)));
    assert_eq!(get(&r, "b"), None);
    assert_eq!(get(&r, "a"), Some(kv("a", b"v6", 12, 13, 2)));
    let ops = vec![bput("z", b"z1"), bdel("z"), bdel("y"), bput("y", b"y2"), bput("x", b"x2"), bput("x", b"x3")];
    assert_eq!(apply_write(&mut sm, batch(2, 14, ops)).await, WriteOutcome::Batch { revision: 14 });
    assert_eq!(get(&r, "z"), None, "put then delete in one batch leaves nothing");
    assert_eq!(get(&r, "y"), Some(kv("y", b"y2", 14, 14, 1)), "delete then put in one batch recreates");
    assert_eq!(get(&r, "x"), Some(kv("x", b"x3", 13, 14, 3)), "each put of a batch counts as a write");

    // Several entries in one apply: one result each, in order, each seeing the ones before.
    let results = apply(
        &mut sm,
        vec![put(3, 15, "m", b"1"), cas(3, 16, "m", Some(b"1"), b"2"), blank(3, 17), delete(3, 18, "m")],
    )
    .await;
    assert_eq!(
        results,
        vec![
            ApplyResult(vec![WriteOutcome::Put { revision: 15 }]),
            ApplyResult(vec![WriteOutcome::Cas { revision: 16, succeeded: true, current: None }]),
            ApplyResult(vec![]),
            ApplyResult(vec![WriteOutcome::Delete { revision: 18, deleted: true }]),
        ]
    );
    assert_eq!(get(&r, "m"), None);

    let (last_applied, stored) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id(3, 18)));
    assert_eq!(stored, StoredMembership::new(Some(log_id(1, 2)), membership_of(&[1, 2])));
    assert_eq!(r.last_applied().unwrap(), Some(log_id(3, 18)));
    let keys: Vec<Vec<u8>> = all_keys(&r).into_iter().map(|k| k.key).collect();
    assert_eq!(keys, vec![b"a".to_vec(), b"x".to_vec(), b"y".to_vec()]);
    assert_eq!(r.key_count().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_writes_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let x = client(1);
    let y = client(2);
    let z = client(3);

    // A CAS that succeeded, retried at a later index: the first outcome again, nothing re-applied
    // (re-applying would now fail the CAS and report the current value).
    let cas_req = request(x, 1, WriteCommand::Cas { key: b"k".to_vec(), expected: None, new_value: b"v1".to_vec() });
    let first = apply_write(&mut sm, normal(1, 1, cas_req.clone())).await;
    assert_eq!(first, WriteOutcome::Cas { revision: 1, succeeded: true, current: None });
    assert_eq!(apply_write(&mut sm, normal(1, 2, cas_req.clone())).await, first);
    assert_eq!(get(&r, "k"), Some(kv("k", b"v1", 1, 1, 1)));

    // A put retried does not bump the version or the mod revision.
    let put_req = request(y, 1, put_cmd("p", b"a"));
    assert_eq!(apply_write(&mut sm, normal(1, 3, put_req.clone())).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(apply_write(&mut sm, normal(2, 4, put_req.clone())).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(get(&r, "p"), Some(kv("p", b"a", 3, 3, 1)));

    // The session moves on; an older sequence number is stale and changes nothing.
    assert_eq!(
        apply_write(&mut sm, normal(2, 5, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: 5 }
    );
    assert_eq!(apply_write(&mut sm, normal(2, 6, put_req.clone())).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));
    // The current sequence number still answers with its outcome after a stale one.
    assert_eq!(
        apply_write(&mut sm, normal(2, 7, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: 5 }
    );
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));

    // A retry in the same apply batch as the original is deduplicated too.
    let z_req = request(z, 1, put_cmd("q", b"z"));
    let results = apply(&mut sm, vec![normal(2, 8, z_req.clone()), normal(2, 9, z_req.clone())]).await;
    assert_eq!(results, vec![ApplyResult(vec![WriteOutcome::Put { revision: 8 }]); 2]);
    assert_eq!(get(&r, "q"), Some(kv("q", b"z", 8, 8, 1)));

    // One entry carrying several writes (concurrent client writes proposed together): each write
    // gets its own outcome, in order, with the entry's index as revision, and a retry inside the
    // same entry is answered with the first outcome.
    let w = client(0x57);
    let multi = Entry {
        log_id: log_id(2, 10),
        payload: EntryPayload::Normal(WriteBatch(vec![
            request(w, 1, put_cmd("m1", b"a")),
            request(client(0x58), 1, WriteCommand::Delete { key: b"q".to_vec() }),
            request(w, 1, put_cmd("m1", b"a")),
            request(
                client(0x59),
                1,
                WriteCommand::Cas { key: b"m2".to_vec(), expected: None, new_value: b"c".to_vec() },
            ),
        ])),
    };
    let results = apply(&mut sm, vec![multi]).await;
    assert_eq!(
        results,
        vec![ApplyResult(vec![
            WriteOutcome::Put { revision: 10 },
            WriteOutcome::Delete { revision: 10, deleted: true },
            WriteOutcome::Put { revision: 10 },
            WriteOutcome::Cas { revision: 10, succeeded: true, current: None },
        ])]
    );
    assert_eq!(get(&r, "m1"), Some(kv("m1", b"a", 10, 10, 1)));
    assert_eq!(get(&r, "q"), None);
    assert_eq!(get(&r, "m2"), Some(kv("m2", b"c", 10, 10, 1)));

    // Sessions survive a restart.
    drop((r, sm));
    let mut sm = open_sm(dir.path());
    assert_eq!(apply_write(&mut sm, normal(3, 10, cas_req)).await, first);
    assert_eq!(apply_write(&mut sm, normal(3, 11, put_req)).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&sm.reader(), "k"), Some(kv("k", b"v1", 1, 1, 1)));
    assert_eq!(get(&sm.reader(), "p"), Some(kv("p", b"b", 3, 5, 2)));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 11)), "deduplicated entries are applied");
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// Applies a membership entry and a mix of writes at indexes 1..=8; returns the last log id.
async fn populate(sm: &mut RedbStateMachine) -> LogId {
    let session_write = normal(1, 7, request(client(9), 4, put_cmd("s", b"session")));
    apply(
        sm,
        vec![
            membership(1, 1, &[1]),
            put(1, 2, "a", b"a1"),
            put(1, 3, "b", b"b1"),
            put(1, 4, "a", b"a2"),
            batch(1, 5, vec![bput("c", b"c1"), bput("d", b"d1")]),
            delete(1, 6, "d"),
            session_write,
            membership(2, 8, &[1, 2]),
        ],
    )
    .await;
    log_id(2, 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_round_trip() {
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = open_sm(dir_a.path());
    assert!(sm_a.get_current_snapshot().await.unwrap().is_none(), "no snapshot before the first build");
    let last = populate(&mut sm_a).await;

    let snap = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(last));
    assert_eq!(snap.meta.last_membership, StoredMembership::new(Some(log_id(2, 8)), membership_of(&[1, 2])));
    let data = snap.snapshot.get_ref().clone();
    let current_a = sm_a.get_current_snapshot().await.unwrap().expect("snapshot after build");
    assert_eq!(current_a.meta, snap.meta);
    assert_eq!(current_a.snapshot.get_ref(), &data);

    // Install into a fresh state machine.
    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = open_sm(dir_b.path());
    let mut rx = sm_b.begin_receiving_snapshot().await.unwrap();
    std::io::Write::write_all(&mut *rx, &data).unwrap();
    sm_b.install_snapshot(&snap.meta, rx).await.unwrap();

    // (`last_applied` after an install: see `install_snapshot_sets_last_applied`.)
    assert_eq!(sm_b.applied_state().await.unwrap().1, snap.meta.last_membership);
    let keys_a = all_keys(&sm_a.reader());
    assert_eq!(keys_a.len(), 4, "a, b, c, s");
    assert_eq!(all_keys(&sm_b.reader()), keys_a, "every key with the same value and revisions");
    let current_b = sm_b.get_current_snapshot().await.unwrap().expect("snapshot after install");
    assert_eq!(current_b.meta, snap.meta);
    assert_eq!(current_b.snapshot.get_ref(), &data);

    // Sessions travel with the snapshot: a retry on the new replica is still deduplicated.
    let retry = normal(2, 9, request(client(9), 4, put_cmd("s", b"session")));
    assert_eq!(apply_write(&mut sm_b, retry).await, WriteOutcome::Put { revision: 7 });
    assert_eq!(get(&sm_b.reader(), "s"), Some(kv("s", b"session", 7, 7, 1)));

    // Installing over a state machine with other state replaces all of it.
    let dir_c = tempfile::tempdir().unwrap();
    let mut sm_c = open_sm(dir_c.path());
    apply(
        &mut sm_c,
        vec![
            membership(1, 1, &[5]),
            put(1, 2, "only-in-c", b"x"),
            put(1, 3, "a", b"from-c"),
            normal(1, 4, request(client(7), 50, put_cmd("w", b"1"))),
        ],
    )
    .await;
    let mut rx = sm_c.begin_receiving_snapshot().await.unwrap();
    *rx = Cursor::new(data.clone());
    sm_c.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(get(&sm_c.reader(), "only-in-c"), None, "keys absent from the snapshot are removed");
    assert_eq!(get(&sm_c.reader(), "w"), None);
    assert_eq!(all_keys(&sm_c.reader()), keys_a);
    assert_eq!(sm_c.applied_state().await.unwrap().1, snap.meta.last_membership, "membership replaced");
    // Its old session went with it: client 7 starting over at seq 1 is not stale.
    let fresh = normal(2, 9, request(client(7), 1, put_cmd("w", b"2")));
    assert_eq!(apply_write(&mut sm_c, fresh).await, WriteOutcome::Put { revision: 9 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_snapshot_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = std::iter::once(membership(1, 1, &[1]))
        .chain((2..=10).map(|i| put(1, i, &format!("k{i}"), format!("v{i}").as_bytes())))
        .collect();
    let later: Vec<Entry> = (11..=12).map(|i| put(2, i, &format!("k{i}"), format!("v{i}").as_bytes())).collect();
    let snap_meta = {
        let mut store = open_log(dir.path(), NO_CAP);
        let mut sm = open_sm(dir.path());
        store.blocking_append(entries.clone()).await.unwrap();
        apply(&mut sm, entries.clone()).await;
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 10)));
        store.purge(log_id(1, 10)).await.unwrap();
        store.blocking_append(later.clone()).await.unwrap();
        apply(&mut sm, later.clone()).await;
        snap.meta
    };

    let mut store = open_log(dir.path(), NO_CAP);
    let mut sm = open_sm(dir.path());
    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot survives a restart");
    assert_eq!(current.meta, snap_meta);
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 10)));
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 10)));
    assert_eq!(state.last_log_id, Some(log_id(2, 12)));
    assert_eq!(read_all(&mut store).await, later);

    let (applied, stored) = sm.applied_state().await.unwrap();
    let applied = applied.expect("something applied");
    assert!(applied.index >= 10, "applied {applied} is behind the purged log");
    assert_eq!(stored, StoredMembership::new(Some(log_id(1, 1)), membership_of(&[1])));
    for i in 2..=applied.index {
        let key = format!("k{i}");
        let v = get(&sm.reader(), &key).unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(v.value, format!("v{i}").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_snapshot_makes_applied_state_durable() {
    // Clean restart.
    let dir = tempfile::tempdir().unwrap();
    let snap = {
        let mut sm = open_sm(dir.path());
        populate(&mut sm).await;
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap()
    };
    let mut sm = open_sm(dir.path());
    assert_eq!(sm.reader().last_applied().unwrap(), snap.meta.last_log_id);
    assert_eq!(sm.applied_state().await.unwrap().0, snap.meta.last_log_id);
    drop(sm);

    // Crash right after the build (files copied while open): applies before the build, made with
    // `Durability::None`, must be on disk, or openraft would purge log entries nobody can replay.
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let last = populate(&mut sm).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(last));
    apply(&mut sm, vec![put(2, 9, "after", b"1"), put(2, 10, "a", b"a3")]).await;
    let crashed = copy_dir_files(dir.path(), &[SM_FILE, SNAPSHOT_FILE]);
    let mut recovered = open_sm(crashed.path());
    let (applied, stored) = recovered.applied_state().await.unwrap();
    let applied = applied.expect("applied state is durable");
    assert!(applied >= last, "durable last_applied {applied} is behind the snapshot {last}");
    assert_eq!(stored, snap.meta.last_membership);
    let r = recovered.reader();
    for key in ["b", "c"] {
        assert_eq!(get(&r, key), get(&sm.reader(), key), "{key}");
    }
    // Whatever survived is one consistent state: the one at `applied`.
    if applied == last {
        assert_eq!(get(&r, "after"), None);
        assert_eq!(get(&r, "a").map(|k| k.value), Some(b"a2".to_vec()));
    } else {
        assert_eq!(applied, log_id(2, 10));
        assert_eq!(all_keys(&r), all_keys(&sm.reader()));
    }
    let current = recovered.get_current_snapshot().await.unwrap().expect("snapshot file is durable");
    assert_eq!(current.meta, snap.meta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_snapshot_survives_crash() {
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = open_sm(dir_a.path());
    populate(&mut sm_a).await;
    let snap = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();

    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = open_sm(dir_b.path());
    apply(&mut sm_b, vec![put(1, 1, "old", b"x")]).await;
    sm_b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let crashed = copy_dir_files(dir_b.path(), &[SM_FILE, SNAPSHOT_FILE]);
    let mut recovered = open_sm(crashed.path());
    assert_eq!(recovered.applied_state().await.unwrap().1, snap.meta.last_membership);
    assert_eq!(all_keys(&recovered.reader()), all_keys(&sm_a.reader()));
    assert_eq!(recovered.get_current_snapshot().await.unwrap().map(|s| s.meta), Some(snap.meta));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_snapshot_sets_last_applied() {
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = open_sm(dir_a.path());
    let last = populate(&mut sm_a).await;
    let snap = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let data = snap.snapshot.get_ref().clone();
    let expected = sm_a.applied_state().await.unwrap();
    assert_eq!(expected.0, Some(last));

    // Into a fresh state machine.
    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = open_sm(dir_b.path());
    let mut rx = sm_b.begin_receiving_snapshot().await.unwrap();
    *rx = Cursor::new(data.clone());
    sm_b.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(sm_b.applied_state().await.unwrap(), expected);
    assert_eq!(sm_b.reader().last_applied().unwrap(), Some(last));

    // Over a state machine that applied something else, then through a crash.
    let dir_c = tempfile::tempdir().unwrap();
    let mut sm_c = open_sm(dir_c.path());
    apply(&mut sm_c, vec![put(1, 1, "old", b"x")]).await;
    let mut rx = sm_c.begin_receiving_snapshot().await.unwrap();
    *rx = Cursor::new(data);
    sm_c.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(sm_c.applied_state().await.unwrap(), expected);
    let crashed = copy_dir_files(dir_c.path(), &[SM_FILE, SNAPSHOT_FILE]);
    assert_eq!(open_sm(crashed.path()).applied_state().await.unwrap(), expected);
}

// ---------------------------------------------------------------------------------------------
// openraft's conformance suite
// ---------------------------------------------------------------------------------------------

struct Builder;

impl StoreBuilder<TypeConfig, RedbLogStore, RedbStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, RedbStateMachine), OpenraftStorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_log(dir.path(), NO_CAP);
        let sm = open_sm(dir.path());
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// A page of large values ends early (by bytes), with a continuation that resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_pages_are_capped_in_bytes() {
    use crate::{
        api::{ReadConsistency, ScanRequest},
        raft::node::{scan_local, SCAN_PAGE_MAX_BYTES},
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let value = vec![7u8; 1024 * 1024];
    let n = SCAN_PAGE_MAX_BYTES / value.len() + 4;
    let entries: Vec<Entry> = (0..n).map(|i| put(1, i as u64 + 1, &format!("big/{i:03}"), &value)).collect();
    apply(&mut sm, entries).await;
    let reader = sm.reader();
    let mut req = ScanRequest {
        prefix: b"big/".to_vec(),
        start: None,
        end: None,
        limit: 1000,
        continuation: None,
        consistency: ReadConsistency::Stale,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = scan_local(&reader, &req, 1000).unwrap();
        pages += 1;
        let bytes: usize = page.entries.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        assert!(bytes <= SCAN_PAGE_MAX_BYTES + value.len() + 64, "page of {bytes} bytes");
        seen.extend(page.entries.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        match page.continuation {
            Some(c) => req.continuation = Some(c),
            None => break,
        }
    }
    assert!(pages >= 2, "large values need more than one page");
    let want: Vec<String> = (0..n).map(|i| format!("big/{i:03}")).collect();
    assert_eq!(seen, want);
}

// ---------------------------------------------------------------------------------------------
// State digests
// ---------------------------------------------------------------------------------------------

fn digest(sm: &RedbStateMachine) -> StateDigest {
    let d = sm.reader().digest().expect("digest");
    assert_eq!(sm.reader().recompute_digest().expect("recompute digest"), d, "incremental sum = full recount");
    d
}

fn at(client_id: Id128, seq: u64, timestamp_ms: u64, command: WriteCommand) -> WriteRequest {
    WriteRequest { session: WriteSession { client_id, seq }, command, timestamp_ms }
}

/// A log (indexes 1..=24) with every kind of change the digest must follow: overwrites, deletes
/// of present and absent keys, CAS that succeed and fail, batches that put and delete the same
/// key, session writes, retries, stale sequence numbers, membership changes, blank entries, and
/// sessions expiring by the leaders' clocks.
fn digest_log() -> Vec<Entry> {
    let (x, y) = (client(1), client(2));
    let late = 1_000 + crate::raft::state_machine::SESSION_TTL_MS + 1;
    vec![
        membership(1, 1, &[1]),
        blank(1, 2),
        put(1, 3, "a", b"a1"),
        put(1, 4, "b", b"b1"),
        put(1, 5, "a", b"a2"),
        delete(1, 6, "b"),
        delete(1, 7, "never"),
        cas(1, 8, "a", Some(b"a2"), b"a3"),
        cas(1, 9, "a", Some(b"nope"), b"a4"),
        cas(1, 10, "c", None, b"c1"),
        batch(1, 11, vec![bput("d", b"d1"), bput("e", b"e1"), bdel("d"), bput("d", b"d2"), bdel("c")]),
        normal(1, 12, request(x, 1, put_cmd("x", b"x1"))),
        normal(1, 13, request(x, 1, put_cmd("x", b"x1"))),
        normal(1, 14, request(x, 2, put_cmd("x", b"x2"))),
        normal(1, 15, request(x, 1, put_cmd("x", b"x1"))),
        membership(2, 16, &[1, 2]),
        blank(2, 17),
        normal(2, 18, request(y, 7, WriteCommand::Delete { key: b"e".to_vec() })),
        put(2, 19, "b", b"b2"),
        batch(2, 20, vec![bdel("b"), bput("f", b"f1")]),
        // A later leader clock: every session above is now idle too long and is forgotten.
        normal(2, 21, at(y, 8, late, put_cmd("y", b"y1"))),
        normal(2, 22, at(x, 1, late, put_cmd("x", b"x-again"))),
        cas(2, 23, "x", Some(b"x-again"), b"x3"),
        put(2, 24, "a", b"a5"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_log_gives_same_digest_however_it_is_applied() {
    let log = digest_log();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut sm_a, mut sm_b) = (open_sm(dir_a.path()), open_sm(dir_b.path()));
    assert_eq!(digest(&sm_a), digest(&sm_b), "two empty state machines");
    assert_eq!(digest(&sm_a).applied_index, 0);

    // One entry at a time on A (the digest changes with every entry, if only by its index); in
    // uneven batches on B.
    let mut seen = BTreeSet::new();
    seen.insert(digest(&sm_a).digest);
    for entry in log.clone() {
        let index = entry.log_id.index;
        apply(&mut sm_a, vec![entry]).await;
        let d = digest(&sm_a);
        assert_eq!(d.applied_index, index);
        assert!(seen.insert(d.digest), "a new digest at index {index}");
    }
    let mut rest = log.clone();
    for n in [1, 5, 2, 9, 7] {
        let chunk: Vec<Entry> = rest.drain(..n.min(rest.len())).collect();
        apply(&mut sm_b, chunk).await;
    }
    assert!(rest.is_empty());
    assert_eq!(digest(&sm_a), digest(&sm_b));
    assert_eq!(all_keys(&sm_a.reader()), all_keys(&sm_b.reader()));

    // One value different, everything else the same: a different digest at the same index.
    let dir_c = tempfile::tempdir().unwrap();
    let mut sm_c = open_sm(dir_c.path());
    let mut changed = log.clone();
    changed[23] = put(2, 24, "a", b"a6");
    apply(&mut sm_c, changed).await;
    assert_eq!(digest(&sm_c).applied_index, 24);
    assert_ne!(digest(&sm_c), digest(&sm_a));

    // Same keys and values, other revisions (the write came one entry later).
    let dir_d = tempfile::tempdir().unwrap();
    let mut sm_d = open_sm(dir_d.path());
    let mut shifted = log[..23].to_vec();
    shifted.push(blank(2, 24));
    shifted.push(put(2, 25, "a", b"a5"));
    apply(&mut sm_d, shifted).await;
    apply(&mut sm_a, vec![blank(2, 25)]).await;
    assert_eq!(all_keys(&sm_d.reader()).len(), all_keys(&sm_a.reader()).len());
    assert_ne!(digest(&sm_d), digest(&sm_a), "mod revisions differ");

    // Survives a restart unchanged.
    let before = digest(&sm_a);
    drop(sm_a);
    assert_eq!(digest(&open_sm(dir_a.path())), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_stale_writes_change_only_the_index() {
    let x = client(1);
    let first = normal(1, 1, request(x, 1, put_cmd("k", b"v")));
    let (dir_a, dir_b, dir_c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut sm_a, mut sm_b, mut sm_c) = (open_sm(dir_a.path()), open_sm(dir_b.path()), open_sm(dir_c.path()));
    apply(&mut sm_a, vec![first.clone(), normal(1, 2, request(x, 1, put_cmd("k", b"v")))]).await;
    apply(&mut sm_b, vec![first.clone(), blank(1, 2)]).await;
    assert_eq!(digest(&sm_a), digest(&sm_b), "a retry is a no-op");

    apply(
        &mut sm_a,
        vec![normal(1, 3, request(x, 2, put_cmd("k", b"w"))), normal(1, 4, request(x, 1, put_cmd("k", b"v")))],
    )
    .await;
    apply(&mut sm_b, vec![normal(1, 3, request(x, 2, put_cmd("k", b"w"))), blank(1, 4)]).await;
    assert_eq!(digest(&sm_a), digest(&sm_b), "a stale write is a no-op");

    // Sessions are part of the state: the same keys written by another session differ.
    apply(&mut sm_c, vec![first, blank(1, 2), normal(1, 3, request(client(2), 1, put_cmd("k", b"w"))), blank(1, 4)])
        .await;
    assert_eq!(get(&sm_c.reader(), "k").map(|k| (k.value, k.version)), Some((b"w".to_vec(), 2)));
    assert_ne!(digest(&sm_c), digest(&sm_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_install_midway_gives_the_digest_of_a_straight_replay() {
    let log = digest_log();
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = open_sm(dir_a.path());
    apply(&mut sm_a, log.clone()).await;
    let want = digest(&sm_a);

    for cut in [1usize, 11, 15, 20, 23, 24] {
        // The leader: applies up to `cut` and snapshots there.
        let dir_l = tempfile::tempdir().unwrap();
        let mut leader = open_sm(dir_l.path());
        apply(&mut leader, log[..cut].to_vec()).await;
        let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(cut as u64));

        // A fresh follower and one with other state install it, then apply the rest of the log.
        for stale_state in [false, true] {
            let dir_f = tempfile::tempdir().unwrap();
            let mut follower = open_sm(dir_f.path());
            if stale_state {
                apply(
                    &mut follower,
                    vec![put(1, 1, "old", b"x"), normal(1, 2, request(client(3), 5, put_cmd("o", b"y")))],
                )
                .await;
            }
            let mut rx = follower.begin_receiving_snapshot().await.unwrap();
            *rx = Cursor::new(snap.snapshot.get_ref().clone());
            follower.install_snapshot(&snap.meta, rx).await.unwrap();
            assert_eq!(digest(&follower), digest(&leader), "cut {cut}: right after the install");
            apply(&mut follower, log[cut..].to_vec()).await;
            assert_eq!(digest(&follower), want, "cut {cut} (over old state: {stale_state})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_sum_is_rebuilt_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    apply(&mut sm, digest_log()).await;
    let want = digest(&sm);
    sm.forget_digest_sum().unwrap();
    assert!(sm.reader().digest().is_err(), "no sum, no digest (an error, not a panic)");
    drop(sm);
    let mut sm = open_sm(dir.path());
    assert_eq!(digest(&sm), want, "rebuilt from the tables on open");
    apply(&mut sm, vec![put(3, 25, "z", b"1")]).await;
    digest(&sm);
}

/// The digest is part of the wire and of stored data: its definition must not change by
/// accident (a new blake3, postcard or openraft version, a refactor of the sum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_definition_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    assert_eq!(digest(&sm).hex(), "f8be9c3f53dc53339c8fa5c6d9f2f81e57275a5cc607b5f03fd61e49df235a97");
    apply(&mut sm, digest_log()).await;
    assert_eq!(digest(&sm).hex(), "0dc945edd518416b81ec95a84c592791508ce89e395f82e6ad4810a5fdb33999");
}

// ---------------------------------------------------------------------------------------------
// The leader's own appends: acknowledged before their fsync, applied after it
// ---------------------------------------------------------------------------------------------

/// What a [`GatedDisk`] does with `sync_data`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gate {
    Open,
    /// Blocks every sync until the gate changes.
    Closed,
    /// Fails every sync.
    Failing,
}

/// An in-memory disk whose fsync the test holds back or makes fail.
#[derive(Debug, Clone)]
struct GatedDisk {
    inner: std::sync::Arc<redb::backends::InMemoryBackend>,
    gate: std::sync::Arc<(std::sync::Mutex<Gate>, std::sync::Condvar)>,
}

impl GatedDisk {
    fn new() -> Self {
        GatedDisk {
            inner: std::sync::Arc::new(redb::backends::InMemoryBackend::new()),
            gate: std::sync::Arc::new((std::sync::Mutex::new(Gate::Open), std::sync::Condvar::new())),
        }
    }

    /// Another disk behind the same gate (the log's journal beside its database).
    fn sibling(&self) -> Self {
        GatedDisk { inner: std::sync::Arc::new(redb::backends::InMemoryBackend::new()), gate: self.gate.clone() }
    }

    fn set(&self, gate: Gate) {
        *self.gate.0.lock().unwrap() = gate;
        self.gate.1.notify_all();
    }
}

impl redb::StorageBackend for GatedDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let (lock, wake) = &*self.gate;
        let mut gate = lock.lock().unwrap();
        while *gate == Gate::Closed {
            gate = wake.wait(gate).unwrap();
        }
        if *gate == Gate::Failing {
            return Err(std::io::Error::other("simulated disk failure"));
        }
        drop(gate);
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)
    }
}

fn entry_by(leader: u64, term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(term, leader), index), payload }
}

fn put_payload(key: &str) -> EntryPayload<TypeConfig> {
    EntryPayload::Normal(request(client(7), 1, put_cmd(key, b"v")).into())
}

/// Lets spawned tasks run; what is still unfinished after this is waiting for something.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A leader's stores (node 1, leader of `term`): the log on a gated disk with overlapped own
/// appends, the state machine waiting for it.
async fn overlapping_leader(term: u64) -> (GatedDisk, RedbLogStore, RedbStateMachine, TempDir) {
    let disk = GatedDisk::new();
    let mut log = RedbLogStore::open_with_backends(disk.clone(), disk.sibling(), super::journal::CAPACITY, NO_CAP)
        .unwrap()
        .overlap_own_appends(1);
    log.save_vote(&Vote::new_committed(term, 1)).await.unwrap();
    let snap = tempfile::tempdir().unwrap();
    let sm = RedbStateMachine::open_with_backend(redb::backends::InMemoryBackend::new(), snap.path())
        .unwrap()
        .wait_for_log(log.durable());
    (disk, log, sm, snap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_appends_are_acknowledged_before_fsync_and_applied_after_it() {
    let (disk, mut log, mut sm, _snap) = overlapping_leader(2).await;
    let durable = log.durable();
    let reader = sm.reader();

    disk.set(Gate::Closed);
    // The leader's own normal entry of its term: acknowledged while its fsync is held back.
    let own = entry_by(1, 2, 1, put_payload("a"));
    tokio::time::timeout(WAIT, log.blocking_append([own.clone()]))
        .await
        .expect("the leader's own append is acknowledged before its fsync")
        .unwrap();
    assert_eq!(indexes(&read_all(&mut log).await), vec![1], "readable for replication at once");
    assert_eq!(durable.borrow().last, None, "not durable yet");

    // Nothing acts on it before it is durable: the state machine waits...
    let apply = tokio::spawn(async move {
        let out = sm.apply([own]).await;
        (sm, out)
    });
    // ...and a membership entry is acknowledged only after its own fsync.
    let mut log2 = log.clone();
    let member = tokio::spawn(async move {
        log2.blocking_append([entry_by(1, 2, 2, EntryPayload::Membership(membership_of(&[1, 2])))]).await
    });
    settle().await;
    assert!(!apply.is_finished(), "applied before the leader's log held the entry durably");
    assert!(!member.is_finished(), "a membership entry was acknowledged before its fsync");
    assert_eq!(get(&reader, "a"), None);

    disk.set(Gate::Open);
    let (_sm, applied) = tokio::time::timeout(WAIT, apply).await.expect("applied once durable").unwrap();
    assert_eq!(applied.unwrap().len(), 1);
    assert_eq!(get(&reader, "a").map(|kv| kv.value), Some(b"v".to_vec()));
    tokio::time::timeout(WAIT, member).await.expect("membership append acknowledged").unwrap().unwrap();
    assert_eq!(durable.borrow().last.map(|l| l.index), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_appends_wait_for_their_fsync() {
    let disk = GatedDisk::new();
    let mut log = RedbLogStore::open_with_backends(disk.clone(), disk.sibling(), super::journal::CAPACITY, NO_CAP)
        .unwrap()
        .overlap_own_appends(1);
    // Node 2 leads term 3; node 1 appends what it is sent, and its own entries of an older term.
    log.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
    disk.set(Gate::Closed);
    for entries in [
        vec![entry_by(2, 3, 1, put_payload("a"))],
        vec![entry_by(1, 2, 2, put_payload("b"))],
        vec![entry_by(2, 3, 3, EntryPayload::Blank)],
    ] {
        let mut log2 = log.clone();
        let append = tokio::spawn(async move { log2.blocking_append(entries).await });
        settle().await;
        assert!(!append.is_finished(), "a follower acknowledged an append before its fsync");
        disk.set(Gate::Open);
        tokio::time::timeout(WAIT, append).await.expect("acknowledged after the fsync").unwrap().unwrap();
        disk.set(Gate::Closed);
    }
    disk.set(Gate::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_fsync_stops_the_state_machine() {
    let (disk, mut log, mut sm, _snap) = overlapping_leader(1).await;
    let reader = sm.reader();
    disk.set(Gate::Failing);
    let own = entry_by(1, 1, 1, put_payload("lost"));
    tokio::time::timeout(WAIT, log.blocking_append([own.clone()])).await.expect("acknowledged early").unwrap();
    let err = tokio::time::timeout(WAIT, sm.apply([own])).await.expect("apply gives up").unwrap_err();
    assert!(err.to_string().contains("could not be written"), "{err}");
    assert_eq!(get(&reader, "lost"), None, "a write the disk refused was applied");
}

#[test]
fn commit_index_sent_to_followers_never_passes_the_durable_log() {
    use super::network::capped_commit;
    let (c, d) = (Some(log_id(2, 9)), Some(log_id(2, 7)));
    assert_eq!(capped_commit(c, d), d, "capped at the durable log");
    assert_eq!(capped_commit(d, c), d, "a durable log ahead of the commit changes nothing");
    assert_eq!(capped_commit(c, None), None);
    assert_eq!(capped_commit(None, d), None);
    assert_eq!(capped_commit(c, c), c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_watch_follows_appends_truncations_and_purges() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), NO_CAP);
    let durable = log.durable();
    assert_eq!(durable.borrow().last, None);
    log.blocking_append((1..=3).map(|i| put(1, i, "k", b"v"))).await.unwrap();
    assert_eq!(durable.borrow().last, Some(log_id(1, 3)));
    log.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    assert_eq!(durable.borrow().last, Some(log_id(1, 3)), "a vote leaves the log's end alone");
    log.truncate(log_id(1, 2)).await.unwrap();
    assert_eq!(durable.borrow().last, Some(log_id(1, 1)), "truncation moves the end back");
    log.purge(log_id(1, 1)).await.unwrap();
    assert_eq!(durable.borrow().last, Some(log_id(1, 1)), "an emptied log ends at its last purged id");
    drop(log);
    let reopened = open_log(dir.path(), NO_CAP);
    assert_eq!(reopened.durable().borrow().last, Some(log_id(1, 1)), "and says so after a restart");
}

/// A member's address comes from its recorded endpoint id, parsed once and then remembered:
/// the same answer every time, for valid and for invalid ids.
#[test]
fn member_addresses_parse_the_same_every_time() {
    let key = iroh::SecretKey::generate().public();
    let member = MemberNode { endpoint_id: *key.as_bytes(), addrs: vec!["127.0.0.1:7600".parse().unwrap()] };
    for _ in 0..3 {
        let addr = member.endpoint_addr().expect("a valid id gives an address");
        assert_eq!(addr.id, key);
        assert_eq!(addr.ip_addrs().copied().collect::<Vec<_>>(), member.addrs);
    }
    let invalid = (0..=255u8)
        .map(|b| [b; 32])
        .find(|bytes| iroh::EndpointId::from_bytes(bytes).is_err())
        .expect("some 32-byte strings are not curve points");
    let bad = MemberNode { endpoint_id: invalid, addrs: member.addrs.clone() };
    for _ in 0..3 {
        assert!(bad.endpoint_addr().is_none(), "an invalid id never gives an address");
    }
}
