//! The leader's own appends: acknowledged before their fsync, applied after it; followers wait; a failed fsync stops the state machine; the durable watch.

use super::*;

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
    let mut log =
        RedbLogStore::open_with_backends(disk.clone(), disk.sibling(), crate::storage::journal::CAPACITY, NO_CAP)
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
    let mut log =
        RedbLogStore::open_with_backends(disk.clone(), disk.sibling(), crate::storage::journal::CAPACITY, NO_CAP)
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
