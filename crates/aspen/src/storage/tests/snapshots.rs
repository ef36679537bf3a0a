//! Snapshots: build, stream, install, restart after purge, durability of what a snapshot covers,
//! and refusal of a damaged or mismatched stream with the old state kept.

use super::*;

/// A state machine holding [`populate`]'s state, with its snapshot's metadata and bytes.
async fn populated_snapshot() -> (TempDir, RedbStateMachine, SnapshotMeta, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    populate(&mut sm).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let meta = snap.meta.clone();
    let data = snapshot_bytes(snap).await;
    (dir, sm, meta, data)
}

/// A state machine with a state of its own (a member 5 and the key `key`), and its fingerprint.
async fn other_state(key: &str) -> (TempDir, RedbStateMachine, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    apply(&mut sm, vec![membership(1, 1, &[5]), put(1, 2, key, b"x")]).await;
    let before = sm.fingerprint().unwrap();
    (dir, sm, before)
}

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
    let meta = snap.meta.clone();
    let data = snapshot_bytes(snap).await;
    let current_a = sm_a.get_current_snapshot().await.unwrap().expect("snapshot after build");
    assert_eq!(
        (&current_a.meta.last_log_id, &current_a.meta.last_membership),
        (&meta.last_log_id, &meta.last_membership)
    );
    assert_eq!(snapshot_bytes(current_a).await, data, "the same state streams the same bytes");

    // Install into a fresh state machine.
    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = open_sm(dir_b.path());
    let rx = receive(&mut sm_b, &data).await;
    sm_b.install_snapshot(&meta, rx).await.unwrap();

    // (`last_applied` after an install: see `install_snapshot_sets_last_applied`.)
    assert_eq!(sm_b.applied_state().await.unwrap().1, meta.last_membership);
    let keys_a = all_keys(&sm_a.reader());
    assert_eq!(keys_a.len(), 4, "a, b, c, s");
    assert_eq!(all_keys(&sm_b.reader()), keys_a, "every key with the same value and revisions");
    assert_eq!(sm_b.reader().digest().unwrap(), sm_a.reader().digest().unwrap());
    assert_digest_recounts(&sm_b.reader());
    let current_b = sm_b.get_current_snapshot().await.unwrap().expect("snapshot after install");
    assert_eq!(current_b.meta.last_log_id, meta.last_log_id);
    assert_eq!(snapshot_bytes(current_b).await, data, "the installed state streams the same bytes");

    // Sessions travel with the snapshot: a retry on the new replica is still deduplicated.
    let retry = normal(2, 9, request(client(9), 4, put_cmd("s", b"session")));
    assert_eq!(apply_write(&mut sm_b, retry).await, WriteOutcome::Put { revision: rev(7) });
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
    let rx = receive(&mut sm_c, &data).await;
    sm_c.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(get(&sm_c.reader(), "only-in-c"), None, "keys absent from the snapshot are removed");
    assert_eq!(get(&sm_c.reader(), "w"), None);
    assert_eq!(all_keys(&sm_c.reader()), keys_a);
    assert_eq!(sm_c.applied_state().await.unwrap().1, meta.last_membership, "membership replaced");
    // Its old session went with it: client 7 starting over at seq 1 is not stale.
    let fresh = normal(2, 9, request(client(7), 1, put_cmd("w", b"2")));
    assert_eq!(apply_write(&mut sm_c, fresh).await, WriteOutcome::Put { revision: rev(9) });
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
    // The current snapshot is the state machine: at or after the one built (what the last
    // durable commit kept of the later applies).
    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot survives a restart");
    assert!(current.meta.last_log_id >= snap_meta.last_log_id, "{current:?} is behind {snap_meta:?}");
    assert_eq!(current.meta.last_log_id, sm.applied_state().await.unwrap().0);
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
    let built = {
        let mut sm = open_sm(dir.path());
        populate(&mut sm).await;
        // Only its metadata: an unread snapshot keeps its read of the database, and so the
        // database open (`state_machine::db_file::SmRead`).
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap().meta
    };
    let mut sm = open_sm(dir.path());
    assert_eq!(sm.reader().last_applied().unwrap(), built.last_log_id);
    assert_eq!(sm.applied_state().await.unwrap().0, built.last_log_id);
    drop(sm);

    // Crash right after the build (files copied while open): applies before the build, made with
    // `Durability::None`, must be on disk, or openraft would purge log entries nobody can replay.
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let last = populate(&mut sm).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(last));
    apply(&mut sm, vec![put(2, 9, "after", b"1"), put(2, 10, "a", b"a3")]).await;
    let crashed = copy_dir_files(dir.path(), &[SM_FILE]);
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
    let current = recovered.get_current_snapshot().await.unwrap().expect("a snapshot after the crash");
    assert_eq!(current.meta.last_log_id, Some(applied), "the snapshot is the recovered state");
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
    // Installed straight from what the builder returned: its file is made on first read.
    let meta = snap.meta.clone();
    sm_b.install_snapshot(&meta, snap.snapshot).await.unwrap();
    let crashed = copy_dir_files(dir_b.path(), &[SM_FILE]);
    let mut recovered = open_sm(crashed.path());
    assert_eq!(recovered.applied_state().await.unwrap().1, meta.last_membership);
    assert_eq!(all_keys(&recovered.reader()), all_keys(&sm_a.reader()));
    let current = recovered.get_current_snapshot().await.unwrap().expect("a snapshot after the crash");
    assert_eq!(current.meta.last_log_id, meta.last_log_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_snapshot_sets_last_applied() {
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = open_sm(dir_a.path());
    let last = populate(&mut sm_a).await;
    let snap = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let meta = snap.meta.clone();
    let data = snapshot_bytes(snap).await;
    let expected = sm_a.applied_state().await.unwrap();
    assert_eq!(expected.0, Some(last));

    // Into a fresh state machine.
    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = open_sm(dir_b.path());
    let rx = receive(&mut sm_b, &data).await;
    sm_b.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(sm_b.applied_state().await.unwrap(), expected);
    assert_eq!(sm_b.reader().last_applied().unwrap(), Some(last));

    // Over a state machine that applied something else, then through a crash.
    let dir_c = tempfile::tempdir().unwrap();
    let mut sm_c = open_sm(dir_c.path());
    apply(&mut sm_c, vec![put(1, 1, "old", b"x")]).await;
    let rx = receive(&mut sm_c, &data).await;
    sm_c.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(sm_c.applied_state().await.unwrap(), expected);
    let crashed = copy_dir_files(dir_c.path(), &[SM_FILE]);
    assert_eq!(open_sm(crashed.path()).applied_state().await.unwrap(), expected);
}

/// A stream that is damaged, cut short, padded, of another state or not a snapshot at all is
/// refused, and the receiver keeps its old state whole; the right stream installs after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_mismatched_stream_is_refused_and_the_old_state_kept() {
    let (_dir_a, sm_a, meta, data) = populated_snapshot().await;

    let (_dir_c, mut sm_c, before) = other_state("only-in-c").await;

    let mut flipped = data.clone();
    flipped[data.len() / 2] ^= 0x40;
    let mut padded = data.clone();
    padded.push(0);
    let mut other_meta = meta.clone();
    other_meta.last_log_id = Some(log_id(2, 9));
    let cases: Vec<(&str, Vec<u8>, &SnapshotMeta)> = vec![
        ("a flipped bit", flipped, &meta),
        ("cut short", data[..data.len() - 10].to_vec(), &meta),
        ("cut after the header", data[..40].to_vec(), &meta),
        ("a byte after the hash", padded, &meta),
        ("sent as another snapshot", data.clone(), &other_meta),
        ("empty", Vec::new(), &meta),
        ("not a snapshot", b"postcard bytes of an older format".to_vec(), &meta),
    ];
    for (what, bytes, m) in cases {
        let rx = receive(&mut sm_c, &bytes).await;
        let err = sm_c.install_snapshot(m, rx).await.expect_err(what);
        assert!(err.to_string().contains("snapshot file"), "{what}: {err}");
        assert_eq!(sm_c.fingerprint().unwrap(), before, "{what}: the old state is kept whole");
        assert_eq!(get(&sm_c.reader(), "only-in-c").map(|k| k.value), Some(b"x".to_vec()), "{what}");
    }
    let rx = receive(&mut sm_c, &data).await;
    sm_c.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(sm_c.reader().digest().unwrap(), sm_a.reader().digest().unwrap());
}

/// A state many times the database cache streams out and in: every key arrives, the digests
/// agree, and the stream leaves no file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_the_cache_round_trips() {
    const CACHE: usize = 1 << 20;
    let dir_a = tempfile::tempdir().unwrap();
    let mut sm_a = RedbStateMachine::open(&dir_a.path().join(SM_FILE), CACHE).unwrap();
    let value = vec![0xa5u8; 2048];
    let mut entries = vec![membership(1, 1, &[1])];
    for i in 0..4096u64 {
        entries.push(put(1, i + 2, &format!("key-{i:06}"), &value));
    }
    for chunk in entries.chunks(256) {
        apply(&mut sm_a, chunk.to_vec()).await;
    }
    let snap = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let meta = snap.meta.clone();
    let data = snapshot_bytes(snap).await;
    assert!(data.len() > 8 * CACHE, "the stream ({} bytes) is 8 x the cache", data.len());

    let dir_b = tempfile::tempdir().unwrap();
    let mut sm_b = RedbStateMachine::open(&dir_b.path().join(SM_FILE), CACHE).unwrap();
    let rx = receive(&mut sm_b, &data).await;
    sm_b.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(sm_b.reader().digest().unwrap(), sm_a.reader().digest().unwrap());
    assert_digest_recounts(&sm_b.reader());
    assert_eq!(sm_b.reader().key_count().unwrap(), 4096);
    for dir in [dir_a.path(), dir_b.path()] {
        let names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, [SM_FILE], "only the database is left in {dir:?}");
    }
}

/// Files an older version or a crash left beside the database are removed when it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_snapshot_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sm(dir.path()));
    for name in ["snapshot.bin", "snapshot.bin.1-2-3.tmp", "snapshot-00000000deadbeef.tmp"] {
        std::fs::write(dir.path().join(name), b"old").unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
    drop(open_sm(dir.path()));
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["notes.txt", SM_FILE]);
}

/// openraft's sender reads a snapshot the way `Chunked::send_snapshot` does: a seek to the end for
/// its length, then seeks and reads chunk by chunk. The lazy file is made by the first seek.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reads_by_seeking_as_openraft_sends_it() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    populate(&mut sm).await;
    let whole = snapshot_bytes(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    let mut snap = sm.get_current_snapshot().await.unwrap().unwrap();
    let end = snap.snapshot.seek(std::io::SeekFrom::End(0)).await.unwrap();
    assert_eq!(end, whole.len() as u64);
    let mut got = Vec::new();
    let mut offset = 0;
    while offset < end {
        snap.snapshot.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        let mut buf = Vec::with_capacity(100);
        while buf.capacity() > buf.len() {
            if snap.snapshot.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        offset += buf.len() as u64;
        got.extend(buf);
    }
    assert_eq!(got, whole);
}

/// The network's path (docs/design.md §6.4): a stream staged as it arrives, in pieces of any
/// size, changes nothing until it is whole and installed; then the replica matches. A transfer
/// replaced by a newer one, or not finished, cannot be installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_staged_in_any_pieces_installs_only_when_whole() {
    let (_dir_a, sm_a, meta, data) = populated_snapshot().await;

    for piece in [1, 7, 64, data.len()] {
        let (_dir_b, mut sm_b, before) = other_state("only-in-b").await;
        let mut incoming = sm_b.reader().receive_snapshot(meta.clone()).unwrap();
        for chunk in data.chunks(piece) {
            incoming.push(chunk).unwrap();
            assert_eq!(sm_b.fingerprint().unwrap(), before, "piece {piece}: nothing changes while staging");
        }
        assert_eq!(incoming.bytes(), data.len() as u64);
        let transfer = incoming.finish().unwrap();
        assert_eq!(get(&sm_b.reader(), "only-in-b").map(|k| k.value), Some(b"x".to_vec()), "piece {piece}");
        sm_b.install_snapshot(&meta, Box::new(SnapshotData::staged(transfer))).await.unwrap();
        assert_eq!(sm_b.reader().digest().unwrap(), sm_a.reader().digest().unwrap(), "piece {piece}");
        assert_eq!(all_keys(&sm_b.reader()), all_keys(&sm_a.reader()), "piece {piece}");
        assert_digest_recounts(&sm_b.reader());
        // Installed once: the staging tables are gone, so the same transfer cannot install again.
        let err = sm_b.install_snapshot(&meta, Box::new(SnapshotData::staged(transfer))).await.unwrap_err();
        assert!(err.to_string().contains("no staged snapshot"), "{err}");
    }

    let (_dir_c, mut sm_c, before) = other_state("only-in-c").await;
    // Not finished: refused.
    let mut first = sm_c.reader().receive_snapshot(meta.clone()).unwrap();
    first.push(&data[..data.len() / 2]).unwrap();
    let mut finished_first = sm_c.reader().receive_snapshot(meta.clone()).unwrap();
    finished_first.push(&data).unwrap();
    let replaced = finished_first.finish().unwrap();
    // A newer transfer replaces it (and whatever it staged).
    let mut second = sm_c.reader().receive_snapshot(meta.clone()).unwrap();
    second.push(&data[..10]).unwrap();
    let err = sm_c.install_snapshot(&meta, Box::new(SnapshotData::staged(replaced))).await.unwrap_err();
    assert!(err.to_string().contains("another transfer replaced it"), "{err}");
    assert_eq!(sm_c.fingerprint().unwrap(), before);
    second.push(&data[10..]).unwrap();
    let mut other_meta = meta.clone();
    other_meta.last_log_id = Some(log_id(2, 9));
    let transfer = second.finish().unwrap();
    let err = sm_c.install_snapshot(&other_meta, Box::new(SnapshotData::staged(transfer))).await.unwrap_err();
    assert!(err.to_string().contains("staged snapshot is of"), "{err}");
    assert_eq!(sm_c.fingerprint().unwrap(), before);
    sm_c.install_snapshot(&meta, Box::new(SnapshotData::staged(transfer))).await.unwrap();
    assert_eq!(sm_c.reader().digest().unwrap(), sm_a.reader().digest().unwrap());
}

/// A defragmentation in the middle of a transfer (docs/design.md §6.6) carries what was staged
/// into the new file: the transfer goes on and installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_goes_on_across_a_defragmentation() {
    let (_dir_a, sm_a, meta, data) = populated_snapshot().await;
    let (_dir_b, mut sm_b, before) = other_state("only-in-b").await;
    let mut incoming = sm_b.reader().receive_snapshot(meta.clone()).unwrap();
    incoming.push(&data[..data.len() / 2]).unwrap();
    let reader = sm_b.reader();
    tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap();
    assert_eq!(sm_b.fingerprint().unwrap(), before);
    incoming.push(&data[data.len() / 2..]).unwrap();
    let transfer = incoming.finish().unwrap();
    sm_b.install_snapshot(&meta, Box::new(SnapshotData::staged(transfer))).await.unwrap();
    assert_eq!(sm_b.reader().digest().unwrap(), sm_a.reader().digest().unwrap());
    assert_eq!(all_keys(&sm_b.reader()), all_keys(&sm_a.reader()));
    assert_digest_recounts(&sm_b.reader());
}

/// A crash in the middle of a transfer (the staged part made durable by a later commit) leaves
/// the old state, and the reopened state machine drops what was staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_by_a_crash_leaves_the_old_state() {
    let (_dir_a, _sm_a, meta, data) = populated_snapshot().await;

    let (dir_b, mut sm_b, before) = other_state("only-in-b").await;
    let mut incoming = sm_b.reader().receive_snapshot(meta.clone()).unwrap();
    incoming.push(&data).unwrap();
    let transfer = incoming.finish().unwrap();
    // A durable commit persists the staged tables too.
    sm_b.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let crashed = copy_dir_files(dir_b.path(), &[SM_FILE]);
    let mut recovered = open_sm(crashed.path());
    assert_eq!(recovered.fingerprint().unwrap(), before);
    let err = recovered.install_snapshot(&meta, Box::new(SnapshotData::staged(transfer))).await.unwrap_err();
    assert!(err.to_string().contains("no staged snapshot"), "{err}");
    assert_eq!(recovered.fingerprint().unwrap(), before);
}

/// The sender's side: the stream cut into chunks as it is written equals the file, and a reader
/// that stops early stops the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_in_chunks_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    populate(&mut sm).await;
    let whole = snapshot_bytes(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    for chunk_bytes in [1, 100, whole.len(), whole.len() * 2] {
        let snap = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut chunks = snap.snapshot.into_chunks(chunk_bytes).await.unwrap();
        let mut got = Vec::new();
        let mut count = 0;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= chunk_bytes);
            got.extend_from_slice(&chunk);
            count += 1;
        }
        assert_eq!(got, whole, "chunks of {chunk_bytes}");
        assert_eq!(count, whole.len().div_ceil(chunk_bytes), "chunks of {chunk_bytes}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [SM_FILE], "no file is made to send");
    }
    // The reader gives up after one chunk: the writer stops (the read transaction is released,
    // so a durable commit and a new stream still work).
    let snap = sm.get_current_snapshot().await.unwrap().unwrap();
    let mut chunks = snap.snapshot.into_chunks(1).await.unwrap();
    assert_eq!(chunks.recv().await.unwrap().unwrap().len(), 1);
    drop(chunks);
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot_bytes(sm.get_current_snapshot().await.unwrap().unwrap()).await, whole);
}
