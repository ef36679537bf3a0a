//! The redb Raft log: append, read, truncate, purge, byte-capped reads, vote and committed id across reopen and crash, the journal.

use super::*;

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
    let journal = crate::storage::journal::path_beside(std::path::Path::new(LOG_FILE));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_on_the_node_journal_keep_acknowledged_appends_through_a_crash() {
    use crate::storage::shared_journal::{SharedJournal, FILE_NAME};
    // Two shards' logs in one dir, their new entries in one node journal (file names made
    // distinct here; a node keeps them in shard-N/ directories).
    let dir = tempfile::tempdir().unwrap();
    let journal = SharedJournal::open_file(&dir.path().join(FILE_NAME)).unwrap();
    let mut a = RedbLogStore::open_shared(&dir.path().join("a.db"), &journal, 0, NO_CAP, 1 << 20).unwrap();
    let mut b = RedbLogStore::open_shared(&dir.path().join("b.db"), &journal, 1, NO_CAP, 1 << 20).unwrap();
    let (x, y) = tokio::join!(
        a.blocking_append(vec![blank(1, 1), put(1, 2, "a", b"1")]),
        b.blocking_append(vec![put(1, 1, "b", b"2")])
    );
    x.unwrap();
    y.unwrap();
    b.blocking_append(vec![put(1, 2, "c", b"3")]).await.unwrap();
    // A copy taken now (the stores still open) is what a crash leaves: the entries are in the
    // node journal only.
    let crashed = copy_dir_files(dir.path(), &["a.db", "b.db", FILE_NAME]);
    let bare = copy_dir_files(dir.path(), &["a.db", "b.db"]);
    for (copy, expect_a, expect_b) in [(&crashed, vec![1, 2], vec![1, 2]), (&bare, vec![], vec![])] {
        let journal = SharedJournal::open_file(&copy.path().join(FILE_NAME)).unwrap();
        let mut a = RedbLogStore::open_shared(&copy.path().join("a.db"), &journal, 0, NO_CAP, 1 << 20).unwrap();
        let mut b = RedbLogStore::open_shared(&copy.path().join("b.db"), &journal, 1, NO_CAP, 1 << 20).unwrap();
        assert_eq!(indexes(&read_all(&mut a).await), expect_a);
        assert_eq!(indexes(&read_all(&mut b).await), expect_b);
        assert!(journal.unclaimed().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_journal_left_by_an_earlier_version_is_moved_into_the_log_and_removed() {
    use crate::storage::shared_journal::{SharedJournal, FILE_NAME};
    let dir = tempfile::tempdir().unwrap();
    let mut old = open_log(dir.path(), NO_CAP);
    old.blocking_append(vec![blank(1, 1), put(1, 2, "a", b"1")]).await.unwrap();
    let own = crate::storage::journal::path_beside(std::path::Path::new(LOG_FILE));
    let own = own.file_name().unwrap().to_str().unwrap();
    // Crashed with the entries in the shard's own journal.
    let crashed = copy_dir_files(dir.path(), &[LOG_FILE, own]);
    drop(old);
    let journal = SharedJournal::open_file(&crashed.path().join(FILE_NAME)).unwrap();
    let mut log = RedbLogStore::open_shared(&crashed.path().join(LOG_FILE), &journal, 0, NO_CAP, 1 << 20).unwrap();
    assert_eq!(indexes(&read_all(&mut log).await), vec![1, 2]);
    assert!(!crashed.path().join(own).exists(), "the shard's own journal is gone");
    log.blocking_append(vec![put(1, 3, "b", b"2")]).await.unwrap();
    drop(log);
    let mut log = RedbLogStore::open_shared(&crashed.path().join(LOG_FILE), &journal, 0, NO_CAP, 1 << 20).unwrap();
    assert_eq!(indexes(&read_all(&mut log).await), vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_of_shards_no_longer_hosted_are_moved_into_their_logs() {
    use crate::storage::{
        log_store::settle_unclaimed,
        shared_journal::{SharedJournal, FILE_NAME},
    };
    // A node with shards 0, 1 and 2 crashes with entries of each only in the node journal.
    let dir = tempfile::tempdir().unwrap();
    let journal = SharedJournal::open_file(&dir.path().join(FILE_NAME)).unwrap();
    let log_of = |root: &Path, shard: u32| root.join(format!("shard-{shard}")).join(LOG_FILE);
    let mut stores = Vec::new();
    for shard in 0..3 {
        let mut log = RedbLogStore::open_shared(&log_of(dir.path(), shard), &journal, shard, NO_CAP, 1 << 20).unwrap();
        log.blocking_append(vec![blank(1, 1), put(1, 2, "k", b"v")]).await.unwrap();
        stores.push(log);
    }
    let crashed = tempfile::tempdir().unwrap();
    for name in [FILE_NAME.to_string(), "shard-0/raft-log.db".into(), "shard-1/raft-log.db".into()] {
        std::fs::create_dir_all(crashed.path().join(&name).parent().unwrap()).unwrap();
        std::fs::copy(dir.path().join(&name), crashed.path().join(&name)).unwrap();
    }
    drop(stores);
    // Restarted hosting shard 0 only; shard 2's log is gone altogether.
    let journal = SharedJournal::open_file(&crashed.path().join(FILE_NAME)).unwrap();
    let mut zero = RedbLogStore::open_shared(&log_of(crashed.path(), 0), &journal, 0, NO_CAP, 1 << 20).unwrap();
    assert_eq!(indexes(&read_all(&mut zero).await), vec![1, 2]);
    assert_eq!(journal.unclaimed(), vec![1, 2]);
    assert_eq!(settle_unclaimed(&journal, crashed.path(), NO_CAP).unwrap(), vec![1, 2]);
    assert!(journal.unclaimed().is_empty(), "nothing holds the journal's room any more");
    // Shard 1, hosted again later, has its entries.
    let mut one = RedbLogStore::open_shared(&log_of(crashed.path(), 1), &journal, 1, NO_CAP, 1 << 20).unwrap();
    assert_eq!(indexes(&read_all(&mut one).await), vec![1, 2]);
}

/// The log knows how many encoded bytes it holds after any index, through appends, truncation,
/// purges and a reopen — what `[raft] snapshot_log_bytes` compares with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_bytes_follow_appends_truncation_purges_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_log(dir.path(), NO_CAP);
    assert_eq!(store.bytes_after(None), 0);
    let entries: Vec<Entry> = (1..=10).map(|i| put(1, i, &format!("k{i}"), &vec![b'v'; 100 * i as usize])).collect();
    let size = |e: &Entry| postcard::to_stdvec(e).unwrap().len() as u64;
    let sum = |from: usize, to: usize| entries[from - 1..to].iter().map(size).sum::<u64>();
    store.blocking_append(entries.clone()).await.unwrap();
    assert_eq!(store.bytes_after(None), sum(1, 10));
    assert_eq!(store.bytes_after(Some(4)), sum(5, 10), "after a snapshot at 4");
    assert!(sum(5, 10) > 5 * 500, "values dominate: {}", sum(5, 10));
    // Keeping at most N bytes up to a snapshot at 8: purge up to the newest entry that would
    // overflow them.
    assert_eq!(store.purge_point(8, sum(1, 8)), None, "all fit");
    assert_eq!(store.purge_point(8, sum(6, 8)), Some(5));
    assert_eq!(store.purge_point(8, sum(6, 8) + 1), Some(5));
    assert_eq!(store.purge_point(8, sum(6, 8) - 1), Some(6));
    assert_eq!(store.purge_point(8, 0), Some(8), "nothing kept");
    store.truncate(log_id(1, 9)).await.unwrap();
    assert_eq!(store.bytes_after(None), sum(1, 8));
    store.purge(log_id(1, 3)).await.unwrap();
    assert_eq!(store.bytes_after(None), sum(4, 8));
    assert_eq!(store.bytes_after(Some(5)), sum(6, 8));
    drop(store);
    let store = open_log(dir.path(), NO_CAP);
    assert_eq!(store.bytes_after(None), sum(4, 8), "counted again from the file after a reopen");
}
