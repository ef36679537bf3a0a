//! Replica state digests: the same log gives the same digest however it is applied.

use super::*;

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
    let late = 1_000 + crate::storage::state_machine::SESSION_TTL_MS + 1;
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
        let meta = snap.meta.clone();
        let bytes = &snapshot_bytes(snap).await;

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
            let rx = receive(&mut follower, bytes).await;
            follower.install_snapshot(&meta, rx).await.unwrap();
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
    // Changed on purpose once: revisions became log index × 1024 + place in the entry (the
    // digest covers every key's revisions).
    assert_eq!(digest(&sm).hex(), "22de4ba75ce0f1ea830a9b444f7a2765489ceee22c07f47c818a538f9eca3a88");
}
