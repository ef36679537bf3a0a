//! Defragmentation of the state machine's file (`state_machine::db_file`, docs/design.md §6.6):
//! the file shrinks, the state does not change, writes during it are kept, a failed one changes
//! nothing, and what a crash leaves is the old file or the whole new one.

use super::*;

const KEYS: u64 = 3_000;
const PER_ENTRY: u64 = 25;

/// Keys in a scattered order (a permutation of 0..KEYS), as concurrent clients write them.
fn scattered(i: u64) -> String {
    format!("key-{:08}", (i * 1_543) % KEYS)
}

/// Applies KEYS puts of 1 KiB values in scattered key order, PER_ENTRY per entry; returns the
/// next free log index.
async fn load(sm: &mut RedbStateMachine) -> u64 {
    apply(sm, vec![membership(1, 1, &[1])]).await;
    let mut index = 2;
    let value = vec![7u8; 1024];
    let mut entries = Vec::new();
    for chunk in 0..KEYS / PER_ENTRY {
        let ops = (0..PER_ENTRY).map(|j| bput(&scattered(chunk * PER_ENTRY + j), &value)).collect();
        entries.push(batch(1, index, ops));
        index += 1;
        if entries.len() == 4 {
            apply(sm, std::mem::take(&mut entries)).await;
        }
    }
    apply(sm, entries).await;
    index
}

fn file_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(SM_FILE)).unwrap().len()
}

fn defrag_leftover(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("{SM_FILE}.defrag"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragmenting_shrinks_a_scattered_file_and_keeps_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let next = load(&mut sm).await;
    let before = sm.fingerprint().unwrap();
    let digest = sm.reader().digest().unwrap();
    let len_before = file_len(dir.path());
    // A snapshot taken before (its read holds the old file) is still read whole after.
    let held = sm.get_current_snapshot().await.unwrap().unwrap();

    let reader = sm.reader();
    let done = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap();
    assert_eq!(done.before_bytes, len_before);
    assert_eq!(done.after_bytes, file_len(dir.path()));
    assert_eq!(done.keys, KEYS);
    assert!(
        done.after_bytes < done.before_bytes * 3 / 4,
        "a file loaded in scattered order shrinks by a quarter or more: {} -> {} bytes",
        done.before_bytes,
        done.after_bytes
    );
    assert!(!defrag_leftover(dir.path()).exists());
    assert!(sm.fingerprint().unwrap() == before, "the same state, digest recount included");
    assert_eq!(sm.reader().digest().unwrap(), digest);
    let now = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(held.meta, now.meta);
    assert!(snapshot_bytes(held).await == snapshot_bytes(now).await, "the same state streams the same bytes");

    // The shard goes on: writes land in the new file, and survive a reopen.
    apply(&mut sm, vec![put(1, next, "after", b"defrag"), delete(1, next + 1, &scattered(0))]).await;
    assert_eq!(get(&sm.reader(), "after").map(|k| k.value), Some(b"defrag".to_vec()));
    assert_eq!(get(&sm.reader(), &scattered(0)), None);
    // A snapshot built after it describes the new file's state.
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let after = sm.fingerprint().unwrap();
    drop(sm);
    let sm = open_sm(dir.path());
    assert!(sm.fingerprint().unwrap() == after);
    assert_eq!(sm.reader().key_count().unwrap(), KEYS);
}

/// Applies running while a defragmentation copies wait for it; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_defragmentation_wait_and_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let mut next = load(&mut sm).await;
    let reader = sm.reader();
    let defrag = tokio::task::spawn_blocking(move || {
        let mut reports = Vec::new();
        for _ in 0..3 {
            reports.push(reader.defragment().unwrap());
        }
        reports
    });
    let mut written = 0;
    while !defrag.is_finished() || written < 50 {
        // One put per entry (inline applies) and a batch (a blocking-thread apply) in turn.
        let entry = if written % 2 == 0 {
            put(1, next, &format!("during-{written:05}"), b"v")
        } else {
            batch(1, next, (0..10).map(|j| bput(&format!("during-{written:05}-{j}"), b"v")).collect())
        };
        apply(&mut sm, vec![entry]).await;
        next += 1;
        written += 1;
    }
    let reports = defrag.await.unwrap();
    assert_eq!(reports.len(), 3);
    for i in 0..written {
        let key = if i % 2 == 0 { format!("during-{i:05}") } else { format!("during-{i:05}-9") };
        assert_eq!(get(&sm.reader(), &key).map(|k| k.value), Some(b"v".to_vec()), "{key}");
    }
    assert_eq!(sm.reader().last_applied().unwrap().map(|l| l.index), Some(next - 1));
    assert_digest_recounts(&sm.reader());
    let live = sm.fingerprint().unwrap();
    // Everything reached the file that is now in place.
    drop(sm);
    assert!(open_sm(dir.path()).fingerprint().unwrap() == live);
}

/// A defragmentation that cannot copy the file (here: a table it does not know, which the copy
/// would lose) fails, leaves the old file in place and no copy behind, and writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_defragmentation_that_fails_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let next = load(&mut sm).await;
    sm.add_foreign_table("from-a-newer-version").unwrap();
    let before = sm.fingerprint().unwrap();
    let len = file_len(dir.path());
    let reader = sm.reader();
    let err = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("from-a-newer-version"), "{err}");
    assert_eq!(file_len(dir.path()), len);
    assert!(!defrag_leftover(dir.path()).exists());
    assert!(sm.fingerprint().unwrap() == before);
    apply(&mut sm, vec![put(1, next, "still", b"writable")]).await;
    assert_eq!(get(&sm.reader(), "still").map(|k| k.value), Some(b"writable".to_vec()));
}

/// A crash before the rename leaves the old file whole and a partial copy beside it: the next
/// open removes the copy. A crash after it leaves the whole copy in place (it was made durable
/// before the rename): the same state opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_leaves_the_old_file_or_the_whole_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    load(&mut sm).await;
    // Applies commit without fsync: a durable commit first, so that the old file holds it all.
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let before = sm.fingerprint().unwrap();

    // Before the rename: the old file as it was, and a torn copy.
    let crashed = copy_dir_files(dir.path(), &[SM_FILE]);
    std::fs::write(defrag_leftover(crashed.path()), vec![0xA5; 100_000]).unwrap();
    let reopened = open_sm(crashed.path());
    assert!(!defrag_leftover(crashed.path()).exists(), "the torn copy is removed");
    assert!(reopened.fingerprint().unwrap() == before);
    drop(reopened);

    // After it: the files as a power cut right after the defragmentation leaves them.
    let reader = sm.reader();
    tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap();
    let crashed = copy_dir_files(dir.path(), &[SM_FILE]);
    assert!(open_sm(crashed.path()).fingerprint().unwrap() == before);
    assert!(sm.fingerprint().unwrap() == before);
}

/// A tmpfs of `mib` MiB mounted at `dir`, unmounted when dropped; `None` where this process may
/// not mount (not root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(dir.to_path_buf()))
    }
}

/// A temporary directory on a 48 MiB tmpfs of its own (`None`, said in one line, where this
/// process may not mount one).
fn small_disk() -> Option<(tempfile::TempDir, Tmpfs)> {
    let root = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(root.path(), 48) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return None;
    };
    Some((root, disk))
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Without room on the file system for the copy (less than the data the file holds), a
/// defragmentation is refused before it writes anything, and the shard goes on; with room, it
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_defragmentation_without_room_for_the_copy_is_refused() {
    let Some((root, _disk)) = small_disk() else { return };
    let dir = root.path();
    let mut sm = open_sm(dir);
    let next = load(&mut sm).await;
    let before = sm.fingerprint().unwrap();
    let len = file_len(dir);
    // Leave a quarter of the file's size free (less than the data it holds).
    let free = crate::storage::space::free_bytes(dir).unwrap();
    let filler = dir.join("filler");
    std::fs::write(&filler, vec![1u8; (free - len / 4) as usize]).unwrap();
    let left = crate::storage::space::free_bytes(dir).unwrap();
    assert!(left < len / 3, "{left} bytes free, the file is {len}");

    let reader = sm.reader();
    let err = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap_err();
    assert!(
        matches!(err, crate::storage::StorageError::NoRoom(_)) && err.to_string().contains("free bytes for the copy"),
        "{err}"
    );
    assert_eq!(file_len(dir), len);
    assert!(!defrag_leftover(dir).exists());
    assert!(sm.fingerprint().unwrap() == before);
    apply(&mut sm, vec![put(1, next, "still", b"writable")]).await;
    assert_eq!(get(&sm.reader(), "still").map(|k| k.value), Some(b"writable".to_vec()));

    std::fs::remove_file(&filler).unwrap();
    let reader = sm.reader();
    let done = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap();
    assert!(done.after_bytes < done.before_bytes, "{done:?}");
    assert_eq!(get(&sm.reader(), "still").map(|k| k.value), Some(b"writable".to_vec()));
    drop(sm);
}

/// After deletes (what an operator does on a full disk) the copy is only as large as the data
/// left: a defragmentation runs with less free space than the file's size, and gives the room
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_deletes_a_defragmentation_needs_room_only_for_the_data_left() {
    let Some((root, _disk)) = small_disk() else { return };
    let dir = root.path();
    let mut sm = open_sm(dir);
    let mut next = load(&mut sm).await;
    // Delete nine keys in ten.
    let doomed: Vec<u64> = (0..KEYS).filter(|i| i % 10 != 0).collect();
    for chunk in doomed.chunks(PER_ENTRY as usize) {
        apply(&mut sm, vec![batch(1, next, chunk.iter().map(|&i| bdel(&format!("key-{i:08}"))).collect())]).await;
        next += 1;
    }
    let before = sm.fingerprint().unwrap();
    let len = file_len(dir);
    let free = crate::storage::space::free_bytes(dir).unwrap();
    let filler = dir.join("filler");
    // 2 MiB free: less than the data left with its slack — refused, nothing written.
    std::fs::write(&filler, vec![1u8; (free - (2 << 20)) as usize]).unwrap();
    let reader = sm.reader();
    let err = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap_err();
    assert!(matches!(err, crate::storage::StorageError::NoRoom(_)), "{err}");
    assert_eq!(file_len(dir), len);
    // 1 MiB less than the file's size free: not room for a copy as large as the file, but for
    // the data left (a tenth of it, with its slack).
    std::fs::remove_file(&filler).unwrap();
    let free = crate::storage::space::free_bytes(dir).unwrap();
    std::fs::write(&filler, vec![1u8; (free - (len - (1 << 20))) as usize]).unwrap();
    assert!(crate::storage::space::free_bytes(dir).unwrap() < len);

    let reader = sm.reader();
    let done = tokio::task::spawn_blocking(move || reader.defragment()).await.unwrap().unwrap();
    assert_eq!(done.keys, KEYS / 10);
    assert!(done.after_bytes < len / 2, "{done:?}");
    assert!(!defrag_leftover(dir).exists());
    assert!(sm.fingerprint().unwrap() == before, "the same state");
    apply(&mut sm, vec![put(1, next, "still", b"writable")]).await;
    assert_eq!(get(&sm.reader(), "still").map(|k| k.value), Some(b"writable".to_vec()));
    assert_eq!(get(&sm.reader(), "key-00000010").map(|k| k.value), Some(vec![7u8; 1024]));
    assert_eq!(get(&sm.reader(), "key-00000011"), None);
    drop(sm);
}
